import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testing_utils import assert_fa_close

from posttrain.ops.dpo_loss import (
    F_DIVERGENCE_LOSS_TYPES,
    LOSS_SEMANTICS,
    LOSS_TYPES,
    DPOLossFunction,
    check_label_smoothing,
    dpo_loss,
    dpo_loss_ref,
)

# (f_divergence_type, f_alpha_divergence_coef) variants; alpha on both sides of 1 (the exponent changes sign)
F_DIVS = {
    "reverse_kl": ("reverse_kl", 0.5),
    "forward_kl": ("forward_kl", 0.5),
    "js": ("js_divergence", 0.5),
    "alpha0.5": ("alpha_divergence", 0.5),
    "alpha1.7": ("alpha_divergence", 1.7),
}
CASES = [
    pytest.param(loss_type, *F_DIVS[fdiv], id=f"{loss_type}-{fdiv}")
    for loss_type in LOSS_TYPES
    for fdiv in (F_DIVS if loss_type in F_DIVERGENCE_LOSS_TYPES else ["reverse_kl"])
]
# Nonzero everywhere, so a loss type that must ignore it (sigmoid, hinge, ...) is caught if it does not
LABEL_SMOOTHING = 0.2
LOGP_NAMES = ("chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps")


def _inputs(B, *, gen=None, margin=1.5, center=-40.0):
    """float32 summed log-probs [B] x 4 (reference = policy + noise of std `margin`), int64 lengths (a 0 per side)."""
    chosen = center - 20.0 * torch.rand(B, generator=gen)
    rejected = center - 20.0 * torch.rand(B, generator=gen)
    ref_chosen = chosen + margin * torch.randn(B, generator=gen)
    ref_rejected = rejected + margin * torch.randn(B, generator=gen)
    lengths = torch.randint(1, 60, (2, B), generator=gen)
    lengths[0, 0] = lengths[1, -1] = 0  # an empty completion counts as 1 token
    return (chosen, rejected, ref_chosen, ref_rejected), (lengths[0], lengths[1])


def _run(impl, logps, lengths, grad_out, dtype, *, ref_grads=False, **kwargs):
    """Loss and gradients of sum(grad_out * loss) w.r.t. chosen, rejected (and the references with ref_grads)."""
    leaves = [t.detach().to(dtype).requires_grad_(i < 2 or ref_grads) for i, t in enumerate(logps)]
    loss = dpo_loss(*leaves, chosen_lengths=lengths[0], rejected_lengths=lengths[1], impl=impl, **kwargs)
    # sft does not read rejected_logps: its gradient is zero
    grads = torch.autograd.grad(
        (loss * grad_out.to(loss.dtype)).sum(), [t for t in leaves if t.requires_grad], materialize_grads=True
    )
    return [loss, *grads]


def _check(B, *, gen=None, margin=1.5, center=-40.0, ref_grads=False, atol=1e-6, **kwargs):
    """Triton (fp32) against the float64 reference, with the fp32 torch reference as the error baseline."""
    logps, lengths = _inputs(B, gen=gen, margin=margin, center=center)
    grad_out = torch.randn(B, generator=gen, dtype=torch.float64)
    exact = _run("torch", logps, lengths, grad_out, torch.float64, ref_grads=ref_grads, **kwargs)
    baseline = _run("torch", logps, lengths, grad_out, torch.float32, ref_grads=ref_grads, **kwargs)
    actual = _run("triton", logps, lengths, grad_out, torch.float32, ref_grads=ref_grads, **kwargs)
    names = ("loss", "d_chosen", "d_rejected", "d_ref_chosen", "d_ref_rejected")
    for name, a, e, b in zip(names[: len(actual)], actual, exact, baseline, strict=True):
        assert a.shape == (B,) and a.dtype == torch.float32, name
        assert torch.isfinite(a).all() and torch.isfinite(e).all(), name
        assert_fa_close(a, e, b, name=name, atol=atol)
        torch.testing.assert_close(b, e.float(), rtol=2e-5, atol=2e-5 * max(1.0, e.abs().max().item()))
    return actual, exact


