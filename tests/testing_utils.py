"""Helpers shared by the tests (importable as `testing_utils`: pyproject puts tests/ on sys.path)."""

import math

import torch


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_fa_close(actual, exact, baseline, *, name="", factor=2.0, atol=1e-6):
    """FlashAttention's criterion: `actual`'s error against the float64 `exact` is at most `factor` times the error of
    `baseline` (the same math in plain PyTorch at the same low precision), plus a small absolute slack for values whose
    baseline happens to be exact (relative to the largest |exact| when that exceeds 1)."""
    err, base = max_error(actual, exact), max_error(baseline, exact)
    slack = atol * max(1.0, exact.double().abs().max().item() if exact.numel() else 1.0)
    assert err <= factor * base + slack, f"{name}: error {err:.3g} > {factor} x baseline error {base:.3g} + {slack:.3g}"


def lm_head_inputs(n, h, v, *, dtype=torch.float32, bias=False, logit_scale=1.0, ignore_frac=0.0, lead=None):
    """Random hidden [n, h] (or lead + [h]), weight [v, h], targets, optional bias, as leaf tensors needing grad.

    Logits come out with standard deviation ~logit_scale; `ignore_frac` of the targets are -100.
    """
    shape = tuple(lead) if lead is not None else (n,)
    hidden = torch.randn(*shape, h, dtype=torch.float64)
    weight = torch.randn(v, h, dtype=torch.float64) * (logit_scale / h**0.5)
    b = torch.randn(v, dtype=torch.float64) * logit_scale if bias else None
    targets = torch.randint(0, v, shape)
    if ignore_frac:
        targets[torch.rand(shape) < ignore_frac] = -100
    return tuple(t.to(dtype).requires_grad_() if t is not None else None for t in (hidden, weight, b)) + (targets,)


def leaves_like(tensors, dtype):
    """Detached copies of `tensors` (None kept) converted to `dtype`, requiring grad."""
    return tuple(t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors)


def logged_close(ours: float, theirs: float, step: int, step1: tuple[float, float], later: tuple[float, float]) -> bool:
    """One logged value of posttrain's against TRL's: within (rtol, atol) = `step1` at step 1, `later` after it."""
    rtol, atol = step1 if step == 1 else later
    return math.isclose(ours, theirs, rel_tol=rtol, abs_tol=atol)


def assert_same_logs(ours: list[dict], theirs: list[dict], step1: tuple[float, float],
                     later: tuple[float, float]) -> None:  # fmt: skip
    """Three logged steps of two trainers (posttrain's, TRL's): the same keys, every value `logged_close` (the modules
    that call this say why their tolerances are what they are)."""
    assert len(ours) == len(theirs) == 3
    for step, (a, b) in enumerate(zip(ours, theirs), start=1):
        assert a.keys() == b.keys(), f"step {step}: logged keys differ: {set(a) ^ set(b)}"
        bad = {key: (a[key], b[key]) for key in b if not logged_close(a[key], b[key], step, step1, later)}
        assert not bad, f"step {step}, (posttrain, TRL): {bad}"
