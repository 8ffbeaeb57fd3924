"""Runs the op benchmarks into long-format rows (one per op x provider x mode x shape x dtype)."""

import torch

from benchmarks.providers import available
from benchmarks.registry import FLOAT_BYTES, OpBenchmark
from benchmarks.timing import peak_mb, quantiles_ms, step_for_mode

ROTATION_BYTES = 2 * 2**30  # input sets rotated per measurement, as many as fit in this budget (at most 3)


def shape_label(shape: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def _input_sets(bench: OpBenchmark, shape: dict, dtype, device, mode: str) -> list[dict]:
    first = bench.make_inputs(shape, dtype, device, seed=0)
    if mode == "backward" or torch.device(device).type != "cuda":
        return [first]  # backward keeps a graph per set alive; rotating would multiply that memory
    size = sum(t.numel() * t.element_size() for t in first.values())
    count = max(1, min(3, ROTATION_BYTES // max(size, 1)))
    return [first] + [bench.make_inputs(shape, dtype, device, seed=i) for i in range(1, count)]


def _measure(bench, provider, inputs, mode, device) -> dict:
    step = step_for_mode(provider.fn, inputs, mode, bench.grad_names)
    p20, p50, p80 = quantiles_ms(step, device)
    return {"ms_p20": p20, "ms_p50": p50, "ms_p80": p80, "peak_mb": peak_mb(step, device)}


def run_op(bench: OpBenchmark, shapes, dtypes, modes, device, log=print) -> list[dict]:
    """Measure every runnable provider of `bench`; a provider that fails records its error instead of a time."""
    providers, notes = available(bench.providers, torch.device(device).type)
    for note in notes:
        log(f"[{bench.name}] {note}")
    rows = []
    for dtype in dtypes:
        for shape in shapes:
            for mode in (m for m in modes if m in bench.modes):
                inputs = _input_sets(bench, shape, dtype, device, mode)
                for name, provider in providers.items():
                    row = {"op": bench.name, "provider": name, "mode": mode, "shape": shape_label(shape),
                           "dtype": str(dtype).removeprefix("torch."), **shape}  # fmt: skip
                    try:
                        row.update(_measure(bench, provider, inputs, mode, device))
                    except torch.cuda.OutOfMemoryError:
                        row["error"] = "out of memory"
                    except Exception as err:  # a broken provider must not sink the run
                        row["error"] = f"{type(err).__name__}: {err}"[:300]
                    _add_rates(row, bench, shape, dtype, mode)
                    rows.append(row)
                    log(_progress(row))
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                del inputs
    return rows


def _add_rates(row, bench, shape, dtype, mode):
    ms = row.get("ms_p50")
    if not ms:
        return
    if bench.flops is not None:
        row["tflops"] = bench.flops(shape, mode) / (ms * 1e-3) / 1e12
    if bench.moved_bytes is not None and dtype in FLOAT_BYTES:
        row["gbps"] = bench.moved_bytes(shape, dtype, mode) / (ms * 1e-3) / 1e9


def _progress(row) -> str:
    what = f"{row['op']:<24} {row['provider']:<14} {row['mode']:<8} {row['dtype']:<8} {row['shape']:<28}"
    if "error" in row:
        return f"{what} {row['error']}"
    peak = f"{row['peak_mb']:8.0f} MB" if row.get("peak_mb") is not None else ""
    return f"{what} {row['ms_p50']:9.3f} ms {peak}"