@pytest.mark.parametrize("B", [1, 7, 33], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("loss_type,f_divergence_type,alpha", CASES)
def test_matches_fp64(loss_type, f_divergence_type, alpha, B):
    actual, _ = _check(
        B, beta=0.7, loss_type=loss_type, label_smoothing=LABEL_SMOOTHING, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=alpha, discopop_tau=0.3,
    )  # fmt: skip
    if B > 1 and loss_type != "sft":  # losses and gradients really vary over the batch
        assert all(t.std() > 0 for t in actual)


@pytest.mark.parametrize("loss_type", ["sigmoid_norm", "apo_down", "aot"])
def test_several_programs(loss_type):
    """A batch over several 1024-pair programs, the last one partial."""
    _check(2100, beta=0.3, loss_type=loss_type, label_smoothing=LABEL_SMOOTHING, f_divergence_type="reverse_kl")


# ---------------------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16's own DPOTrainer._compute_loss, called on a stand-in trainer and model


class _StubModel:
    """Stands in for the policy: returns the given per-token log-probs (0 outside the completions) and zero stats."""

    training = True

    def __init__(self, per_token_logps):
        self.per_token_logps = per_token_logps

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token_logps.detach())
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None
        )


def _trl_loss(per_token_logps, completion_mask, ref_chosen, ref_rejected, *, loss_type, beta, label_smoothing,
              f_divergence_type, alpha, tau):  # fmt: skip
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    model = _StubModel(per_token_logps)
    trainer = SimpleNamespace(
        model=model,
        accelerator=SimpleNamespace(device=per_token_logps.device, gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, use_weighting=False,
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=alpha, args=SimpleNamespace(discopop_tau=tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    n_rows, seq = completion_mask.shape
    inputs = {
        "input_ids": torch.randint(0, 100, (n_rows, seq)),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    return trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False)


def _trl_batch(B, T, dtype):
    """A [chosen; rejected] batch of 2B rows: prompt of 1-3 tokens, then a completion of 1.. tokens, then padding."""
    completion_mask = torch.zeros(2 * B, T, dtype=torch.int64)
    for row in range(2 * B):
        start = int(torch.randint(1, 4, ()))
        completion_mask[row, start : start + int(torch.randint(1, T - start + 1, ()))] = 1
    per_token = (-3.0 * torch.rand(2 * B, T - 1)).to(dtype).requires_grad_()
    ref_logps = (per_token.detach() * completion_mask[:, 1:]).sum(1) + 2.0 * torch.randn(2 * B, dtype=dtype)
    return completion_mask, per_token, ref_logps.chunk(2)


@pytest.mark.parametrize("loss_type,f_divergence_type,alpha", CASES)
def test_matches_trl(loss_type, f_divergence_type, alpha):
    """TRL's mean loss and its gradient w.r.t. every per-token log-prob, against ours on the same graph.

    float64 (TRL's alpha-divergence only knows the fp32 / low-precision clamps, so that one runs in float32).
    """
    dtype = torch.float32 if f_divergence_type == "alpha_divergence" else torch.float64
    B = 6
    completion_mask, per_token, (ref_chosen, ref_rejected) = _trl_batch(B, 10, dtype)
    options = dict(
        beta=0.6, loss_type=loss_type, label_smoothing=LABEL_SMOOTHING, f_divergence_type=f_divergence_type,
        discopop_tau=0.2,
    )  # fmt: skip
    trl_options = {**options, "alpha": alpha, "tau": options["discopop_tau"]}
    del trl_options["discopop_tau"]
    shift_mask = completion_mask[:, 1:]
    trl_loss = _trl_loss(per_token * shift_mask, completion_mask, ref_chosen, ref_rejected, **trl_options)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)
    assert torch.isfinite(trl_loss) and trl_grad.abs().sum() > 0

    lengths = completion_mask.sum(1).chunk(2)
    for impl in ("torch", "triton"):
        chosen, rejected = (per_token * shift_mask).sum(1).chunk(2)
        ours_dtype = dtype if impl == "torch" else torch.float32
        loss = dpo_loss(
            chosen.to(ours_dtype), rejected.to(ours_dtype), ref_chosen.to(ours_dtype), ref_rejected.to(ours_dtype),
            f_alpha_divergence_coef=alpha, chosen_lengths=lengths[0], rejected_lengths=lengths[1], impl=impl,
            **options,
        ).mean()  # fmt: skip
        (grad,) = torch.autograd.grad(loss, per_token)
        tol = 1e-12 if ours_dtype == torch.float64 else 2e-6
        if loss_type == "exo_pair" and ours_dtype == torch.float64:
            tol = 1e-7  # TRL takes log(eps) and log(1 - eps) of a float32 tensor whatever the inputs' dtype
        torch.testing.assert_close(loss.to(dtype), trl_loss, rtol=tol, atol=tol, msg=f"{impl} loss")
        torch.testing.assert_close(grad, trl_grad, rtol=tol, atol=tol, msg=f"{impl} gradient")


# ---------------------------------------------------------------------------------------------------------------------
# Numerics and layouts

EXTREME_CASES = [
    pytest.param(lt, fd, id=f"{lt}-{fd}")
    for lt in LOSS_TYPES
    for fd in (["reverse_kl", "js_divergence"] if lt in F_DIVERGENCE_LOSS_TYPES else ["reverse_kl"])
]


@pytest.mark.parametrize("loss_type,f_divergence_type", EXTREME_CASES)
def test_extreme_values(loss_type, f_divergence_type):
    """Log-probs around -1e3 and log-ratios of +-50..150 at beta 1: every sigmoid saturates, nothing overflows.

    (forward_kl and alpha_divergence are left out: their scores grow like e^|log-ratio| and genuinely overflow fp32,
    in TRL exactly as here.) discopop with a large negative margin is nan in TRL's inf * 0 product, finite here.
    """
    B = 33
    sign = torch.where(torch.rand(2, B) < 0.5, -1.0, 1.0)
    logps = -1000.0 + 10.0 * torch.randn(4, B)
    logps[2:] = logps[:2] - sign * (50.0 + 100.0 * torch.rand(2, B))
    lengths = torch.randint(1, 4, (2, B))
    grad_out = torch.randn(B, dtype=torch.float64)
    kwargs = dict(
        beta=1.0, loss_type=loss_type, label_smoothing=LABEL_SMOOTHING, f_divergence_type=f_divergence_type,
    )  # fmt: skip
    exact = _run("torch", logps, lengths, grad_out, torch.float64, **kwargs)
    baseline = _run("torch", logps, lengths, grad_out, torch.float32, **kwargs)
    actual = _run("triton", logps, lengths, grad_out, torch.float32, **kwargs)
    for name, a, e, b in zip(("loss", "d_chosen", "d_rejected"), actual, exact, baseline, strict=True):
        assert torch.isfinite(a).all() and torch.isfinite(b).all(), name
        assert_fa_close(a, e, b, name=name)


def test_discopop_large_negative_margin_is_finite():
    # z = beta * margin = -200: TRL's exp(200) * sigmoid(-4000) is inf * 0; the loss is really ~200 with slope -1
    chosen = torch.full((3,), -500.0, requires_grad=True)
    rejected = torch.tensor([-300.0, -310.0, -320.0], requires_grad=True)
    ref = torch.full((3,), -400.0)
    loss = dpo_loss(chosen, rejected, ref, ref, beta=1.0, loss_type="discopop", impl="triton")
    loss.sum().backward()
    torch.testing.assert_close(loss, torch.tensor([200.0, 190.0, 180.0]))
    torch.testing.assert_close(chosen.grad, torch.full((3,), -1.0))


@pytest.mark.parametrize(
    "loss_type,f_divergence_type",
    [
        ("sigmoid", "forward_kl"),
        ("ipo", "reverse_kl"),
        ("aot", "reverse_kl"),
        ("aot_unpaired", "reverse_kl"),
        ("sppo_hard", "reverse_kl"),
        ("exo_pair", "js_divergence"),
    ],
    ids=lambda v: v,
)
def test_non_contiguous(loss_type, f_divergence_type):
    """Strided log-probs and lengths (columns of a [B, 2] tensor) and a strided / stride-0 grad_output."""
    B = 9
    logps, lengths = _inputs(B)
    kwargs = dict(beta=0.5, loss_type=loss_type, label_smoothing=0.1, f_divergence_type=f_divergence_type)

    def run(strided, grad_out):
        leaves = [t.clone().requires_grad_() for t in logps]
        args, lens = leaves, lengths
        if strided:
            args = [torch.stack([t, torch.randn(B)], dim=1)[:, 0] for t in leaves]
            lens = [torch.stack([t, torch.randint(0, 9, (B,))], dim=1)[:, 0] for t in lengths]
            assert not args[0].is_contiguous() and not lens[0].is_contiguous()
        loss = dpo_loss(*args, chosen_lengths=lens[0], rejected_lengths=lens[1], impl="triton", **kwargs)
        loss.backward(grad_out)
        return [loss, *(t.grad for t in leaves)]

    for grad_out in (torch.randn(2 * B)[::2], torch.full((), 0.3).expand(B)):
        expected = run(False, grad_out.contiguous())
        for a, e in zip(run(True, grad_out), expected, strict=True):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert expected[1].abs().sum() > 0


def test_reference_gradients():
    """Gradients reach the reference log-probs too when they require grad (TRL detaches them)."""
    for loss_type, f_div in (("sigmoid", "forward_kl"), ("ipo", "js_divergence"), ("aot", "reverse_kl"),
                             ("apo_down", "reverse_kl")):  # fmt: skip
        _check(11, ref_grads=True, beta=0.4, loss_type=loss_type, f_divergence_type=f_div)


def test_alpha_divergence_clamp_and_limit():
    """alpha = 3 with log-ratios above 40 hits TRL's exponent clamp at 80: the scores saturate, and get no gradient.
    alpha -> 1 is reverse_kl."""
    logps, _ = _inputs(8)
    chosen, rejected, ref_chosen, ref_rejected = (t.clone() for t in logps)
    # both sides of the first three pairs clamp to the same score: margin 0, loss log 2, but zero gradient
    ref_chosen[:3] = chosen[:3] - torch.tensor([41.0, 45.0, 60.0])
    ref_rejected[:3] = rejected[:3] - torch.tensor([50.0, 42.0, 70.0])
    kwargs = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=3.0, beta=0.7)
    c, r = chosen.clone().requires_grad_(), rejected.clone().requires_grad_()
    loss = dpo_loss(c, r, ref_chosen, ref_rejected, impl="triton", **kwargs)
    loss.sum().backward()
    expected = dpo_loss_ref(chosen.double(), rejected, ref_chosen, ref_rejected, **kwargs)
    torch.testing.assert_close(loss, expected.float())
    torch.testing.assert_close(loss[:3], torch.full((3,), math.log(2.0)))
    for grad in (c.grad, r.grad):
        assert (grad[:3] == 0).all() and (grad[3:] != 0).all()

    near_one = dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0 + 1e-7)
    for impl in ("torch", "triton"):
        torch.testing.assert_close(
            dpo_loss(*logps, loss_type="robust", label_smoothing=0.1, impl=impl, **near_one),
            dpo_loss(*logps, loss_type="robust", label_smoothing=0.1, impl=impl),
            rtol=0,
            atol=0,
        )


