import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing_utils import assert_fa_close

from posttrain.ops import selective_log_softmax


def _inputs(n, v, *, scale=1.0, ignore_frac=0.0, lead=None):
    shape = tuple(lead) if lead is not None else (n,)
    logits = (torch.randn(*shape, v, dtype=torch.float64) * scale).requires_grad_()
    targets = torch.randint(0, v, shape)
    if ignore_frac:
        targets[torch.rand(shape) < ignore_frac] = -100
    return logits, targets


def _run(impl, logits, targets, grad_logprob, grad_entropy, temperature=1.0):
    lp, ent = selective_log_softmax(logits, targets, temperature=temperature, return_entropy=True, impl=impl)
    loss = 0.0
    if grad_logprob is not None:
        loss = loss + (lp * grad_logprob.to(lp.dtype)).sum()
    if grad_entropy is not None:
        loss = loss + (ent * grad_entropy.to(ent.dtype)).sum()
    return [lp, ent, *torch.autograd.grad(loss, logits)]


def _check(n, v, *, dtype=torch.float32, scale=1.0, temperature=1.0, ignore_frac=0.0, grads=(True, True), lead=None):
    logits, targets = _inputs(n, v, scale=scale, ignore_frac=ignore_frac, lead=lead)
    g = [torch.randn(targets.shape, dtype=torch.float64) if on else None for on in grads]
    exact = _run("torch", logits, targets, *g, temperature)
    low = lambda: logits.detach().to(dtype).requires_grad_()  # noqa: E731
    baseline = _run("torch", low(), targets, *g, temperature)
    actual = _run("triton", low(), targets, *g, temperature)
    for name, a, e, b in zip(["logprobs", "entropy", "d_logits"], actual, exact, baseline):
        assert a.shape == e.shape and torch.isfinite(a).all(), name
        assert a.dtype == (dtype if name == "d_logits" else torch.float32), name
        assert_fa_close(a, e, b, name=name)
    return actual


@pytest.mark.parametrize("n,v", [(1, 1000), (37, 1000), (37, 50257), (5, 4097)], ids=lambda x: str(x))
def test_matches_fp64(n, v):
    _check(n, v, scale=2.0)


@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_temperature(temperature):
    _check(21, 3000, temperature=temperature)


@pytest.mark.parametrize("scale", [1e3, 1e4], ids=["z1e3", "z1e4"])
def test_extreme_logits(scale):
    _check(17, 2000, scale=scale)


def test_ignored_rows():
    lp, ent, grad = _check(40, 900, ignore_frac=0.5)
    assert (lp == 0).sum() >= 1 and (ent == 0).sum() == (lp == 0).sum()
    assert (grad[(lp == 0)] == 0).all()


def test_entropy_gradient_only():
    _check(25, 1500, grads=(False, True))


def test_fp16():
    _check(19, 2048, dtype=torch.float16, scale=3.0)


def test_leading_dims_and_non_contiguous():
    logits, targets = _inputs(0, 600, lead=(3, 5))
    wide = torch.randn(3, 5, 1200, dtype=torch.float32)[..., ::2]  # stride 2 in the vocabulary dimension
    wide_targets = targets
    out = selective_log_softmax(wide, wide_targets, impl="triton")
    ref = selective_log_softmax(wide, wide_targets, impl="torch")
    assert out.shape == (3, 5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _check(0, 600, lead=(3, 5))
    # non-contiguous grad_output
    x = torch.randn(16, 300, requires_grad=True)
    t = torch.randint(0, 300, (16,))
    go = torch.randn(32)[::2]
    (ga,) = torch.autograd.grad(selective_log_softmax(x, t, impl="triton"), x, go)
    (gb,) = torch.autograd.grad(selective_log_softmax(x, t, impl="torch"), x, go)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 33),
    v=st.integers(1, 6000),
    temperature=st.floats(0.3, 3.0),
    scale=st.sampled_from([1.0, 30.0]),
    seed=st.integers(0, 2**31),
)
def test_property_random_shapes(n, v, temperature, scale, seed):
    torch.manual_seed(seed)  # the tensors too come from hypothesis' draw, so a failure replays
    _check(n, v, temperature=temperature, scale=scale, ignore_frac=0.2)


@pytest.mark.parametrize(
    "logits, targets, kwargs, error, match",
    [
        (torch.randn(4, 10), torch.tensor([0, 1, 2, 10]), {}, ValueError, "= 10 is outside"),
        (torch.randn(4, 10), torch.tensor([0, 1, 2]), {}, ValueError, "targets has shape"),
        (torch.randn(4, 10), torch.zeros(4), {}, TypeError, "targets must be int64"),
        (torch.randn(4, 10), torch.zeros(4, dtype=torch.long), {"temperature": -1.0}, ValueError, "temperature"),
        (torch.randn(4, 10).long(), torch.zeros(4, dtype=torch.long), {}, TypeError, "logits must be float32"),
    ],
    ids=["target-range", "target-shape", "target-dtype", "temperature", "int-logits"],
)
def test_bad_input(logits, targets, kwargs, error, match):
    with pytest.raises(error, match=match):
        selective_log_softmax(logits, targets, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_low_precision(dtype):
    logits = (torch.randn(300, 151936, device="cuda", dtype=torch.float64) * 3).requires_grad_()
    targets = torch.randint(0, 151936, (300,), device="cuda")
    g = [torch.randn(300, device="cuda", dtype=torch.float64) for _ in range(2)]
    exact = _run("torch", logits, targets, *g)
    low = lambda: logits.detach().to(dtype).requires_grad_()  # noqa: E731
    baseline = _run("torch", low(), targets, *g)
    actual = _run("triton", low(), targets, *g)
    for name, a, e, b in zip(["logprobs", "entropy", "d_logits"], actual, exact, baseline):
        assert_fa_close(a, e, b, name=name, atol=1e-4)
