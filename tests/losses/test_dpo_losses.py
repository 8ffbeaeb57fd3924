"""posttrain.losses.dpo: against explicit float64 loops, TRL 1.16's DPOTrainer._compute_loss, and chunking."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses.dpo import (
    completion_lengths,
    dpo_preference_loss,
    per_sequence,
    sequence_logps,
    wpo_weights,
)


def _padded_batch(B, T, *, dtype=torch.float64):
    """[chosen; rejected] rows: a prompt of 1-3 tokens, a completion of >= 1 token, then padding; per-token values
    aligned with labels[:, 1:] (0 outside the completion, as the fused head returns them)."""
    completion_mask = torch.zeros(2 * B, T, dtype=torch.int64)
    for row in range(2 * B):
        start = int(torch.randint(1, 4, ()))
        completion_mask[row, start : start + int(torch.randint(1, T - start + 1, ()))] = 1
    label_mask = completion_mask[:, 1:].bool()
    per_token = torch.where(label_mask, -3.0 * torch.rand(2 * B, T - 1, dtype=dtype), 0.0)
    return completion_mask, label_mask, per_token


# ---------------------------------------------------------------------------------------------------------------------
# Layout helpers


@pytest.mark.parametrize("lengths", [[3, 2], [1, 5, 2, 7], [4]], ids=["two", "four_with_a_single_token", "one"])
def test_per_sequence_cuts_a_packed_row(lengths):
    lengths = torch.tensor(lengths)
    values = torch.randn(1, int(lengths.sum()) - 1)
    out = per_sequence(values, lengths)
    assert out.shape == (len(lengths), max(int(lengths.max()) - 1, 0))
    start = 0
    for s, n in enumerate(lengths.tolist()):
        for col in range(out.shape[1]):
            expected = values[0, start + col].item() if col < n - 1 else 0.0
            assert out[s, col].item() == expected, (s, col)
        start += n
    padded = torch.randn(4, 6)
    assert per_sequence(padded) is padded


def test_per_sequence_keeps_bool_flags():
    flags = torch.tensor([[True, False, True, True]])
    torch.testing.assert_close(per_sequence(flags, torch.tensor([2, 3])), torch.tensor([[True, False], [True, True]]))


def test_completion_lengths_packed_and_padded():
    lengths = torch.tensor([4, 2, 5])
    packed = (torch.rand(1, 11) < 0.6).long()
    expected, start = [], 0
    for n in lengths.tolist():
        expected.append(int(packed[0, start : start + n].sum()))
        start += n
    assert completion_lengths(packed, lengths).tolist() == expected
    padded = (torch.rand(3, 7) < 0.5).long()
    assert completion_lengths(padded).tolist() == padded.sum(1).tolist()


@pytest.mark.parametrize("ld_alpha", [None, 0.0, 0.3, 1.0])
def test_sequence_logps_against_a_loop(ld_alpha):
    B = 5
    _, label_mask, per_token = _padded_batch(B, 12)
    poisoned = per_token.masked_fill(~label_mask, math.nan)  # outside the mask, nothing may leak in
    out = sequence_logps(poisoned, label_mask, ld_alpha)
    counts = label_mask.sum(1).tolist()
    for row in range(2 * B):
        shared = min(counts[row % B], counts[row % B + B])
        total, k = 0.0, 0
        for t in range(per_token.shape[1]):
            if label_mask[row, t]:
                k += 1
                weight = 1.0 if ld_alpha is None or k <= shared else ld_alpha
                total += weight * per_token[row, t].item()
        assert out[row].item() == pytest.approx(total, rel=1e-12, abs=1e-12), row


def test_sequence_logps_gradient():
    _, label_mask, per_token = _padded_batch(3, 9)
    leaf = per_token.clone().requires_grad_()
    sequence_logps(leaf, label_mask, ld_alpha=0.25).sum().backward()
    assert set(leaf.grad[label_mask].unique().tolist()) <= {1.0, 0.25}
    assert (leaf.grad[~label_mask] == 0).all()


def test_wpo_weights_against_a_loop():
    B = 4
    _, label_mask, per_token = _padded_batch(B, 10)
    log_sum_sq = -torch.rand(2 * B, 9, dtype=torch.float64)
    weights = wpo_weights(per_token.masked_fill(~label_mask, math.inf), log_sum_sq, label_mask)
    row_weight = []
    for row in range(2 * B):
        values = [per_token[row, t] - log_sum_sq[row, t] for t in range(9) if label_mask[row, t]]
        row_weight.append(math.exp(sum(v.item() for v in values) / max(len(values), 1)))
    expected = torch.tensor([row_weight[i] * row_weight[i + B] for i in range(B)], dtype=torch.float64)
    torch.testing.assert_close(weights, expected)
    assert not weights.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# The combination of loss types, against TRL 1.16


class _StubModel:
    """Stands in for the policy: returns the given per-token log-probs and log sum_v p_v^2, zero stats."""

    training = True

    def __init__(self, per_token_logps, log_sum_sq_probs):
        self.per_token_logps, self.log_sum_sq_probs = per_token_logps, log_sum_sq_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token_logps.detach())
        return SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(), aux_loss=None,
            log_sum_sq_probs=self.log_sum_sq_probs,
        )  # fmt: skip


def _trl_loss(per_token, log_sum_sq, completion_mask, ref, *, loss_types, loss_weights, ld_alpha, use_weighting,
              options):  # fmt: skip
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    trainer = SimpleNamespace(
        model=_StubModel(per_token, log_sum_sq),
        accelerator=SimpleNamespace(device=per_token.device, gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=ld_alpha, precompute_ref_logps=True, use_weighting=use_weighting,
        loss_types=loss_types, loss_weights=loss_weights, beta=options["beta"],
        label_smoothing=options["label_smoothing"], f_divergence_type=options["f_divergence_type"],
        f_alpha_divergence_coef=0.5, args=SimpleNamespace(discopop_tau=options["discopop_tau"]),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    n_rows, seq = completion_mask.shape
    inputs = {
        "input_ids": torch.randint(0, 100, (n_rows, seq)),
        "attention_mask": torch.ones_like(completion_mask),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[0],
        "ref_rejected_logps": ref[1],
    }
    return trl_dpo.DPOTrainer._compute_loss(trainer, trainer.model, inputs, False)


def _our_loss(per_token, log_sum_sq, completion_mask, ref, *, loss_types, loss_weights, ld_alpha, use_weighting,
              options, impl="torch", num_pairs=None, num_sft_tokens=None, mean_pair_weight=None):  # fmt: skip
    """What the trainer does with the per-sequence per-token values, through posttrain.losses.dpo."""
    label_mask = completion_mask[:, 1:].bool()
    chosen, rejected = sequence_logps(per_token, label_mask, ld_alpha).chunk(2)
    chosen_lengths, rejected_lengths = completion_lengths(completion_mask).chunk(2)
    raw_chosen = sequence_logps(per_token, label_mask).chunk(2)[0]
    pair_weights = wpo_weights(per_token, log_sum_sq, label_mask) if use_weighting else None
    return dpo_preference_loss(
        chosen, rejected, *ref, loss_types=loss_types, loss_weights=loss_weights, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, sft_logps=raw_chosen, sft_tokens=label_mask.chunk(2)[0].sum(1),
        pair_weights=pair_weights, num_pairs=num_pairs, num_sft_tokens=num_sft_tokens,
        mean_pair_weight=mean_pair_weight, impl=impl, **options,
    )  # fmt: skip


COMBINATIONS = [
    pytest.param(["sigmoid"], None, None, False, id="sigmoid"),
    pytest.param(["sigmoid", "sft"], [1.0, 0.7], None, False, id="sigmoid+sft"),
    pytest.param(["sft", "ipo", "robust"], [0.5, 1.0, 2.0], 0.4, False, id="sft+ipo+robust-ld_alpha"),
    # (TRL 1.16 crashes on sft with use_weighting: it multiplies its expanded batch mean in place; see below)
    pytest.param(["sigmoid_norm", "ipo"], [1.0, 1.0], None, True, id="sigmoid_norm+ipo-wpo"),
    pytest.param(["exo_pair", "bco_pair"], [0.3, 1.0], 0.8, True, id="exo+bco-ld_alpha-wpo"),
    pytest.param(["aot", "apo_zero"], [1.0, 0.5], None, False, id="aot+apo_zero"),
]


@pytest.mark.parametrize("loss_types,loss_weights,ld_alpha,use_weighting", COMBINATIONS)
def test_matches_trl(loss_types, loss_weights, ld_alpha, use_weighting):
    """TRL's loss and its gradient w.r.t. every per-token log-prob, float64, for each impl."""
    B = 6
    completion_mask, label_mask, values = _padded_batch(B, 11)
    per_token = values.requires_grad_()
    log_sum_sq = -torch.rand(2 * B, 10, dtype=torch.float64)
    ref = (values.detach().sum(1) + 2.0 * torch.randn(2 * B, dtype=torch.float64)).chunk(2)
    options = dict(beta=0.4, label_smoothing=0.2, f_divergence_type="reverse_kl", discopop_tau=0.1)
    kw = dict(loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=ld_alpha,
              use_weighting=use_weighting, options=options)  # fmt: skip
    # the fused head's log-probs outside the labels are constants (0): so are these, for TRL's sums over all tokens
    trl_loss = _trl_loss(per_token * label_mask, log_sum_sq, completion_mask, ref, **kw)
    (trl_grad,) = torch.autograd.grad(trl_loss, per_token)
    for impl in ("torch", "triton"):
        dtype = torch.float64 if impl == "torch" else torch.float32
        leaf = values.detach().to(dtype).requires_grad_()
        loss = _our_loss(leaf, log_sum_sq.to(dtype), completion_mask, [r.to(dtype) for r in ref], impl=impl, **kw)
        (grad,) = torch.autograd.grad(loss, leaf)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        if "exo_pair" in loss_types and dtype == torch.float64:
            tol = 1e-7  # TRL takes log(eps) and log(1 - eps) of a float32 tensor whatever the inputs' dtype
        torch.testing.assert_close(loss.double(), trl_loss.detach(), rtol=tol, atol=tol, msg=impl)
        torch.testing.assert_close(grad.double(), trl_grad, rtol=tol, atol=tol, msg=impl)