def test_aot_is_a_function_of_the_sorted_batch():
    """aot's k-th output pairs the k-th smallest policy and reference margins: permuting the pairs changes nothing,
    and the gradients follow the pairs."""
    logps, _ = _inputs(13)
    perm = torch.randperm(13)
    for loss_type in ("aot", "aot_unpaired"):
        outs = []
        for order in (torch.arange(13), perm):
            leaves = [t[order].clone().requires_grad_() for t in logps[:2]]
            loss = dpo_loss(*leaves, *(t[order] for t in logps[2:]), beta=0.5, loss_type=loss_type, impl="triton")
            (loss * torch.linspace(0.5, 1.5, 13)).sum().backward()
            outs.append((loss, leaves[0].grad, order))
        (l0, g0, _), (l1, g1, order) = outs
        torch.testing.assert_close(l1, l0, rtol=0, atol=0)
        torch.testing.assert_close(g1, g0[order], rtol=0, atol=0)
        assert not torch.allclose(l0, dpo_loss(*logps, beta=0.5, loss_type="sigmoid", impl="triton"))


def test_sft_is_the_token_mean_nll_of_the_chosen():
    logps, lengths = _inputs(5)
    chosen = logps[0].clone().requires_grad_()
    loss = dpo_loss(chosen, *logps[1:], loss_type="sft", chosen_lengths=lengths[0], impl="triton")
    expected = -logps[0].sum() / lengths[0].sum()
    torch.testing.assert_close(loss, expected.expand(5))
    loss.mean().backward()
    torch.testing.assert_close(chosen.grad, (-1.0 / lengths[0].sum()).expand(5).float())
    zero = dpo_loss(*logps, loss_type="sft", chosen_lengths=torch.zeros(5, dtype=torch.int64))
    assert torch.isfinite(zero).all()


