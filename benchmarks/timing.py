"""Timing and memory measurement: CUDA events around each run, the L2 flushed before it, on a GPU; a wall clock in
smoke mode."""

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch

MODES = ("forward", "backward", "full")  # full = forward + backward
MIN_SAMPLES = 5
L2_FLUSH_BYTES = 256 * 2**20  # more than any GPU's L2 (H100 50 MB, H200 60 MB)


class Timing(NamedTuple):
    """Milliseconds: the 20th, 50th and 80th percentiles over `samples` timed runs."""

    p20: float
    p50: float
    p80: float
    samples: int


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def quantiles_ms(fn: Callable[[], object], device, *, rep_ms=200, min_samples=MIN_SAMPLES, max_samples=100) -> Timing:
    """Percentiles of `fn`'s time over at least `min_samples` runs, after one warm-up run.

    As many runs as fit in `rep_ms` (estimated from one timed run), within [min_samples, max_samples]. On CUDA each run
    is timed with events and preceded by a 256 MiB write, so no run finds the last one's data in L2 (what
    triton.testing.do_bench does, except that do_bench takes a single sample when one run outlasts its budget).
    Elsewhere (smoke runs) the wall clock, which only shows that the path runs.
    """
    fn()  # compilation, autotuning, the allocator's growth
    if not _cuda(device):
        samples = []
        for _ in range(min_samples):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return _percentiles(samples)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    estimate = _cuda_runs(fn, flush, 1)[0]
    count = max(min_samples, min(max_samples, int(rep_ms / max(estimate, 1e-3))))
    return _percentiles(_cuda_runs(fn, flush, count))


def _cuda_runs(fn, flush: torch.Tensor, count: int) -> list[float]:
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(count)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def _percentiles(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=5, method="inclusive")
    return Timing(q[0], statistics.median(samples), q[3], len(samples))


def peak_mb(fn: Callable[[], object], device) -> float | None:
    """Peak device memory (MB) `fn` allocates above what is allocated before it; None off CUDA."""
    if not _cuda(device):
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def step_for_mode(run: Callable[[dict], torch.Tensor], inputs: list[dict], mode: str, grad_names: tuple[str, ...]):
    """A zero-argument callable doing `mode` of `run` on input sets taken in turn (so caches do not flatter).

    forward runs without autograd; backward re-runs the backward of a graph built once per input set
    (retain_graph); full does both.
    """
    counter = [0]

    def next_inputs():
        counter[0] += 1
        return inputs[counter[0] % len(inputs)]

    if mode == "forward":

        def forward():
            with torch.no_grad():
                return run(next_inputs())

        return forward

    def grads_of(x, out):
        leaves = [x[name] for name in grad_names]
        # providers that reduce inside (a scalar loss) get a unit upstream gradient
        grad_output = x["grad_output"] if out.shape == x["grad_output"].shape else torch.ones_like(out)
        return torch.autograd.grad(out, leaves, grad_output, retain_graph=(mode == "backward"))

    if mode == "full":

        def full():
            x = next_inputs()
            return grads_of(x, run(x))

        return full
    outputs = [run(x) for x in inputs]

    def backward():
        counter[0] += 1
        i = counter[0] % len(inputs)
        return grads_of(inputs[i], outputs[i])

    return backward
