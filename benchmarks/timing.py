"""Timing and memory measurement: CUDA events via triton.testing.do_bench on a GPU, a wall clock in smoke mode."""

import statistics
import time
from collections.abc import Callable

import torch

MODES = ("forward", "backward", "full")  # full = forward + backward


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def quantiles_ms(fn: Callable[[], object], device, *, warmup_ms=25, rep_ms=100) -> tuple[float, float, float]:
    """(p20, p50, p80) milliseconds of `fn` after warm-up.

    On CUDA: triton.testing.do_bench (events, L2 flushed before every run). Elsewhere (smoke runs): the wall clock
    over a few calls, which only shows that the path runs.
    """
    if _cuda(device):
        import triton.testing

        p50, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return p20, p50, p80
    fn()
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(samples, n=5, method="inclusive")
    return q[0], statistics.median(samples), q[3]


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
