"""posttrain.ops.grpo_loss: Triton kernels vs the torch reference vs float64 vs TRL 1.16's GRPOTrainer._compute_loss."""

import math
from collections import defaultdict
from types import SimpleNamespace

import posttrain.kernels.grpo as grpo_kernels
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.ops.grpo_loss import LOSS_TYPES, GRPOLossMetrics, grpo_loss

LEVELS = ("token", "sequence")


def _inputs(B, T, spread=0.3, mask_dtype=torch.bool):
    """Random log-probs with old / ref log-probs `spread` away (ratios both inside and outside the clip range)."""
    logps = -torch.rand(B, T) * 3 - 0.01
    old = logps + spread * torch.randn(B, T)
    ref = logps + spread * torch.randn(B, T)
    advantages = torch.randn(B)
    mask = torch.rand(B, T) < 0.8
    mask[:, 0] = True
    if B > 2:
        mask[1] = False  # a fully masked row
    return logps, old, ref, advantages, mask.to(mask_dtype)


def _run(impl, logps, old, advantages, mask, **kw):
    """(loss, d loss / d logps, metrics) of one implementation, on a fresh leaf of logps' values."""
    leaf = logps.detach().clone().requires_grad_()
    loss, metrics = grpo_loss(leaf, old, advantages, mask, impl=impl, return_metrics=True, **kw)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def _assert_oracle(out, ref32, ref64, what):
    """Triton's error vs float64 is at most ~2x the float32 torch reference's (plus a float32 ulp floor)."""
    torch.testing.assert_close(out.double(), ref32.double(), rtol=1e-5, atol=1e-6, msg=what)
    err = (out.double() - ref64).abs().max().item()
    base = (ref32.double() - ref64).abs().max().item()
    assert err <= 2 * base + 2e-7 * (1 + ref64.abs().max().item()), (what, err, base)


def _assert_metrics_equal(got: GRPOLossMetrics, expected: GRPOLossMetrics):
    for name, a, b in zip(GRPOLossMetrics._fields, got, expected):
        if b is None:
            assert a is None, name
        else:
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-6, msg=name)


def _check_all(logps, old, advantages, mask, **kw):
    loss, grad, metrics = _run("triton", logps, old, advantages, mask, **kw)
    loss32, grad32, metrics32 = _run("torch", logps, old, advantages, mask, **kw)
    old64 = old.double() if old is not None else None
    kw64 = {**kw, "ref_logps": kw["ref_logps"].double()} if kw.get("ref_logps") is not None else kw
    loss64, grad64, _ = _run("torch", logps.double(), old64, advantages.double(), mask, **kw64)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == logps.dtype and grad.shape == logps.shape
    _assert_oracle(loss, loss32, loss64, "loss")
    _assert_oracle(grad, grad32, grad64, "grad")
    _assert_metrics_equal(metrics, metrics32)
    return loss, grad, metrics


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type(loss_type, level):
    logps, old, ref, advantages, mask = _inputs(6, 13)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, max_completion_length=16, epsilon_high=0.28)
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1  # ScaleRL's eps_max is a bound on the ratio itself
    _, grad, _ = _check_all(logps, old, advantages, mask, ref_logps=ref, **kw)
    assert grad.abs().sum() > 0
    assert (grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("bias_correction", [True, False], ids=["bias_corrected", "plain_kl"])
@pytest.mark.parametrize("loss_type", ["grpo", "cispo", "sapo"])
def test_kl_penalty(loss_type, bias_correction, level):
    logps, old, ref, advantages, mask = _inputs(6, 13)
    kw = dict(loss_type=loss_type, importance_sampling_level=level, use_bias_correction_kl=bias_correction)
    loss, grad, metrics = _check_all(logps, old, advantages, mask, ref_logps=ref, beta=0.1, **kw)
    assert metrics.kl is not None and (metrics.kl >= 0).all()
    loss0, grad0, metrics0 = _run("triton", logps, old, advantages, mask, **kw)
    assert metrics0.kl is None
    assert not torch.allclose(loss, loss0) and not torch.allclose(grad, grad0)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "luspo"])