def test_low_precision_inputs_and_dtypes():
    """float16 log-probs (policy) next to float32 references: fp32 math and output, gradients in float16."""
    logps, lengths = _inputs(10, center=-8.0)
    half = [t.half().requires_grad_() for t in logps[:2]]
    for impl in ("torch", "triton"):
        for h in half:
            h.grad = None
        loss = dpo_loss(*half, *logps[2:], loss_type="ipo", chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                        beta=0.3, impl=impl)  # fmt: skip
        loss.sum().backward()
        assert loss.dtype == torch.float32 and half[0].grad.dtype == torch.float16
        expected = dpo_loss_ref(*(t.detach().double() for t in half), *logps[2:], loss_type="ipo", beta=0.3,
                                chosen_lengths=lengths[0], rejected_lengths=lengths[1])  # fmt: skip
        torch.testing.assert_close(loss, expected.float())


def test_float64_goes_to_the_reference():
    logps, _ = _inputs(4)
    logps64 = [t.double() for t in logps]
    assert dpo_loss(*logps64).dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        dpo_loss(*logps64, impl="triton")


def test_empty_batch():
    logps = [torch.empty(0, requires_grad=True) for _ in range(4)]
    for loss_type in ("sigmoid", "aot"):
        loss = dpo_loss(*logps, loss_type=loss_type, impl="triton")
        assert loss.shape == (0,)
        loss.sum().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type,f_divergence_type,alpha", CASES[::3])
