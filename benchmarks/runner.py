"""Runs the op benchmarks into long-format rows (one per op x provider x mode x shape x dtype), each recorded (and
flushed to the run's JSONL) as soon as it is measured."""

import torch

from benchmarks.providers import available
from benchmarks.registry import FLOAT_BYTES, OpBenchmark
from benchmarks.sink import Recorder, past
from benchmarks.timing import peak_mb, quantiles_ms, step_for_mode

ROTATION_BYTES = 2 * 2**30  # input sets rotated per measurement, as many as fit in this budget (at most 3)


def shape_label(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def input_sets(bench: OpBenchmark, shape: dict, dtype, device, mode: str) -> list[dict]:
    first = bench.make_inputs(shape, dtype, device, seed=0)
    if mode == "backward" or torch.device(device).type != "cuda":
        return [first]  # backward keeps a graph per set alive; rotating would multiply that memory
    size = sum(t.numel() * t.element_size() for t in first.values() if isinstance(t, torch.Tensor))
    count = max(1, min(3, ROTATION_BYTES // max(size, 1)))
    return [first] + [bench.make_inputs(shape, dtype, device, seed=i) for i in range(1, count)]


def _measure(bench, provider, inputs, mode, device) -> dict:
    step = step_for_mode(provider.fn, inputs, mode, bench.grad_names)
    timing = quantiles_ms(step, device)
    return {"ms_p20": timing.p20, "ms_p50": timing.p50, "ms_p80": timing.p80, "samples": timing.samples,
            "peak_mb": peak_mb(step, device)}  # fmt: skip


def runnable_providers(bench: OpBenchmark, device, recorder: Recorder, only=None) -> dict:
    """The providers of `bench` that can run here (restricted to the names in `only`); a note for each dropped one."""
    providers, notes = available(bench.providers, torch.device(device).type)
    for note in notes:
        recorder.note(f"{bench.name}: {note}")
    return {name: p for name, p in providers.items() if only is None or name in only}


def run_op(bench: OpBenchmark, shapes, dtypes, modes, device, recorder: Recorder, *, only=None, deadline=None) -> None:
    """Measure every runnable provider of `bench` (those named in `only`, if given) into `recorder`; a provider that
    fails records its error instead of a time. Stops, with a note, once `deadline` (epoch seconds) has passed."""
    providers = runnable_providers(bench, device, recorder, only)
    for dtype in dtypes:
        for shape in shapes:
            for mode in (m for m in modes if m in bench.modes):
                if past(deadline):
                    recorder.note(f"{bench.name}: deadline reached, {shape_label(shape)} {mode} not measured")
                    return
                run_shape(bench, providers, shape, dtype, mode, device, recorder, deadline)


def run_shape(bench, providers: dict, shape: dict, dtype, mode: str, device, recorder: Recorder, deadline=None):
    """One row per provider for one shape, dtype and mode."""
    inputs = input_sets(bench, shape, dtype, device, mode)
    for name, provider in providers.items():
        if past(deadline):
            recorder.note(f"{bench.name}: deadline reached, {name} at {shape_label(shape)} {mode} not measured")
            break
        row = {"kind": "op", "op": bench.name, "provider": name, "mode": mode, "shape": shape_label(shape),
               "dtype": str(dtype).removeprefix("torch."), **shape}  # fmt: skip
        try:
            row.update(_measure(bench, provider, inputs, mode, device))
        except torch.cuda.OutOfMemoryError:
            row["error"] = "out of memory"
        except Exception as err:  # a broken provider must not sink the run
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        _add_rates(row, bench, shape, dtype, mode)
        recorder.record(row)
        recorder.log(_progress(row))
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    del inputs


def _add_rates(row, bench, shape, dtype, mode):
    ms = row.get("ms_p50")
    if not ms:
        return
    if bench.flops is not None:
        row["tflops"] = bench.flops(shape, mode) / (ms * 1e-3) / 1e12
    if bench.moved_bytes is not None and dtype in FLOAT_BYTES:
        row["gbps"] = bench.moved_bytes(shape, dtype, mode) / (ms * 1e-3) / 1e9


def _progress(row) -> str:
    what = f"{row['op']:<24} {row['provider']:<17} {row['mode']:<8} {row['dtype']:<8} {row['shape']:<28}"
    if "error" in row:
        return f"{what} {row['error']}"
    peak = f"{row['peak_mb']:8.0f} MB" if row.get("peak_mb") is not None else ""
    spread = f"({row['ms_p20']:.3f}-{row['ms_p80']:.3f}, n={row['samples']})"
    return f"{what} {row['ms_p50']:9.3f} ms {spread} {peak}"
