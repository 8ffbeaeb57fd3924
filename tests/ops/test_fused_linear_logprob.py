import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing_utils import assert_fa_close, leaves_like, lm_head_inputs

from posttrain.kernels._common import persistent_programs
from posttrain.kernels.fused_linear_logprob import BWD_CHUNK_BYTES
from posttrain.ops import TokenLogprobs, fused_linear_logprob


def _run(impl, hidden, weight, bias, targets, *, temperature=1.0, grad_logprob=None, grad_entropy=None):
    """Forward with entropy, then the gradients of sum(grad_logprob * logprobs + grad_entropy * entropy)."""
    logprobs, entropy = fused_linear_logprob(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True, impl=impl
    )
    loss = 0.0
    if grad_logprob is not None:
        loss = loss + (logprobs * grad_logprob.to(logprobs.dtype)).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy.to(entropy.dtype)).sum()
    leaves = [t for t in (hidden, weight, bias) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return [logprobs, entropy, *grads]


def _check(n, h, v, *, dtype=torch.float32, bias=False, temperature=1.0, logit_scale=1.0, ignore_frac=0.0,
           grad_logprob=True, grad_entropy=True, lead=None):  # fmt: skip
    """Triton at `dtype` against float64, with torch at `dtype` as the error baseline (FlashAttention's criterion)."""
    inputs = lm_head_inputs(
        n, h, v, dtype=torch.float64, bias=bias, logit_scale=logit_scale, ignore_frac=ignore_frac, lead=lead
    )
    out_shape = inputs[-1].shape
    kwargs = {
        "temperature": temperature,
        "grad_logprob": torch.randn(out_shape, dtype=torch.float64) if grad_logprob else None,
        "grad_entropy": torch.randn(out_shape, dtype=torch.float64) if grad_entropy else None,
    }
    exact = _run("torch", *inputs, **kwargs)
    baseline = _run("torch", *leaves_like(inputs[:3], dtype), inputs[3], **kwargs)
    actual = _run("triton", *leaves_like(inputs[:3], dtype), inputs[3], **kwargs)
    names = ["logprobs", "entropy", "d_hidden", "d_weight", "d_bias"]
    for name, a, e, b in zip(names, actual, exact, baseline):
        assert a.shape == e.shape, name
        if name.startswith("d_"):
            assert a.dtype == dtype, f"{name} came back as {a.dtype}, not the input dtype {dtype}"
        else:
            assert a.dtype == torch.float32
        assert torch.isfinite(a).all(), name
        assert_fa_close(a, e, b, name=name)
    return actual, exact


SHAPES = [
    pytest.param(1, 16, 1000, id="N1-H16-V1000"),
    pytest.param(37, 48, 1000, id="N37-H48-V1000"),
    pytest.param(37, 33, 50257, id="N37-H33-V50257"),
    pytest.param(70, 64, 4099, id="N70-H64-V4099"),
]


@pytest.mark.parametrize("n,h,v", SHAPES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_fp64(n, h, v, bias):
    _check(n, h, v, bias=bias, temperature=0.7 if bias else 1.0)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature(temperature):
    _check(29, 40, 3000, bias=True, temperature=temperature, logit_scale=3.0)


def test_ignored_rows_are_zero_and_get_no_gradient():
    (logprobs, entropy, d_hidden, _), _ = _check(41, 32, 2000, ignore_frac=0.4)
    hidden, weight, _, targets = lm_head_inputs(41, 32, 2000, ignore_frac=0.4)
    lp, ent = fused_linear_logprob(hidden, weight, targets, return_entropy=True, impl="triton")
    ignored = targets == -100
    assert ignored.any() and (~ignored).any()
    assert (lp[ignored] == 0).all() and (ent[ignored] == 0).all()
    assert (lp[~ignored] < 0).all() and (ent[~ignored] > 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (hidden.grad[ignored] == 0).all()
    assert hidden.grad[~ignored].abs().sum(-1).gt(0).all()


def test_all_rows_ignored():
    hidden, weight, bias, targets = lm_head_inputs(19, 32, 1500, bias=True)
    targets = torch.full_like(targets, -100)
    lp, ent = fused_linear_logprob(hidden, weight, targets, bias=bias, return_entropy=True, impl="triton")
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    for t in (hidden, weight, bias):
        assert (t.grad == 0).all()


def test_custom_ignore_index():
    hidden, weight, _, targets = lm_head_inputs(23, 16, 700)
    targets[::3] = 5
    out = fused_linear_logprob(hidden, weight, targets, ignore_index=5, impl="triton")
    ref = fused_linear_logprob(hidden, weight, targets, ignore_index=5, impl="torch")
    assert (out[targets == 5] == 0).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("logit_scale", [1e3, 1e4], ids=["z1e3", "z1e4"])
def test_extreme_logits(logit_scale):
    _check(33, 32, 2000, bias=True, logit_scale=logit_scale)


def test_gradient_into_entropy_only():
    _check(37, 48, 3000, bias=True, grad_logprob=False, grad_entropy=True)


def test_gradient_into_logprobs_only():
    _check(37, 48, 3000, bias=True, grad_logprob=True, grad_entropy=False)


def test_leading_dimensions():
    actual, _ = _check(0, 24, 900, lead=(3, 7))
    assert actual[0].shape == (3, 7) and actual[2].shape == (3, 7, 24)


def test_non_contiguous_inputs_and_grad_output():
    hidden, weight, bias, targets = lm_head_inputs(40, 32, 1200, bias=True)
    hidden_t = hidden.detach().t().contiguous().t().requires_grad_()  # column-major [N, H]
    weight_nc = weight.detach()[:, :].t().contiguous().t().requires_grad_()
    grad_out = torch.randn(80)[::2]
    assert not hidden_t.is_contiguous() and not grad_out.is_contiguous()
    results = []
    for impl, (h, w) in (("triton", (hidden_t, weight_nc)), ("torch", leaves_like((hidden, weight), torch.float32))):
        lp = fused_linear_logprob(h, w, targets, bias=bias, impl=impl)
        results.append((lp, *torch.autograd.grad(lp, (h, w), grad_out)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_fp16_matches_fp64():
    _check(37, 64, 1000, dtype=torch.float16, bias=True)


def test_stats_match_reference():
    hidden, weight, bias, targets = lm_head_inputs(50, 32, 600, bias=True, logit_scale=4.0, ignore_frac=0.2)
    # make some targets the argmax, so both outcomes are exercised
    logits = (hidden @ weight.T + bias).detach()
    targets[:10] = torch.where(targets[:10] == -100, -100, logits[:10].argmax(-1))
    out = fused_linear_logprob(hidden, weight, targets, bias=bias, temperature=0.5, return_stats=True, impl="triton")
    ref = fused_linear_logprob(hidden, weight, targets, bias=bias, temperature=0.5, return_stats=True, impl="torch")
    assert isinstance(out, TokenLogprobs) and out.entropy is None
    assert out.is_argmax.dtype == torch.bool and out.is_argmax.any() and not out.is_argmax.all()
    assert torch.equal(out.is_argmax, ref.is_argmax)
    expected_mean = torch.where(targets != -100, (logits / 0.5).mean(-1), 0.0)
    torch.testing.assert_close(out.mean_logit, expected_mean, rtol=1e-5, atol=1e-5)
    log_p = (logits.double() / 0.5).log_softmax(-1)
    expected_sq = torch.where(targets != -100, torch.logsumexp(2 * log_p, -1), 0.0)
    torch.testing.assert_close(out.log_sum_sq_probs.double(), expected_sq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.log_sum_sq_probs.double(), expected_sq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logprobs, ref.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stats", [("is_argmax",), ("mean_logit", "log_sum_sq_probs")], ids=["argmax", "mean+sq"])
def test_stats_subsets(stats):
    hidden, weight, _, targets = lm_head_inputs(30, 32, 700, logit_scale=3.0, ignore_frac=0.2)
    out = fused_linear_logprob(hidden, weight, targets, return_entropy=True, return_stats=stats, impl="triton")
    ref = fused_linear_logprob(hidden, weight, targets, return_entropy=True, return_stats=True, impl="torch")
    for name in ("mean_logit", "is_argmax", "log_sum_sq_probs"):
        value = getattr(out, name)
        if name not in stats:
            assert value is None, name
        elif name == "is_argmax":
            assert torch.equal(value, ref.is_argmax)
        else:
            torch.testing.assert_close(value, getattr(ref, name), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(out.entropy, ref.entropy, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="return_stats 'is_argmax' must be a bool or names among"):
        fused_linear_logprob(hidden, weight, targets, return_stats="is_argmax")


def test_single_token_vocabulary_is_exact():
    # V = 1: the only logit is the target's, so log p = 0, entropy = 0 and no gradient, exactly (issue 13)
    hidden, weight, bias, targets = lm_head_inputs(9, 24, 1, bias=True, logit_scale=5.0)
    lp, ent = fused_linear_logprob(hidden, weight, targets, bias=bias, temperature=0.7, return_entropy=True,
                                   impl="triton")  # fmt: skip
    assert torch.equal(lp, torch.zeros(9)) and torch.equal(ent, torch.zeros(9))
    grads = torch.autograd.grad((lp * torch.randn(9)).sum() + (ent * torch.randn(9)).sum(), (hidden, weight, bias))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_target_with_all_the_mass_is_exact():
    # the target's logit 1e3 above the rest: p = 1 in fp32, and log p must be exactly 0, not a rounding difference
    # between two ways of computing the same logit
    hidden, weight, bias, targets = lm_head_inputs(21, 32, 3000, bias=True)
    targets[:] = 1234
    with torch.no_grad():
        bias[1234] = 1e3
    lp = fused_linear_logprob(hidden, weight, targets, bias=bias, impl="triton")
    assert torch.equal(lp, torch.zeros(21))


def test_argmax_ties_pick_the_first_maximum():
    # identical weight rows give identical logits; only the first of them counts as the argmax, as torch.argmax
    hidden = torch.randn(8, 16)
    weight = torch.randn(5000, 16) * 0.1
    weight[4321] = weight[17] = hidden[0] * 10
    targets = torch.tensor([17, 4321] + [0] * 6)
    hidden[1] = hidden[0]
    out = fused_linear_logprob(hidden, weight, targets, return_stats=True, impl="triton")
    assert out.is_argmax[:2].tolist() == [True, False]


def test_autocast_casts_like_linear():
    hidden, weight, _, targets = lm_head_inputs(16, 32, 500)
    with torch.autocast(hidden.device.type, dtype=torch.float16):
        lp = fused_linear_logprob(hidden, weight, targets, impl="triton")
    lp.sum().backward()
    assert lp.dtype == torch.float32 and hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    ref = fused_linear_logprob(*leaves_like((hidden, weight), torch.float16), targets, impl="torch")
    torch.testing.assert_close(lp, ref, rtol=2e-3, atol=2e-3)


def test_no_grad_and_frozen_weight():
    hidden, weight, _, targets = lm_head_inputs(20, 32, 800)
    with torch.no_grad():
        lp = fused_linear_logprob(hidden, weight, targets, impl="triton")
    assert not lp.requires_grad
    frozen = weight.detach()
    lp = fused_linear_logprob(hidden, frozen, targets, impl="triton")
    (d_hidden,) = torch.autograd.grad(lp.sum(), hidden)
    ref = fused_linear_logprob(hidden, frozen, targets, impl="torch")
    (d_ref,) = torch.autograd.grad(ref.sum(), hidden)
    torch.testing.assert_close(d_hidden, d_ref, rtol=1e-4, atol=1e-5)


def test_empty_input():
    hidden, weight, _, _ = lm_head_inputs(4, 16, 100)
    lp, ent = fused_linear_logprob(hidden[:0], weight, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert lp.shape == (0,) and ent.shape == (0,)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    h=st.integers(1, 70),
    v=st.integers(2, 5000),
    bias=st.booleans(),
    temperature=st.floats(0.25, 4.0),
    ignore_frac=st.sampled_from([0.0, 0.3]),
    seed=st.integers(0, 2**31),
)
def test_property_random_shapes(n, h, v, bias, temperature, ignore_frac, seed):
    torch.manual_seed(seed)  # the tensors too come from hypothesis' draw, so a failure replays
    _check(n, h, v, bias=bias, temperature=temperature, ignore_frac=ignore_frac)


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda a: a.update(targets=a["targets"].clone().fill_(1000)), ValueError, r"= 1000 is outside \[0, 1000\)"),
        (lambda a: a.update(targets=a["targets"].clone().fill_(-1)), ValueError, r"= -1 is outside"),
        (lambda a: a.update(targets=a["targets"].float()), TypeError, "targets must be int64"),
        (lambda a: a.update(targets=a["targets"][:-1]), ValueError, "targets has shape"),
        (lambda a: a.update(weight=torch.randn(1000, 7)), ValueError, "last dimension must match"),
        (lambda a: a.update(weight=a["weight"].half()), TypeError, "must share a dtype"),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden must be float32"),
        (lambda a: a.update(bias=torch.randn(999)), ValueError, "bias has shape"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature must be"),
        (lambda a: a.update(temperature=float("nan")), ValueError, "temperature must be"),
        (lambda a: a.update(impl="cuda-please"), ValueError, "impl 'cuda-please' is not one of"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "one device"),
    ],
    ids=["target-too-big", "target-negative", "float-targets", "targets-shape", "hidden-weight-shape",
         "dtype-mismatch", "int-hidden", "bias-shape", "zero-temperature", "nan-temperature", "bad-impl", "device"],
)  # fmt: skip
def test_bad_input_errors(change, error, match):
    hidden, weight, _, targets = lm_head_inputs(6, 16, 1000)
    args = {"hidden": hidden, "weight": weight, "targets": targets, "bias": None, "temperature": 1.0, "impl": "auto"}
    change(args)
    with pytest.raises(error, match=match):
        fused_linear_logprob(
            args["hidden"], args["weight"], args["targets"], bias=args["bias"], temperature=args["temperature"],
            impl=args["impl"],
        )  # fmt: skip


def test_triton_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    hidden, weight, _, targets = lm_head_inputs(4, 16, 100)
    if torch.cuda.is_available():
        pytest.skip("CUDA present: impl='triton' is valid")
    with pytest.raises(RuntimeError, match="impl='triton' needs a CUDA device"):
        fused_linear_logprob(hidden, weight, targets, impl="triton")
    # auto falls back to the torch path
    fused_linear_logprob(hidden, weight, targets, impl="auto")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n,h,v", [(1, 64, 1000), (37, 896, 50257), (4096, 1024, 151936)], ids=str)
def test_gpu_low_precision_matches_fp64(dtype, n, h, v):
    inputs = [t.cuda() if t is not None else None for t in lm_head_inputs(n, h, v, dtype=torch.float64, bias=True)]
    inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    kwargs = {"temperature": 0.9, "grad_logprob": torch.randn(n, device="cuda"), "grad_entropy": torch.randn(n, device="cuda")}
    exact = _run("torch", *inputs, **kwargs)
    baseline = _run("torch", *leaves_like(inputs[:3], dtype), inputs[3], **kwargs)
    actual = _run("triton", *leaves_like(inputs[:3], dtype), inputs[3], **kwargs)
    for name, a, e, b in zip(["logprobs", "entropy", "d_hidden", "d_weight", "d_bias"], actual, exact, baseline):
        assert_fa_close(a, e, b, name=name, atol=1e-4)


@pytest.mark.gpu
def test_gpu_persistent_grid_is_the_sm_count():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert persistent_programs(torch.device("cuda", 0)) == sms


@pytest.mark.gpu
def test_gpu_extra_memory_is_bounded():
    n, h, v = 16384, 4096, 151936
    hidden = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) / h**0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda")
    grad_out = torch.randn(n, device="cuda")

    def step():
        lp, ent = fused_linear_logprob(hidden, weight, targets, return_entropy=True)
        return lp, ent, *torch.autograd.grad((lp * grad_out).sum() + ent.sum(), (hidden, weight))

    # compiles, and under POSTTRAIN_AUTOTUNE=1 both passes' autotuning (with its L2-flush buffer), happen here
    warm_up = step()
    del warm_up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent, d_hidden, d_weight = step()
    torch.cuda.synchronize()
    grads_and_outputs = d_hidden.nbytes + d_weight.nbytes + lp.nbytes + ent.nbytes
    extra_mb = (torch.cuda.max_memory_allocated() - base - grads_and_outputs) / 2**20
    # the backward's logits-gradient chunk, dH's fp32 accumulator over its column chunks, and 64 MiB for the rest
    # (per-split statistics, cuBLAS workspace)
    bound_mb = (BWD_CHUNK_BYTES + n * h * 4) / 2**20 + 64
    logits_mb = n * v * 2 / 2**20
    assert extra_mb < bound_mb, (
        f"{extra_mb:.0f} MiB beyond inputs, outputs and gradients, bound {bound_mb:.0f} MiB ([N, V] logits: "
        f"{logits_mb:.0f} MiB)"
    )