def test_bfloat16_on_gpu(loss_type, f_divergence_type, alpha):
    logps, lengths = _inputs(257)
    logps = [t.cuda() for t in logps]
    lengths = [t.cuda() for t in lengths]
    grad_out = torch.randn(257, dtype=torch.float64, device="cuda")
    kwargs = dict(beta=0.7, loss_type=loss_type, label_smoothing=LABEL_SMOOTHING, f_divergence_type=f_divergence_type,
                  f_alpha_divergence_coef=alpha)  # fmt: skip
    exact = _run("torch", [t.bfloat16() for t in logps], lengths, grad_out, torch.float64, **kwargs)
    baseline = _run("torch", logps, lengths, grad_out, torch.bfloat16, **kwargs)
    actual = _run("triton", logps, lengths, grad_out, torch.bfloat16, **kwargs)
    for name, a, e, b in zip(("loss", "d_chosen", "d_rejected"), actual, exact, baseline, strict=True):
        # the gradients come back rounded to bfloat16: allow one bf16 ulp at the gradients' scale
        assert_fa_close(a, e, b, name=name, atol=1e-5 if name == "loss" else 8e-3)


# ---------------------------------------------------------------------------------------------------------------------
# Property test


@st.composite
def _configs(draw):
    loss_type = draw(st.sampled_from(LOSS_TYPES))
    fdiv = draw(st.sampled_from(sorted(F_DIVS) if loss_type in F_DIVERGENCE_LOSS_TYPES else ["reverse_kl"]))
    return dict(
        B=draw(st.integers(1, 70)),
        beta=draw(st.floats(0.02, 5.0)),
        loss_type=loss_type,
        f_divergence_type=F_DIVS[fdiv][0],
        f_alpha_divergence_coef=F_DIVS[fdiv][1],
        label_smoothing=draw(st.floats(0.001, 0.45)),
        # tau < 1: above, discopop's e^-z sigma(z / tau) grows like e^(-z (1 - 1/tau)) and truly overflows fp32
        discopop_tau=draw(st.floats(0.02, 0.9)),
        margin=draw(st.floats(0.1, 3.0)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_configs())
def test_property_random_batches(config):
    config = dict(config)
    gen = torch.Generator(device=torch.get_default_device()).manual_seed(config.pop("seed"))
    # A looser slack than test_matches_fp64's: where a steep loss (discopop at small tau, ipo at small beta) meets a
    # small margin between two large f-divergence scores, one rounding of a score, amplified, is the whole max error,
    # and the two fp32 implementations round it differently. Logic errors are orders of magnitude above this.
    _check(config.pop("B"), gen=gen, margin=config.pop("margin"), atol=1e-5, **config)


# ---------------------------------------------------------------------------------------------------------------------
# Argument errors


def _good(B=4):
    logps, lengths = _inputs(B)
    return list(logps), dict(chosen_lengths=lengths[0], rejected_lengths=lengths[1])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(loss_type="sigmod"), ValueError, r"loss_type 'sigmod' is not one of: sigmoid, hinge, .*, sigmoid_norm$"),
        (dict(loss_type=["sigmoid"]), ValueError, r"loss_type \['sigmoid'\] is not one of"),
        (dict(f_divergence_type="kl"), ValueError, r"f_divergence_type 'kl' is not one of: reverse_kl, forward_kl"),
        (
            dict(loss_type="nca_pair", f_divergence_type="js_divergence"),
            ValueError,
            r"f_divergence_type 'js_divergence' needs .*loss_type 'nca_pair' only supports 'reverse_kl'",
        ),
        (
            dict(loss_type="robust", label_smoothing=0.5),
            ValueError,
            r"label_smoothing must lie in \[0.0, 0.5\) for loss_type 'robust', got 0.5",
        ),
        (dict(loss_type="aot", label_smoothing=-0.1), ValueError, r"label_smoothing .* 'aot', got -0.1"),
        (
            dict(loss_type="exo_pair", label_smoothing=0.0),
            ValueError,
            r"label_smoothing must lie in \(0.0, 0.5\) for loss_type 'exo_pair', got 0.0",
        ),
        (dict(beta=0.0), ValueError, r"beta must be a finite number > 0, got 0.0"),
        (dict(beta=float("nan")), ValueError, r"beta must be a finite number > 0, got nan"),
        (dict(loss_type="discopop", discopop_tau=-1.0), ValueError, r"discopop_tau must be .* got -1.0"),
        (
            dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("inf")),
            ValueError,
            r"f_alpha_divergence_coef must be a finite number, got inf",
        ),
        (dict(impl="cuda"), ValueError, r"impl 'cuda' is not one of: auto, triton, torch"),
    ],
    ids=[
        "loss_type",
        "loss_type_list",
        "f_divergence",
        "f_div_not_for_loss",
        "robust_smoothing",
        "aot_smoothing",
        "exo_smoothing",
        "beta_zero",
        "beta_nan",
        "tau",
        "alpha",
        "impl",
    ],
)
def test_bad_options(kwargs, error, match):
    logps, lengths = _good()
    with pytest.raises(error, match=match):
        dpo_loss(*logps, **lengths, **kwargs)