def test_two_sided_clipping_delta(loss_type, level):
    logps, old, _, advantages, mask = _inputs(6, 13, spread=1.0)
    advantages = advantages.abs() * torch.tensor([1.0, -1.0]).repeat(3)  # delta only caps negative advantages
    kw = dict(loss_type=loss_type, importance_sampling_level=level)
    loss, _, _ = _check_all(logps, old, advantages, mask, delta=1.5, **kw)
    loss_no_delta, _, _ = _run("triton", logps, old, advantages, mask, **kw)
    if level == "token":  # with a spread of 1, some ratios exceed delta where the advantage is negative
        assert not torch.allclose(loss, loss_no_delta)


@pytest.mark.parametrize("T", [1, 13, 37])
@pytest.mark.parametrize("B", [2, 6, 18])
def test_shapes(B, T):
    logps, old, ref, advantages, mask = _inputs(B, T)
    for level in LEVELS:
        _check_all(logps, old, advantages, mask, ref_logps=ref, beta=0.05, importance_sampling_level=level)


@pytest.mark.parametrize("level", LEVELS)
def test_token_tiles(monkeypatch, level):
    # rows longer than one tile: the sequence level's two sweeps and the row sums span several tiles with a tail
    monkeypatch.setattr(grpo_kernels, "_block_t", lambda T, block_t: 16)
    logps, old, ref, advantages, mask = _inputs(4, 37)
    for loss_type in ("grpo", "cispo"):
        _check_all(logps, old, advantages, mask, ref_logps=ref, beta=0.1, loss_type=loss_type,
                   importance_sampling_level=level)  # fmt: skip


@pytest.mark.parametrize("level", LEVELS)
def test_on_policy(level):
    # old_logps None: ratio 1 everywhere, but still differentiable; grpo's loss is then -mean(advantages)
    logps, _, _, advantages, mask = _inputs(6, 13)
    loss, grad, metrics = _check_all(logps, None, advantages, mask, loss_type="grpo", importance_sampling_level=level)
    scored = mask.any(dim=1)
    torch.testing.assert_close(loss, -(advantages * scored).mean())
    expected = -advantages[:, None] * mask / mask.sum(dim=1, keepdim=True).clamp(min=1) / mask.shape[0]
    torch.testing.assert_close(grad, expected)
    assert metrics.clip_region.sum() == 0


def test_mask_dtypes_and_weights():
    logps, old, ref, advantages, mask = _inputs(6, 13)
    kw = dict(ref_logps=ref, beta=0.1, loss_type="bnpo")
    loss_bool, grad_bool, _ = _run("triton", logps, old, advantages, mask, **kw)
    for dtype in (torch.long, torch.int32, torch.float32):
        loss, grad, _ = _run("triton", logps, old, advantages, mask.to(dtype), **kw)
        torch.testing.assert_close(loss, loss_bool)
        torch.testing.assert_close(grad, grad_bool)
    # float masks weight the tokens, as TRL's per_token_loss * mask
    weights = mask * torch.rand(6, 13)
    _check_all(logps, old, advantages, weights, **kw)


def test_strided_inputs():
    logps, old, ref, advantages, mask = _inputs(6, 26)
    leaf = logps.clone().requires_grad_()
    args = (leaf[:, ::2], old[:, 1::2], advantages, mask[:, ::2])
    kw = dict(ref_logps=ref.t().contiguous().t()[:, ::2], beta=0.1, importance_sampling_level="sequence")
    assert not args[0].is_contiguous() and not args[1].is_contiguous()
    loss = grpo_loss(*args, impl="triton", **kw)
    (grad,) = torch.autograd.grad(loss, leaf)
    leaf_ref = logps.clone().requires_grad_()
    loss_ref = grpo_loss(leaf_ref[:, ::2], *args[1:], impl="torch", **kw)
    (grad_ref,) = torch.autograd.grad(loss_ref, leaf_ref)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(grad, grad_ref)
    assert (grad[:, 1::2] == 0).all()


def test_extreme_ratios():
    logps, _, _, advantages, mask = _inputs(6, 13)
    old = logps + 20 * torch.randn(6, 13)  # ratios from about e^-60 to e^60
    for loss_type in LOSS_TYPES:
        kw = dict(loss_type=loss_type, max_completion_length=13, delta=3.0)
        loss, grad, _ = _run("triton", logps, old, advantages, mask, **kw)
        loss_ref, grad_ref, _ = _run("torch", logps, old, advantages, mask, **kw)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


