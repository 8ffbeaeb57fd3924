"""Numerics at benchmark scale: posttrain and plain torch at low precision (bf16 on a GPU), each against a reference in
higher precision (fp32 with TF32 off; fp64 in smoke runs), at the headline shapes. Errors of the log-probs (or the
loss) and of dH and dW: max and mean absolute, and ||a - ref|| / ||ref||."""

import contextlib
import functools

import torch

from benchmarks import providers as P
from benchmarks.registry import linear_loss_inputs
from benchmarks.runner import shape_label
from benchmarks.sink import Recorder, past
from posttrain.ops import fused_linear_logprob

LOSSES = {"fused_linear_loss_sft": P.sft_nll, "fused_linear_loss_grpo": P.grpo_clipped}


@contextlib.contextmanager
def _exact_matmul():
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 in the reference
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def errors(name: str, actual: torch.Tensor, exact: torch.Tensor) -> dict:
    diff = (actual.to(exact.dtype) - exact).abs()
    return {f"{name}_max": diff.max().item(), f"{name}_mean": diff.mean().item(),
            f"{name}_rel": (diff.norm() / exact.norm().clamp_min(1e-30)).item()}  # fmt: skip


def _leaves(x: dict, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return x["hidden"].detach().to(dtype).requires_grad_(), x["weight"].detach().to(dtype).requires_grad_()


def _logprob_grads(x: dict, dtype, impl: str):
    hidden, weight = _leaves(x, dtype)
    logprobs = fused_linear_logprob(hidden, weight, x["targets"], impl=impl)
    d_hidden, d_weight = torch.autograd.grad(logprobs, (hidden, weight), x["grad_output"].to(logprobs.dtype))
    return {"logprobs": logprobs.detach(), "d_hidden": d_hidden, "d_weight": d_weight}


def _loss_grads(x: dict, dtype, impl: str, loss):
    hidden, weight = _leaves(x, dtype)
    if impl == "reference":  # autograd through the log-prob reference, then the loss
        logprobs = fused_linear_logprob(hidden, weight, x["targets"], impl="torch")
        value = loss(logprobs, x["rows"], x)
    else:
        from posttrain.ops.fused_linear_loss import fused_linear_loss

        out = fused_linear_loss(hidden, weight, x["targets"], lambda c: loss(c.logprobs, c.rows, x), impl=impl)
        logprobs, value = out.logprobs, out.loss
    d_hidden, d_weight = torch.autograd.grad(value, (hidden, weight))
    return {"logprobs": logprobs.detach(), "loss": value.detach(), "d_hidden": d_hidden, "d_weight": d_weight}


def _compare(recorder: Recorder, base: dict, run, exact: dict) -> None:
    row = dict(base)
    try:
        got = run()
        for name in ("logprobs", "d_hidden", "d_weight"):
            row.update(errors(name, got[name], exact[name]))
        if "loss" in exact:
            row["loss_abs"] = abs(got["loss"].item() - exact["loss"].item())
    except Exception as err:  # one failing path must not hide the others' numbers
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    recorder.record(row)
    found = row.get("error") or ", ".join(
        f"{k} {v:.3g}" for k, v in row.items() if k.endswith(("_max", "_rel", "_abs"))
    )
    recorder.log(f"[verify] {row['op']} {row['impl']} {row['dtype']} vs {row['reference']} {row['shape']}: {found}")


def verify_shape(shape: dict, low, exact_dtype, device, recorder: Recorder, ops: list[str]) -> None:
    """One verify row per op in `ops` ("fused_linear_logprob" and the fused loss benchmarks) and implementation."""
    x = linear_loss_inputs(shape, exact_dtype, device, seed=1)
    for op in ops:
        base = {"kind": "verify", "op": op, "shape": shape_label(shape), "dtype": str(low).removeprefix("torch."),
                "reference": str(exact_dtype).removeprefix("torch."), **shape}  # fmt: skip
        if op == "fused_linear_logprob":
            with _exact_matmul():
                exact = _logprob_grads(x, exact_dtype, "torch")
            for label, impl in (("posttrain", "triton"), ("torch", "torch")):
                _compare(recorder, {**base, "impl": label}, functools.partial(_logprob_grads, x, low, impl), exact)
        else:
            with _exact_matmul():
                exact = _loss_grads(x, exact_dtype, "reference", LOSSES[op])
            for label, impl in (("posttrain", "triton"), ("torch", "torch")):
                run = functools.partial(_loss_grads, x, low, impl, LOSSES[op])
                _compare(recorder, {**base, "impl": label}, run, exact)
        del exact
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_verify(shapes, low, exact_dtype, device, recorder: Recorder, deadline=None) -> None:
    ops = ["fused_linear_logprob"]
    if P.importable(P.FUSED_LOSS_MODULE):
        ops += list(LOSSES)
    else:
        recorder.note(f"verify: fused linear loss not checked, {P.FUSED_LOSS_MODULE} is not importable")
    for shape in shapes:
        if past(deadline):
            recorder.note(f"verify: deadline reached, {shape_label(shape)} not checked")
            return
        verify_shape(shape, low, exact_dtype, device, recorder, ops)