def test_label_smoothing_ignored_where_unused():
    logps, _ = _good()
    # TRL does not read label_smoothing for these, so out-of-range values are no error (and change nothing)
    for loss_type in ("sigmoid", "hinge", "bco_pair"):
        torch.testing.assert_close(
            dpo_loss(*logps, loss_type=loss_type, label_smoothing=0.9), dpo_loss(*logps, loss_type=loss_type)
        )


@pytest.mark.parametrize("loss_type,missing", [("ipo", "rejected_lengths"), ("sigmoid_norm", "chosen_lengths"),
                                               ("sft", "chosen_lengths")])  # fmt: skip
def test_missing_lengths(loss_type, missing):
    logps, lengths = _good()
    lengths[missing] = None
    with pytest.raises(ValueError, match=rf"loss_type '{loss_type}' needs {missing} .*got None"):
        dpo_loss(*logps, **lengths, loss_type=loss_type)


@pytest.mark.parametrize("index", range(4), ids=lambda i: LOGP_NAMES[i])
def test_bad_shapes_and_dtypes(index):
    name = LOGP_NAMES[index]
    logps, _ = _good()
    if index > 0:
        bad = list(logps)
        bad[index] = torch.randn(5)
        with pytest.raises(ValueError, match=rf"{name} has shape \(5,\), expected \(4,\)"):
            dpo_loss(*bad)
    bad = list(logps)
    bad[index] = torch.randn(4, 1)
    with pytest.raises(ValueError, match=rf"{name} must be 1-D, got shape \(4, 1\)"):
        dpo_loss(*bad)
    bad[index] = torch.randint(-9, 0, (4,))
    with pytest.raises(TypeError, match=rf"{name} must be float32, bfloat16 or float16.*got torch.int64"):
        dpo_loss(*bad)
    bad[index] = torch.randn(4, device="meta")
    with pytest.raises(ValueError, match=rf"inputs must be on one device, .*{name} on meta"):
        dpo_loss(*bad)