def test_half_precision_logps():
    logps, old, ref, advantages, mask = _inputs(6, 13)
    logps = logps.half()
    loss, grad, _ = _run("triton", logps, old, advantages, mask, ref_logps=ref, beta=0.1)
    loss_ref, grad_ref, _ = _run("torch", logps, old, advantages, mask, ref_logps=ref, beta=0.1)
    assert grad.dtype == torch.float16
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("weight_shape", ["per_token", "per_sequence"])
def test_policy_weights(loss_type, level, weight_shape):
    """policy_weights scale each token's policy term but not its KL term (TRL's entropy / off-policy masks and vLLM
    importance ratios)."""
    logps, old, ref, advantages, mask = _inputs(6, 13)
    weights = torch.rand(6, 13 if weight_shape == "per_token" else 1)
    weights[weights < 0.3] = 0.0
    kw = dict(ref_logps=ref, beta=0.05, loss_type=loss_type, importance_sampling_level=level, max_completion_length=16)
    if loss_type == "cispo":
        kw["epsilon_high"] = 1.1
    _check_all(logps, old, advantages, mask, policy_weights=weights, **kw)
    ones = grpo_loss(logps, old, advantages, mask, policy_weights=torch.ones(6, 13), **kw)
    torch.testing.assert_close(ones, grpo_loss(logps, old, advantages, mask, **kw))
    # zero weights leave only the KL: the loss at beta = 0 vanishes
    zero = grpo_loss(logps, old, advantages, mask, policy_weights=torch.zeros(6, 1), **{**kw, "beta": 0.0})
    assert zero.item() == 0.0
    with pytest.raises(ValueError, match=r"policy_weights has shape \(6, 5\), expected \(6, 13\) or \(6, 1\)"):
        grpo_loss(logps, old, advantages, mask, policy_weights=torch.ones(6, 5), **kw)


def test_normalizers():
    logps, old, _, advantages, mask = _inputs(6, 13)
    n_tokens = mask.sum()
    dapo = grpo_loss(logps, old, advantages, mask, loss_type="dapo")
    for num_items in (37, 37.0, torch.tensor(37)):
        scaled = grpo_loss(logps, old, advantages, mask, loss_type="dapo", num_items=num_items)
        torch.testing.assert_close(scaled * 37, dapo * n_tokens)
    # an explicit normalizer is used as given, below 1 too (TRL's, once divided by processes x accumulation steps)
    fractional = grpo_loss(logps, old, advantages, mask, loss_type="cispo", num_items=torch.tensor(0.25))
    torch.testing.assert_close(fractional, grpo_loss(logps, old, advantages, mask, loss_type="cispo") * n_tokens * 4)
    dr_grpo = grpo_loss(logps, old, advantages, mask, loss_type="dr_grpo", max_completion_length=20)
    torch.testing.assert_close(dr_grpo * 6 * 20, dapo * n_tokens)
    bnpo = grpo_loss(logps, old, advantages, mask, loss_type="bnpo")
    torch.testing.assert_close(bnpo, dapo)
    luspo = grpo_loss(logps, old, advantages, mask, loss_type="luspo")
    torch.testing.assert_close(luspo * 6, dapo * n_tokens)


