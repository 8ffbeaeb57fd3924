"""fused_linear_divergence against float64 autograd through its torch reference (the loss, the entropy and every student
gradient, for both implementations, FlashAttention's criterion at low precision), and against TRL 1.16's own
ChunkedDivergenceFunction for the definition."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing_utils import assert_fa_close, leaves_like, max_error

from posttrain.ops import FusedDivergence, fused_linear_divergence

IMPLS = ["torch", "triton"]
BETAS = [pytest.param(0.0, id="forward-kl"), pytest.param(0.5, id="jsd"), pytest.param(1.0, id="reverse-kl")]
NAMES = ["loss", "entropy", "d_hidden", "d_weight", "d_bias"]


def divergence_inputs(n, hs, ht, v, *, dtype=torch.float32, bias=False, logit_scale=1.0, mask_frac=0.0, lead=None):
    """(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask): the student's
    leaves need grad. The teacher shares the student's hidden features (it sees the same tokens) plus ht - hs of its own
    when wider, and a perturbed copy of its head, so the divergences are neither 0 nor saturated. Logits have standard
    deviation ~logit_scale; `mask_frac` of the rows are left out."""
    shape = tuple(lead) if lead is not None else (n,)
    s_hidden = torch.randn(*shape, hs, dtype=torch.float64)
    s_weight = torch.randn(v, hs, dtype=torch.float64) * (logit_scale / hs**0.5)
    own = torch.randn(*shape, max(ht - hs, 0), dtype=torch.float64)
    t_hidden = torch.cat([s_hidden[..., :ht], own], dim=-1)
    t_weight = torch.cat([s_weight[:, :ht], torch.randn(v, max(ht - hs, 0), dtype=torch.float64) / ht**0.5], dim=1)
    t_weight = t_weight + torch.randn(v, ht, dtype=torch.float64) * (0.5 * logit_scale / ht**0.5)
    s_bias = torch.randn(v, dtype=torch.float64) * logit_scale if bias else None
    t_bias = s_bias + torch.randn(v, dtype=torch.float64) * 0.5 * logit_scale if bias else None
    mask = torch.rand(shape) >= mask_frac
    student = tuple(t.to(dtype).requires_grad_() if t is not None else None for t in (s_hidden, s_weight, s_bias))
    teacher = tuple(t.to(dtype) if t is not None else None for t in (t_hidden, t_weight, t_bias))
    return (*student, *teacher, mask)


def run(impl, inputs, *, beta, temperature=1.0, reduction="mean", grad_output=None, **kwargs):
    """[loss, entropy, d_hidden, d_weight, d_bias (None without bias)] of one call ("none" backpropagates
    grad_output)."""
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask = inputs
    out = fused_linear_divergence(s_hidden, s_weight, t_hidden, t_weight, mask, beta=beta, temperature=temperature,
                                  student_bias=s_bias, teacher_bias=t_bias, reduction=reduction, impl=impl,
                                  **kwargs)  # fmt: skip
    assert isinstance(out, FusedDivergence) and not out.entropy.requires_grad
    leaves = [t for t in (s_hidden, s_weight, s_bias) if t is not None]
    target = out.loss if reduction != "none" else (out.loss * grad_output).sum()
    return [out.loss, out.entropy, *torch.autograd.grad(target, leaves), None][:5]


def oracle(inputs, dtype, **kwargs):
    """The reference (autograd) on `inputs` converted to `dtype`."""
    converted = (*leaves_like(inputs[:3], dtype), *(t.to(dtype) if t is not None else None for t in inputs[3:6]))
    return run("torch", (*converted, inputs[6]), **kwargs)


def check(impl, n, hs, ht, v, beta, *, dtype=torch.float32, bias=False, temperature=1.0, logit_scale=1.0,
          mask_frac=0.0, reduction="mean", factor=2.0, **kwargs):  # fmt: skip
    """`impl` at `dtype` against the same math in float64 on the same (`dtype`-rounded) inputs, with the reference at
    `dtype` as the error baseline (FlashAttention's criterion)."""
    inputs = divergence_inputs(n, hs, ht, v, dtype=dtype, bias=bias, logit_scale=logit_scale, mask_frac=mask_frac)
    grad_output = torch.randn(2 * n)[::2] if reduction == "none" else None  # non-contiguous
    call = {"beta": beta, "temperature": temperature, "reduction": reduction, "grad_output": grad_output}
    exact = oracle(inputs, torch.float64, **call)
    baseline = oracle(inputs, dtype, **call)
    actual = run(impl, (*leaves_like(inputs[:3], dtype), *inputs[3:]), **call, **kwargs)
    for name, a, e, b in zip(NAMES, actual, exact, baseline):
        if e is None:
            assert a is None, name
            continue
        assert a.shape == e.shape, name
        if name.startswith("d_"):
            assert a.dtype == dtype, f"{name} came back as {a.dtype}, not the input dtype {dtype}"
        assert torch.isfinite(a).all(), name
        assert_fa_close(a, e, b, name=name, factor=factor)
    return actual, exact


SHAPES = [
    pytest.param(1, 16, 24, 1000, id="N1-Hs16-Ht24-V1000"),
    pytest.param(37, 48, 32, 1000, id="N37-Hs48-Ht32-V1000"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("n,hs,ht,v", SHAPES)
def test_matches_fp64(impl, beta, n, hs, ht, v):
    check(impl, n, hs, ht, v, beta, mask_frac=0.2 if n > 1 else 0.0)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_temperature_and_bias(beta, temperature):
    check("triton", 29, 33, 40, 1500, beta, bias=True, temperature=temperature, logit_scale=3.0, mask_frac=0.2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0], ids=["forward-kl", "jsd0.3", "reverse-kl"])
def test_reductions(impl, reduction, beta):
    check(impl, 23, 24, 16, 700, beta, bias=True, temperature=0.8, mask_frac=0.3, reduction=reduction)


@pytest.mark.parametrize("beta", BETAS)
def test_extreme_logits(beta):
    check("triton", 21, 32, 24, 1200, beta, bias=True, logit_scale=300.0, mask_frac=0.2)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("logit_scale", [1.0, 8.0], ids=["scale1", "scale8"])
def test_fp16_error_within_twice_torch(beta, logit_scale):
    # at scale 8 most of a tile's exp(z_s - t_s) underflow in fp16, and with them the student's buffer entries
    check("triton", 37, 64, 48, 1000, beta, dtype=torch.float16, bias=True, temperature=0.7, logit_scale=logit_scale,
          mask_frac=0.1)  # fmt: skip


def test_fp16_torch_path_matches_fp64():
    check("torch", 37, 64, 48, 1000, 0.5, dtype=torch.float16, bias=True)


def test_nearly_equal_models_keep_small_divergences_accurate():
    # a student a hair away from its teacher: KL ~ 1e-5, the decomposition's difference of logsumexps must not swamp it
    s_hidden, s_weight, _, _, _, _, mask = divergence_inputs(31, 32, 32, 900, logit_scale=4.0)
    t_weight = s_weight.detach() + 1e-3 * torch.randn_like(s_weight)
    inputs = (s_hidden, s_weight, None, s_hidden.detach(), t_weight, None, mask)
    for beta in (0.0, 0.5, 1.0):
        exact = oracle(inputs, torch.float64, beta=beta)
        actual = run("triton", (*leaves_like(inputs[:3], torch.float32), *inputs[3:]), beta=beta)
        assert 0 < exact[0] < 1e-3
        assert abs(actual[0].item() - exact[0].item()) <= 1e-3 * exact[0].item(), beta
        assert max_error(actual[2], exact[2]) <= 1e-3 * exact[2].abs().max().item(), beta


@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl_chunked_divergence(beta):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask = divergence_inputs(
        3 * 13, 24, 40, 800, bias=True, mask_frac=0.25, lead=(3, 13)
    )
    ours = fused_linear_divergence(s_hidden, s_weight, t_hidden, t_weight, mask, beta=beta, temperature=0.7,
                                   student_bias=s_bias, teacher_bias=t_bias, impl="triton")  # fmt: skip
    theirs, entropy_sum, n_valid = _chunked_divergence_loss(
        s_hidden, t_hidden, s_weight, t_weight, mask.long(), beta, student_lm_head_bias=s_bias,
        teacher_lm_head_bias=t_bias, temperature=0.7,
    )  # fmt: skip
    torch.testing.assert_close(ours.loss, theirs, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(ours.entropy.sum(), entropy_sum, rtol=2e-5, atol=1e-5)
    assert ours.entropy.shape == mask.shape and n_valid.item() == mask.sum().item()
    ours_grads = torch.autograd.grad(ours.loss, (s_hidden, s_weight, s_bias))
    theirs_grads = torch.autograd.grad(theirs, (s_hidden, s_weight, s_bias))
    for name, a, b in zip(NAMES[2:], ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_are_never_read(impl):
    # the left-out rows hold NaN: nothing of them may reach the loss, the entropy or a gradient
    inputs = list(divergence_inputs(30, 16, 24, 600, mask_frac=0.4))
    mask = inputs[6]
    assert mask.any() and (~mask).any()
    inputs[0] = inputs[0].detach().masked_fill(~mask[:, None], float("nan")).requires_grad_()
    inputs[3] = inputs[3].masked_fill(~mask[:, None], float("nan"))
    for beta in (0.0, 0.5, 1.0):
        loss, entropy, d_hidden, d_weight, _ = run(impl, inputs, beta=beta)
        assert torch.isfinite(loss) and (entropy[~mask] == 0).all() and (entropy[mask] > 0).all()
        assert (d_hidden[~mask] == 0).all() and d_hidden[mask].abs().sum(-1).gt(0).all()
        assert torch.isfinite(d_weight).all()
        per_row = run(impl, inputs, beta=beta, reduction="none", grad_output=torch.ones(30))[0]
        assert (per_row[~mask] == 0).all() and (per_row[mask] > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nothing_counted(impl, reduction):
    inputs = list(divergence_inputs(6, 16, 16, 300))
    inputs[6] = torch.zeros(6, dtype=torch.bool)
    loss, entropy, d_hidden, d_weight, _ = run(impl, inputs, beta=0.5, reduction=reduction,
                                               grad_output=torch.ones(6))  # fmt: skip
    assert (loss == 0).all() and (entropy == 0).all() and (d_hidden == 0).all() and (d_weight == 0).all()
    empty = divergence_inputs(0, 16, 16, 300)
    assert run(impl, empty, beta=1.0)[0].item() == 0


@pytest.mark.parametrize("beta", BETAS)
def test_chunking_does_not_change_the_result(beta):
    inputs = divergence_inputs(41, 24, 32, 1500, bias=True, mask_frac=0.2)
    whole = run("triton", inputs, beta=beta, temperature=1.3)
    # two buffers of 7 rows of fp32: 6 chunks of the 33-ish counted rows
    chunked = run("triton", inputs, beta=beta, temperature=1.3, max_chunk_bytes=2 * 7 * 1500 * 4)
    for name, a, b in zip(NAMES, chunked, whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_jsd_second_pass_over_several_groups_of_tiles():
    # the reduction kernel sums _REDUCE_TILES forward tiles per program: V spans three groups, the last one partial
    from posttrain.kernels.fused_linear_divergence import _REDUCE_TILES, pinned_tile

    tile_v = pinned_tile(torch.float32).kwargs["BLOCK_V"]
    check("triton", 9, 16, 24, 2 * _REDUCE_TILES * tile_v + 37, 0.5, bias=True, mask_frac=0.2)


@pytest.mark.parametrize("beta", BETAS)
def test_launch_geometry_does_not_change_the_numbers(beta):
    from posttrain.kernels.fused_linear_divergence import divergence_buffers, fused_linear_divergence_fwd

    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, _ = (
        t.detach() for t in divergence_inputs(45, 24, 40, 2100, bias=True, logit_scale=3.0)
    )
    results = []
    for programs in (1, 3, 8):  # 3 row blocks; the programs decide the vocabulary splits too (2, 3 and 9)
        buffers = divergence_buffers(45, 2100, s_hidden)
        out = fused_linear_divergence_fwd(s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, beta, 0.9, buffers,
                                          num_programs=programs)  # fmt: skip
        results.append((out, buffers[0][:45].clone(), buffers[1][:45].clone()))
    first = results[0]
    for out, s_buf, t_buf in results[1:]:
        for key in ("divergence", "entropy", "lse_s", "lse_t", "aux", "tile_max_s", "tile_max_t"):
            torch.testing.assert_close(out[key], first[0][key], rtol=1e-6, atol=1e-6, msg=key)
        assert torch.equal(s_buf, first[1]) and torch.equal(t_buf, first[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_scales_by_grad_output(dtype):
    inputs = divergence_inputs(19, 32, 24, 900, dtype=dtype, bias=True, mask_frac=0.2)
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, mask = inputs
    out = fused_linear_divergence(s_hidden, s_weight, t_hidden, t_weight, mask, beta=1.0, student_bias=s_bias,
                                  teacher_bias=t_bias, impl="triton")  # fmt: skip
    unit = torch.autograd.grad(out.loss, (s_hidden, s_weight, s_bias), retain_graph=True)
    scaled = torch.autograd.grad(out.loss * 0.37, (s_hidden, s_weight, s_bias))
    for name, a, b in zip(NAMES[2:], scaled, unit):
        # computed in forward, then the fp32 product with grad_output, rounded once
        assert torch.equal(a, (b.float() * torch.tensor(0.37)).to(dtype)), name


def test_teacher_gets_no_gradient():
    inputs = list(divergence_inputs(17, 16, 24, 500, bias=True))
    teacher = [t.detach().clone().requires_grad_() for t in inputs[3:6]]
    out = fused_linear_divergence(inputs[0], inputs[1], teacher[0], teacher[1], inputs[6], beta=0.5,
                                  student_bias=inputs[2], teacher_bias=teacher[2], impl="triton")  # fmt: skip
    out.loss.backward()
    assert all(t.grad is None for t in teacher)
    assert inputs[0].grad is not None and inputs[1].grad is not None and inputs[2].grad is not None


@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_student_weight_or_hidden(frozen):
    inputs = list(divergence_inputs(20, 24, 16, 700, mask_frac=0.2))
    index = 1 if frozen == "weight" else 0
    exact = oracle(inputs, torch.float64, beta=1.0)
    inputs[index] = inputs[index].detach()
    out = fused_linear_divergence(*inputs[:2], *inputs[3:5], inputs[6], beta=1.0, impl="triton")
    saved = out.loss.grad_fn.saved_tensors
    assert saved[index] is None and saved[1 - index] is not None  # no GEMM for the frozen one's gradient
    (grad,) = torch.autograd.grad(out.loss, inputs[1 - index])
    torch.testing.assert_close(grad.double(), exact[2 + 1 - index], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_grad_call_gives_the_values_only(impl):
    inputs = divergence_inputs(25, 16, 32, 700, mask_frac=0.2)
    for beta in (0.0, 0.5, 1.0):
        with torch.no_grad():
            out = fused_linear_divergence(*inputs[:2], *inputs[3:5], inputs[6], beta=beta, impl=impl)
        assert not out.loss.requires_grad
        torch.testing.assert_close(out.loss.double(), oracle(inputs, torch.float64, beta=beta)[0], rtol=1e-5,
                                   atol=1e-7)  # fmt: skip


def test_teacher_in_another_dtype_is_cast_to_the_students():
    inputs = list(divergence_inputs(21, 32, 48, 800, bias=True, mask_frac=0.2))
    half_teacher = [t.half() for t in inputs[3:6]]
    actual = run("triton", (*inputs[:3], *half_teacher, inputs[6]), beta=0.5)
    upcast = run("torch", (*leaves_like(inputs[:3], torch.float32), *(t.float() for t in half_teacher), inputs[6]),
                 beta=0.5)  # fmt: skip
    for name, a, b in zip(NAMES, actual, upcast):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_autocast_gradients_in_the_parameters_dtype():
    inputs = divergence_inputs(16, 32, 24, 500)
    with torch.autocast(inputs[0].device.type, dtype=torch.float16):
        out = fused_linear_divergence(*inputs[:2], *inputs[3:5], inputs[6], beta=1.0, impl="triton")
    grads = torch.autograd.grad(out.loss, inputs[:2])
    assert all(g.dtype == torch.float32 for g in grads)
    # what autocast's F.linear sees: the fp16-rounded inputs
    rounded = (*leaves_like(inputs[:2], torch.float16), None, *(t.half() for t in inputs[3:5]), None, inputs[6])
    exact = oracle(rounded, torch.float64, beta=1.0)
    baseline = oracle(rounded, torch.float16, beta=1.0)
    for name, g, e, b in zip(NAMES[2:4], grads, exact[2:4], baseline[2:4]):
        assert_fa_close(g, e, b, name=name)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_non_contiguous_inputs(reduction):
    inputs = divergence_inputs(40, 32, 24, 1200, bias=True, mask_frac=0.2)
    column_major = [t.detach().t().contiguous().t() for t in (inputs[0], inputs[1], inputs[3], inputs[4])]
    assert not any(t.is_contiguous() for t in column_major)
    s_hidden, s_weight = (t.requires_grad_() for t in column_major[:2])
    call = {"beta": 0.5, "reduction": reduction, "grad_output": torch.randn(40)}
    actual = run("triton", (s_hidden, s_weight, inputs[2], column_major[2], column_major[3], inputs[5], inputs[6]),
                 **call)  # fmt: skip
    expected = run("torch", (*leaves_like(inputs[:3], torch.float32), *inputs[3:]), **call)
    for name, a, b in zip(NAMES, actual, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_leading_dimensions(impl):
    inputs = divergence_inputs(0, 16, 24, 400, mask_frac=0.3, lead=(3, 7))
    per_row = run(impl, inputs, beta=1.0, reduction="none", grad_output=torch.randn(3, 7))
    assert per_row[0].shape == (3, 7) and per_row[1].shape == (3, 7) and per_row[2].shape == (3, 7, 16)
    flat = (inputs[0].detach().reshape(21, 16).requires_grad_(), inputs[1], None, inputs[3].reshape(21, 24), inputs[4],
            None, inputs[6].reshape(21))  # fmt: skip
    mean = run(impl, inputs, beta=1.0)[0]
    torch.testing.assert_close(mean, run(impl, flat, beta=1.0)[0])


def test_float64_runs_the_torch_path_exactly():
    inputs = divergence_inputs(19, 16, 24, 500, dtype=torch.float64, bias=True, mask_frac=0.2)
    for beta in (0.0, 0.5, 1.0):
        actual = run("auto", inputs, beta=beta)
        log_p = [(torch.nn.functional.linear(h.detach(), w.detach(), b.detach()) / 1.0).log_softmax(-1)[inputs[6]]
                 for h, w, b in ((inputs[0], inputs[1], inputs[2]), (inputs[3], inputs[4], inputs[5]))]  # fmt: skip
        p_s, p_t = log_p[0].exp(), log_p[1].exp()
        m = (1 - beta) * p_s + beta * p_t
        if beta == 0.0:
            expected = (p_t * (log_p[1] - log_p[0])).sum(-1)
        elif beta == 1.0:
            expected = (p_s * (log_p[0] - log_p[1])).sum(-1)
        else:
            expected = beta * (p_t * (log_p[1] - m.log())).sum(-1) + (1 - beta) * (p_s * (log_p[0] - m.log())).sum(-1)
        torch.testing.assert_close(actual[0], expected.mean(), rtol=1e-12, atol=1e-14)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 24),
    hs=st.integers(1, 40),
    ht=st.integers(1, 40),
    v=st.integers(2, 1200),
    beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0.01, 0.99)),
    temperature=st.floats(0.25, 4.0),
    bias=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**31),
)
def test_property_random_shapes(n, hs, ht, v, beta, temperature, bias, reduction, seed):
    torch.manual_seed(seed)  # the tensors too come from hypothesis' draw, so a failure replays
    inputs = divergence_inputs(n, hs, ht, v, dtype=torch.float64, bias=bias, mask_frac=0.2)
    call = {"beta": beta, "temperature": temperature, "reduction": reduction, "grad_output": torch.randn(n)}
    exact = oracle(inputs, torch.float64, **call)
    baseline = oracle(inputs, torch.float32, **call)
    teacher = tuple(t.float() if t is not None else None for t in inputs[3:6])
    actual = run("triton", (*leaves_like(inputs[:3], torch.float32), *teacher, inputs[6]), **call)
    for name, a, e, b in zip(NAMES, actual, exact, baseline):
        if e is not None:
            assert_fa_close(a, e, b, name=name)


# --- argument errors --------------------------------------------------------------------------------------------------


def _call(**change):
    s_hidden, s_weight, _, t_hidden, t_weight, _, mask = divergence_inputs(6, 16, 24, 100)
    args = {"student_hidden": s_hidden, "student_weight": s_weight, "teacher_hidden": t_hidden,
            "teacher_weight": t_weight, "mask": mask}  # fmt: skip
    args.update(change)
    positional = [args.pop(k) for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight", "mask")]
    return fused_linear_divergence(*positional, **args)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"teacher_weight": torch.randn(120, 24)}, ValueError,
         r"share a vocabulary: student_weight \(100, 16\) and teacher_weight \(120, 24\)"),
        ({"teacher_weight": torch.randn(100, 20)}, ValueError, r"teacher_hidden's last dimension must match"),
        ({"student_hidden": torch.randn(6, 15)}, ValueError, r"student_hidden's last dimension must match"),
        ({"teacher_hidden": torch.randn(5, 24)}, ValueError, r"same leading \(row\) dimensions"),
        ({"mask": torch.ones(5, dtype=torch.bool)}, ValueError, r"mask has shape \(5,\), expected \(6,\)"),
        ({"mask": torch.ones(6)}, TypeError, "mask must be a bool .* got a torch.float32 tensor"),
        ({"student_bias": torch.randn(99)}, ValueError, r"student_bias has shape \(99,\), expected \(100,\)"),
        ({"teacher_bias": torch.randn(100, dtype=torch.float64)}, TypeError, "teacher's hidden, weight and bias must"),
        ({"beta": 1.5}, ValueError, r"beta must be a number in \[0, 1\]"),
        ({"beta": float("nan")}, ValueError, r"beta must be a number in \[0, 1\]"),
        ({"temperature": 0.0}, ValueError, "temperature must be"),
        ({"reduction": "batchmean"}, ValueError, "reduction 'batchmean' is not one of: mean, sum, none"),
        ({"max_chunk_bytes": 0}, ValueError, "max_chunk_bytes must be a positive int, got 0"),
        ({"impl": "cuda"}, ValueError, "impl 'cuda' is not one of"),
        ({"student_hidden": torch.randn(6, 16).long()}, TypeError, "student_hidden must be float32"),
    ],
    ids=["vocabulary", "teacher-width", "student-width", "rows", "mask-shape", "float-mask", "bias-shape",
         "bias-dtype", "beta-above-1", "beta-nan", "zero-temperature", "reduction", "zero-bytes", "impl",
         "integer-hidden"],
)  # fmt: skip
def test_bad_argument_errors(change, error, match):
    with pytest.raises(error, match=match):
        _call(**change)


def test_float64_with_triton_is_an_error():
    inputs = divergence_inputs(4, 8, 8, 50, dtype=torch.float64)
    with pytest.raises(TypeError, match="not float64 inputs"):
        run("triton", inputs, beta=0.5)


# --- GPU: bfloat16 (the interpreter's bf16 is broken) -----------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("n,hs,ht,v", [(37, 896, 1536, 50257), (2048, 896, 1536, 151936)],
                         ids=["N37-V50257", "N2048-V151936"])  # fmt: skip
def test_gpu_bf16_matches_fp64(beta, n, hs, ht, v):
    check("triton", n, hs, ht, v, beta, dtype=torch.bfloat16, bias=True, temperature=0.9, mask_frac=0.1,
          max_chunk_bytes=2**28)  # fmt: skip


@pytest.mark.gpu
def test_gpu_bf16_several_chunks_and_grad_output_scaling():
    inputs = divergence_inputs(300, 256, 384, 32000, dtype=torch.bfloat16, mask_frac=0.1)
    unit = run("triton", inputs, beta=0.5, max_chunk_bytes=2**23)
    s_hidden, s_weight, _, t_hidden, t_weight, _, mask = inputs
    out = fused_linear_divergence(s_hidden, s_weight, t_hidden, t_weight, mask, beta=0.5, max_chunk_bytes=2**23)
    scaled = torch.autograd.grad(out.loss * (1 / 3), (s_hidden, s_weight))
    for a, b in zip(scaled, unit[2:4]):
        assert torch.equal(a, (b.float() * torch.tensor(1 / 3)).to(torch.bfloat16))
    assert math.isfinite(unit[0].item())