def test_bad_lengths():
    logps, lengths = _good()
    with pytest.raises(ValueError, match=r"rejected_lengths has shape \(3,\), expected \(4,\)"):
        dpo_loss(*logps, loss_type="ipo", chosen_lengths=lengths["chosen_lengths"], rejected_lengths=torch.ones(3))
    with pytest.raises(TypeError, match=r"chosen_lengths must be an integer or float torch.Tensor, got torch.bool"):
        dpo_loss(*logps, loss_type="sft", chosen_lengths=torch.ones(4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"chosen_lengths must be an integer or float torch.Tensor, got list"):
        dpo_loss(*logps, loss_type="sft", chosen_lengths=[1, 2, 3, 4])


def test_exo_pair_at_zero_margin():
    # A closed form guarding the reference too: with u = v the loss is log(1/2) - (log(1 - eps) + log(eps)) / 2
    policy, ref = -50.0 * torch.rand(5), -50.0 * torch.rand(5)
    for eps in (1e-3, 0.3):
        for impl in ("torch", "triton"):
            loss = dpo_loss(policy, policy, ref, ref, loss_type="exo_pair", label_smoothing=eps, impl=impl)
            expected = math.log(0.5) - 0.5 * (math.log1p(-eps) + math.log(eps))
            torch.testing.assert_close(loss, torch.full((5,), expected))


# ---------------------------------------------------------------------------------------------------------------------
# The one table of loss semantics


def test_every_loss_type_has_a_kernel_mode_or_runs_in_torch():
    from posttrain.kernels.dpo_loss import KERNEL_MODES

    assert LOSS_TYPES == tuple(LOSS_SEMANTICS)
    for loss_type, row in LOSS_SEMANTICS.items():
        assert row.kernel_mode in KERNEL_MODES or (row.kernel_mode is None and loss_type == "sft"), loss_type
    assert set(KERNEL_MODES) == {row.kernel_mode for row in LOSS_SEMANTICS.values()} - {None}


@pytest.mark.parametrize("loss_type", [t for t, row in LOSS_SEMANTICS.items() if row.label_smoothing is not None])
def test_label_smoothing_range_is_one_check(loss_type):
    """dpo_loss and DPOConfig accept and reject exactly the table's interval, with the same message."""
    from posttrain.configs.dpo import DPOConfig

    low, high, low_inclusive = LOSS_SEMANTICS[loss_type].label_smoothing
    logps, lengths = _good()
    for value, ok in ((low, low_inclusive), ((low + high) / 2, True), (high, False), (low - 0.1, False)):
        if ok:
            dpo_loss(*logps, **lengths, loss_type=loss_type, label_smoothing=value)
            check_label_smoothing(loss_type, value)
            continue
        with pytest.raises(ValueError) as op_error:
            dpo_loss(*logps, **lengths, loss_type=loss_type, label_smoothing=value)
        with pytest.raises(ValueError) as config_error:
            DPOConfig("unused", loss_type=[loss_type], label_smoothing=value, use_cpu=True, report_to=[])
        assert str(op_error.value) == str(config_error.value)
        assert f"for loss_type {loss_type!r}, got {value!r}" in str(op_error.value)


def test_cdpo_kernel_mode_is_the_smoothed_sigmoid_and_sigmoid_reads_no_smoothing():
    """The kernels' "cdpo" mode (aot's) applies label smoothing; "sigmoid" ignores it whatever it is given."""
    logps, _ = _inputs(9)
    u, v = logps[0] - logps[2], logps[1] - logps[3]
    z = 0.5 * (u - v)
    for mode, expected in (("cdpo", 0.7 * F.softplus(-z) + 0.3 * F.softplus(z)), ("sigmoid", F.softplus(-z))):
        loss = DPOLossFunction.apply(*logps, None, None, mode, "reverse_kl", 0.5, 0.3, 0.5, 0.05)
        torch.testing.assert_close(loss, expected, msg=mode)
    with pytest.raises(ValueError, match="mode 'sigmoid_norm' is not one of the kernels'"):
        DPOLossFunction.apply(*logps, None, None, "sigmoid_norm", "reverse_kl", 0.5, 0.0, 0.5, 0.05)