def test_metrics_decompose_over_sequences():
    # per-sequence statistics: concatenating two halves' metrics (what gather does across processes) gives the
    # whole batch's logged values
    logps, old, ref, advantages, mask = _inputs(8, 13, spread=0.5)
    for level in LEVELS:
        kw = dict(ref_logps=ref, beta=0.1, importance_sampling_level=level, return_metrics=True)
        _, whole = grpo_loss(logps, old, advantages, mask, **kw)
        _, first = grpo_loss(logps[:4], old[:4], advantages[:4], mask[:4], **{**kw, "ref_logps": ref[:4]})
        _, second = grpo_loss(logps[4:], old[4:], advantages[4:], mask[4:], **{**kw, "ref_logps": ref[4:]})
        joined = GRPOLossMetrics(*(None if a is None else torch.cat([a, b]) for a, b in zip(first, second)))
        for loss_type in ("dapo", "cispo", "sapo"):
            logs, expected = joined.logs(loss_type), whole.logs(loss_type)
            assert logs.keys() == expected.keys()
            for name in logs:
                torch.testing.assert_close(logs[name], expected[name], equal_nan=True, msg=name)
        assert whole.logs("sapo").keys() == {"kl"}
        assert whole.logs("cispo").keys() == {"kl", "cispo_clip_ratio"}
        _, whole = grpo_loss(logps, old, advantages, mask, loss_type="vespo", **kw)
        _, first = grpo_loss(logps[:3], old[:3], advantages[:3], mask[:3], loss_type="vespo",
                             **{**kw, "ref_logps": ref[:3]})  # fmt: skip
        _, second = grpo_loss(logps[3:], old[3:], advantages[3:], mask[3:], loss_type="vespo",
                              **{**kw, "ref_logps": ref[3:]})  # fmt: skip
        joined = GRPOLossMetrics(*(None if a is None else torch.cat([a, b]) for a, b in zip(first, second)))
        assert whole.logs("vespo").keys() == {"kl", "vespo/phi_seq_mean"}
        torch.testing.assert_close(joined.logs("vespo")["vespo/phi_seq_mean"], whole.phi.mean())


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 9),
    T=st.integers(1, 40),
    loss_type=st.sampled_from(LOSS_TYPES),
    level=st.sampled_from(LEVELS),
    beta=st.sampled_from([0.0, 0.04]),
    bias_correction=st.booleans(),
    delta=st.sampled_from([None, 1.4]),
    spread=st.sampled_from([0.05, 0.5, 2.0]),
    on_policy=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random(B, T, loss_type, level, beta, bias_correction, delta, spread, on_policy, seed):
    torch.manual_seed(seed)
    logps, old, ref, advantages, mask = _inputs(B, T, spread=spread)
    old = None if on_policy else old
    kw = dict(
        ref_logps=ref, beta=beta, use_bias_correction_kl=bias_correction, delta=delta, loss_type=loss_type,
        importance_sampling_level=level, max_completion_length=T + 3,
    )  # fmt: skip
    loss, grad, metrics = _run("triton", logps, old, advantages, mask, **kw)
    loss_ref, grad_ref, metrics_ref = _run("torch", logps, old, advantages, mask, **kw)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
    _assert_metrics_equal(metrics, metrics_ref)


# TRL's own loss, run on a stand-in trainer: the model forward is stubbed to return `logps`; one process, no
# gradient accumulation, no entropy bonus or off-policy masking; the vLLM importance ratio only when given.
# Away from GRPOConfig's defaults, so that a swapped positive / negative VESPO parameter shows.
VESPO = dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=3.5, vespo_lambda_neg=1.2)


class _OneProcess:
    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor


def _trl_loss(logps, old, ref, advantages, mask, *, beta, epsilon_low, epsilon_high, delta, loss_type, level,
              max_completion_length, bias_correction, vespo=VESPO, is_ratio=None):  # fmt: skip
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    B, T = logps.shape
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.rand(B, T), None),
        get_gamma_weights=grpo_trainer.GRPOTrainer.get_gamma_weights,
        args=SimpleNamespace(
            use_bias_correction_kl=bias_correction,
            delta=delta,
            sapo_temperature_pos=1.0,
            sapo_temperature_neg=1.05,
            steps_per_generation=1,
            **vespo,
        ),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=True,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        accelerator=_OneProcess(),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum(),
        "old_per_token_logps": old,
    }
    if ref is not None:
        inputs["ref_per_token_logps"] = ref
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
    metrics = {name: values[0] for name, values in fake._metrics["train"].items() if name != "entropy"}
    return loss, metrics


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_matches_trl(loss_type, level):
    logps, old, ref, advantages, mask = _inputs(6, 11, spread=0.5, mask_dtype=torch.long)
    options = dict(beta=0.05, epsilon_low=0.2, epsilon_high=0.28, delta=1.4, bias_correction=loss_type != "sapo")
    leaf = logps.clone().requires_grad_()
    loss_trl, metrics_trl = _trl_loss(leaf, old, ref, advantages, mask, loss_type=loss_type, level=level,
                                      max_completion_length=16, **options)  # fmt: skip
    (grad_trl,) = torch.autograd.grad(loss_trl, leaf)
    assert metrics_trl  # kl always; clip ratios for all but sapo
    kw = dict(
        ref_logps=ref, beta=options["beta"], epsilon_low=0.2, epsilon_high=0.28, delta=1.4, loss_type=loss_type,
        importance_sampling_level=level, max_completion_length=16, use_bias_correction_kl=options["bias_correction"],
        **VESPO,
    )  # fmt: skip
    _assert_matches_trl(logps, old, advantages, mask, kw, loss_trl, grad_trl, metrics_trl)