def test_sft_with_wpo_weights_scales_the_batch_nll_by_the_mean_weight():
    """What TRL's code means for sft + use_weighting (it expands its batch NLL to every pair, weights each, then
    takes the mean over pairs), computed by hand."""
    B = 5
    completion_mask, label_mask, values = _padded_batch(B, 9)
    log_sum_sq = -torch.rand(2 * B, 8, dtype=torch.float64)
    ref = list((values.sum(1) + torch.randn(2 * B, dtype=torch.float64)).chunk(2))
    kw = dict(loss_types=["sft"], loss_weights=[0.7], ld_alpha=0.5, use_weighting=True,
              options=dict(beta=0.2, label_smoothing=0.0, f_divergence_type="reverse_kl", discopop_tau=0.05))  # fmt: skip
    loss = _our_loss(values, log_sum_sq, completion_mask, ref, **kw)
    weights = wpo_weights(values, log_sum_sq, label_mask)
    chosen = label_mask[:B]
    nll = -values[:B][chosen].sum() / chosen.sum()
    torch.testing.assert_close(loss, 0.7 * weights.mean() * nll)


@pytest.mark.parametrize("use_weighting", [False, True], ids=["unweighted", "wpo"])
def test_chunks_of_pairs_add_up_to_the_batch(use_weighting):
    """Given the batch's pair count, sft token count and mean pair weight, the losses of chunks of whole pairs sum to
    the batch loss, and so do their gradients."""
    B = 7
    completion_mask, label_mask, values = _padded_batch(B, 10)
    log_sum_sq = -torch.rand(2 * B, 9, dtype=torch.float64)
    ref = list((values.sum(1) + torch.randn(2 * B, dtype=torch.float64)).chunk(2))
    kw = dict(loss_types=["sigmoid", "ipo", "sft"], loss_weights=[1.0, 0.3, 0.6], ld_alpha=0.5,
              use_weighting=use_weighting, options=dict(beta=0.2, label_smoothing=0.0,
              f_divergence_type="js_divergence", discopop_tau=0.05))  # fmt: skip
    leaf = values.clone().requires_grad_()
    whole = _our_loss(leaf, log_sum_sq, completion_mask, ref, **kw)
    (grad_whole,) = torch.autograd.grad(whole, leaf)

    weights = wpo_weights(values, log_sum_sq, label_mask) if use_weighting else None
    batch = dict(num_pairs=B, num_sft_tokens=label_mask[:B].sum().double(),
                 mean_pair_weight=None if weights is None else weights.mean())  # fmt: skip
    leaf = values.clone().requires_grad_()
    total = 0.0
    for pairs in (torch.tensor([0, 1]), torch.tensor([2, 3, 4]), torch.tensor([5, 6])):
        rows = torch.cat([pairs, pairs + B])  # a chunk keeps the [chosen; rejected] layout
        total = total + _our_loss(leaf[rows], log_sum_sq[rows], completion_mask[rows], [r[pairs] for r in ref],
                                  **kw, **batch)  # fmt: skip
    (grad,) = torch.autograd.grad(total, leaf)
    torch.testing.assert_close(total, whole)
    torch.testing.assert_close(grad, grad_whole)


def test_bad_arguments():
    logps = [torch.randn(3) for _ in range(4)]
    with pytest.raises(ValueError, match=r"loss_weights has 1 weights for 2 loss types"):
        dpo_preference_loss(*logps, loss_types=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match=r"loss_types \['sigmod'\]: each must be one of: sigmoid, hinge"):
        dpo_preference_loss(*logps, loss_types=["sigmod"])
    with pytest.raises(ValueError, match="loss_type 'sft' needs sft_logps"):
        dpo_preference_loss(*logps, loss_types=["sft"])
    with pytest.raises(ValueError, match="loss_type 'ipo' needs chosen_lengths"):
        dpo_preference_loss(*logps, loss_types=["ipo"])