def _assert_matches_trl(logps, old, advantages, mask, kw, loss_trl, grad_trl, metrics_trl):
    for impl in ("torch", "triton"):
        loss, grad, metrics = _run(impl, logps, old, advantages, mask, **kw)
        torch.testing.assert_close(loss, loss_trl.detach(), rtol=1e-5, atol=1e-6, msg=impl)
        torch.testing.assert_close(grad, grad_trl, rtol=1e-5, atol=1e-7, msg=impl)
        logs = metrics.logs(kw["loss_type"])
        assert logs.keys() == metrics_trl.keys()
        for name, value in metrics_trl.items():
            assert logs[name].item() == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (impl, name)


@pytest.mark.parametrize("is_shape", ["per_token", "per_sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "vespo"])
def test_matches_trl_with_vllm_importance_ratio(loss_type, is_shape):
    """TRL multiplies the policy term by the vLLM importance ratio; vespo folds its log into phi's log w instead."""
    if loss_type == "vespo" and is_shape == "per_sequence":
        pytest.skip("TRL 1.16 rejects VESPO with the sequence_* importance-sampling modes")
    logps, old, ref, advantages, mask = _inputs(6, 11, spread=0.3, mask_dtype=torch.long)
    # as TRL builds it: exp((old - sampler) * mask), so exactly 1 on masked-out tokens
    ratio = torch.exp(0.4 * torch.randn(6, 11) * mask)
    ratio = ratio if is_shape == "per_token" else ratio.prod(dim=1, keepdim=True)
    options = dict(beta=0.05, epsilon_low=0.2, epsilon_high=0.28, delta=None, bias_correction=True)
    leaf = logps.clone().requires_grad_()
    loss_trl, metrics_trl = _trl_loss(leaf, old, ref, advantages, mask, loss_type=loss_type, level="token",
                                      max_completion_length=16, is_ratio=ratio, **options)  # fmt: skip
    (grad_trl,) = torch.autograd.grad(loss_trl, leaf)
    kw = dict(
        ref_logps=ref, beta=0.05, epsilon_high=0.28, loss_type=loss_type, importance_sampling_ratio=ratio, **VESPO
    )
    _assert_matches_trl(logps, old, advantages, mask, kw, loss_trl, grad_trl, metrics_trl)
    without = grpo_loss(logps, old, advantages, mask, **{**kw, "importance_sampling_ratio": None})
    assert not torch.allclose(without, loss_trl.detach())


def test_vespo_weight_against_a_loop():
    """phi per sequence from its definition, one sequence and one token at a time in float64."""
    logps, old, _, advantages, mask = _inputs(7, 9, spread=0.6)
    mask[0] = False  # w = 1: phi = e^lam e^-lam = 1
    old[2] = logps[2] - 3.0  # a large ratio: phi underflows towards 0
    is_ratio = torch.exp(0.3 * torch.randn(7, 9))
    _, metrics = grpo_loss(logps, old, advantages, mask, loss_type="vespo", importance_sampling_ratio=is_ratio,
                           return_metrics=True, impl="triton", **VESPO)  # fmt: skip
    for b in range(7):
        log_w = 0.0
        for t in range(9):
            if mask[b, t]:
                log_w += min(max(float(logps[b, t]) - float(old[b, t]), -20.0), 20.0)
                log_w += min(max(math.log(float(is_ratio[b, t])), math.log(1e-8)), 20.0)
        log_w = min(max(log_w, math.log(1e-8)), 20.0)
        k, lam = (1.5, 2.5) if advantages[b] >= 0 else (3.5, 1.2)
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        assert metrics.phi[b].item() == pytest.approx(phi, rel=1e-4, abs=1e-30), b  # float32 log-space
    assert metrics.phi[0].item() == pytest.approx(1.0)
    # the gradient is -phi * A * mask / num_items, phi held constant
    leaf = logps.clone().requires_grad_()
    loss = grpo_loss(leaf, old, advantages, mask, loss_type="vespo", importance_sampling_ratio=is_ratio, **VESPO)
    (grad,) = torch.autograd.grad(loss, leaf)
    expected = -(metrics.phi * advantages)[:, None] * mask / mask.sum()
    torch.testing.assert_close(grad, expected)


def test_vespo_nan_ratio_gives_a_zero_weight():
    """A NaN old log-prob on an unmasked token makes that sequence's w NaN: TRL's phi is then 0 (nan_to_num), so the
    sequence drops out of the policy term instead of poisoning the loss; every impl agrees with TRL."""
    logps, old, _, advantages, mask = _inputs(6, 11, spread=0.3, mask_dtype=torch.long)
    old[3, 0] = math.nan  # mask[:, 0] is always set
    leaf = logps.clone().requires_grad_()
    loss_trl, metrics_trl = _trl_loss(leaf, old, None, advantages, mask, beta=0.0, epsilon_low=0.2, epsilon_high=0.2,
                                      delta=None, loss_type="vespo", level="token", max_completion_length=16,
                                      bias_correction=True)  # fmt: skip
    (grad_trl,) = torch.autograd.grad(loss_trl, leaf)
    assert torch.isfinite(loss_trl) and (grad_trl[3] == 0).all()
    _assert_matches_trl(logps, old, advantages, mask, dict(loss_type="vespo", **VESPO), loss_trl, grad_trl, metrics_trl)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_masked_tokens_holding_nan_or_inf_do_not_contribute(loss_type, level):
    """Issue 13: NaN / inf where the mask is 0 (in logps, old, ref, policy weights, importance ratio) change nothing:
    every impl selects masked tokens away instead of multiplying them by 0."""
    logps, old, ref, advantages, mask = _inputs(6, 13, spread=0.5)
    weights, is_ratio = torch.rand(6, 13) + 0.5, torch.exp(0.2 * torch.randn(6, 13))
    poisoned = [t.clone() for t in (logps, old, ref, weights, is_ratio)]
    values = torch.tensor([math.nan, math.inf, -math.inf])
    for t in poisoned:
        t[~mask] = values[torch.randint(0, 3, (int((~mask).sum()),))]
    kw = dict(beta=0.1, loss_type=loss_type, importance_sampling_level=level, max_completion_length=16, delta=2.0)
    for impl in ("torch", "triton"):
        results = []
        for lp, o, r, w, i in ((logps, old, ref, weights, is_ratio), poisoned):
            results.append(_run(impl, lp, o, advantages, mask, ref_logps=r, policy_weights=w,
                                importance_sampling_ratio=i, **kw))  # fmt: skip
        (loss, grad, metrics), (clean_loss, clean_grad, clean_metrics) = results
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), impl
        torch.testing.assert_close(loss, clean_loss, rtol=0, atol=0, msg=impl)
        torch.testing.assert_close(grad, clean_grad, rtol=0, atol=0, msg=impl)
        assert (grad[~mask] == 0).all()
        _assert_metrics_equal(metrics, clean_metrics)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunks_of_sequences_sum_to_the_batch_loss(loss_type):
    """With the batch's num_items and num_sequences, a chunk's loss is its share: the chunks add up (what the fused
    linear loss needs), values and gradients."""
    logps, old, ref, advantages, mask = _inputs(9, 13, spread=0.4)
    kw = dict(
        ref_logps=ref, beta=0.05, loss_type=loss_type, max_completion_length=16, importance_sampling_level="sequence"
    )
    whole, grad_whole, _ = _run("triton", logps, old, advantages, mask, **kw)
    leaf = logps.clone().requires_grad_()
    total = 0.0
    for rows in (slice(0, 2), slice(2, 7), slice(7, 9)):
        total = total + grpo_loss(
            leaf[rows], old[rows], advantages[rows], mask[rows], **{**kw, "ref_logps": ref[rows]},
            num_items=mask.sum().float(), num_sequences=9, impl="triton",
        )  # fmt: skip
    (grad,) = torch.autograd.grad(total, leaf)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(grad, grad_whole)


def test_bad_inputs():
    logps, old, ref, advantages, mask = _inputs(4, 5)
    cases = [
        (dict(loss_type="ppo"), ValueError, "loss_type 'ppo' is not one of: grpo, bnpo, dr_grpo, dapo, cispo, sapo"),
        (dict(importance_sampling_level="seq"), ValueError, "importance_sampling_level 'seq' is not one of: token"),
        (dict(loss_type="dr_grpo"), ValueError, "dr_grpo.* max_completion_length is None"),
        (dict(beta=0.1), ValueError, "beta=0.1 .* needs ref_logps"),
        (dict(ref_logps=ref[:, :3], beta=0.1), ValueError, "ref_logps has shape \\(4, 3\\), expected \\(4, 5\\)"),
        (dict(epsilon_high=math.nan), ValueError, "epsilon_high must be a finite number, got nan"),
        (dict(sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg must be > 0, got 0.0"),
        (dict(beta=-0.1, ref_logps=ref), ValueError, "beta must be >= 0, got -0.1"),
        (dict(vespo_lambda_neg=math.inf), ValueError, "vespo_lambda_neg must be a finite number, got inf"),
        (dict(num_sequences=0), ValueError, "num_sequences must be > 0, got 0"),
        (
            dict(importance_sampling_ratio=torch.ones(4, 2)),
            ValueError,
            "importance_sampling_ratio has shape \\(4, 2\\), expected \\(4, 5\\) or \\(4, 1\\)",
        ),
        (dict(impl="cudnn"), ValueError, "impl 'cudnn' is not one of: auto, triton, cuda, torch"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            grpo_loss(logps, old, advantages, mask, **kwargs)
    with pytest.raises(ValueError, match="old_logps has shape \\(4, 4\\), expected \\(4, 5\\)"):
        grpo_loss(logps, old[:, :4], advantages, mask)
    with pytest.raises(ValueError, match="advantages has shape \\(4, 1\\), expected \\(4,\\)"):
        grpo_loss(logps, old, advantages[:, None], mask)
    with pytest.raises(ValueError, match="mask has shape \\(4, 6\\), expected \\(4, 5\\)"):
        grpo_loss(logps, old, advantages, torch.ones(4, 6))
    with pytest.raises(ValueError, match="logps must be 2-D, got shape \\(20,\\)"):
        grpo_loss(logps.flatten(), None, advantages, mask.flatten())
    with pytest.raises(TypeError, match="logps must be float32"):
        grpo_loss(logps.long(), old, advantages, mask)


def test_grpo_config_shares_the_ops_constants_and_checks():
    """GRPOConfig validates with the ops' own tuples (vespo included), and rejects a negative or non-finite beta as
    grpo_loss does (TRL 1.16 accepts it: a negative KL coefficient silently pushes the policy away from the
    reference); vespo with vLLM's sequence-level importance sampling is TRL's error, raised up front."""
    import importlib

    grpo_config = importlib.import_module("posttrain.configs.grpo")
    # (posttrain.ops exports functions named like their modules)
    advantages_op = importlib.import_module("posttrain.ops.grpo_advantages")
    loss_op = importlib.import_module("posttrain.ops.grpo_loss")

    assert grpo_config.LOSS_TYPES is loss_op.LOSS_TYPES and "vespo" in loss_op.LOSS_TYPES
    assert grpo_config.IMPORTANCE_SAMPLING_LEVELS is loss_op.IMPORTANCE_SAMPLING_LEVELS
    assert grpo_config.SCALE_REWARDS is advantages_op.SCALE_REWARDS
    assert grpo_config.MULTI_OBJECTIVE_AGGREGATIONS is advantages_op.MULTI_OBJECTIVE_AGGREGATIONS
    common = dict(output_dir="unused", per_device_train_batch_size=8, use_cpu=True, report_to=[])
    for beta in (-0.04, math.nan, math.inf):
        with pytest.raises(ValueError, match=rf"beta must be a finite number >= 0 .*got {beta!r}"):
            grpo_config.GRPOConfig(beta=beta, **common)
    args = grpo_config.GRPOConfig(beta=0.0, loss_type="vespo", vespo_k_pos=1.5, **common)
    assert (args.vespo_k_pos, args.vespo_lambda_pos, args.vespo_k_neg, args.vespo_lambda_neg) == (1.5, 3.0, 3.0, 2.0)
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask'"):
        grpo_config.GRPOConfig(loss_type="vespo", use_vllm=True, **common)
    grpo_config.GRPOConfig(loss_type="vespo", use_vllm=True, vllm_importance_sampling_mode="token_mask", **common)
