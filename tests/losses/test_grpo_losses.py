"""posttrain.losses.grpo: against explicit loops, TRL 1.16's own GRPOTrainer code on a stand-in, and chunking."""

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from posttrain.losses.grpo import (
    AdaptiveEntropy,
    entropy_bonus,
    entropy_threshold,
    high_entropy_mask,
    nanstd,
    off_policy_mask,
    policy_weights,
)
from posttrain.ops.grpo_loss import grpo_loss


def _batch(B=6, T=9):
    logps = -torch.rand(B, T) * 3 - 0.01
    old = logps + 0.4 * torch.randn(B, T)
    entropies = torch.rand(B, T) * 2
    advantages = torch.randn(B)
    mask = torch.rand(B, T) < 0.75
    mask[:, 0] = True
    mask[2] = False  # a sequence without completion tokens
    return logps, old, entropies, advantages, mask


class _OneProcess:
    """accelerate's collectives on one process (TRL's stand-in)."""

    num_processes = 1
    sync_gradients = True

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor


# ---------------------------------------------------------------------------------------------------------------------
# nanstd, entropy masks, off-policy mask


def test_nanstd_against_trl_and_a_loop():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    x = torch.randn(11, dtype=torch.float64)
    x[[2, 7]] = math.nan
    values = [v for v in x.tolist() if not math.isnan(v)]
    mean = sum(values) / len(values)
    expected = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert nanstd(x).item() == pytest.approx(expected, rel=1e-12)
    assert nanstd(x).item() == pytest.approx(trl_utils.nanstd(x).item(), rel=1e-12)
    assert nanstd(x).shape == ()
    assert math.isnan(nanstd(torch.tensor([1.0, math.nan])).item())  # one value: no spread
    assert math.isnan(nanstd(torch.full((3,), math.nan)).item())


@pytest.mark.parametrize("quantile", [0.0, 0.3, 0.8, 1.0])
def test_high_entropy_mask_matches_trl(quantile):
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    _, _, entropies, _, mask = _batch()
    fake = SimpleNamespace(accelerator=_OneProcess())
    expected = grpo_trainer.GRPOTrainer.get_high_entropy_mask(fake, entropies, mask.long(), quantile)
    got = high_entropy_mask(entropies, mask, quantile)
    assert torch.equal(got, expected)
    assert not got[~mask].any()
    # against the definition: the sorted completion entropies' linear-interpolation quantile
    values = sorted(entropies[mask].tolist())
    pos = quantile * (len(values) - 1)
    cut = values[int(pos)] + (pos - int(pos)) * (values[min(int(pos) + 1, len(values) - 1)] - values[int(pos)])
    assert entropy_threshold(entropies, mask, quantile).item() == pytest.approx(cut, rel=1e-6)


def test_high_entropy_mask_over_processes():
    """Each process's rows with a gather of every process's entropies (of different counts) give the whole batch's
    mask; a known threshold gives the same without any gather (what a chunked caller passes)."""
    _, _, entropies, _, mask = _batch(B=8)
    whole = high_entropy_mask(entropies, mask, 0.6)
    halves = (slice(0, 3), slice(3, 8))
    everyone = torch.cat([entropies[rows][mask[rows]] for rows in halves])
    for rows in halves:
        gathered = high_entropy_mask(entropies[rows], mask[rows], 0.6, gather=lambda local: everyone)
        assert torch.equal(gathered, whole[rows])
        threshold = entropy_threshold(entropies, mask, 0.6)
        assert torch.equal(high_entropy_mask(entropies[rows], mask[rows], 0.6, threshold=threshold), whole[rows])
    empty = high_entropy_mask(entropies, torch.zeros_like(mask), 0.5)
    assert empty.dtype == torch.bool and not empty.any()


def test_off_policy_mask_matches_trl():
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    logps, old, _, advantages, mask = _batch(B=10)
    old[0, 0] = math.nan  # a token the sampler could not score: no evidence either way
    old[~mask] = math.inf
    for threshold in (0.0, 0.1, 0.3):
        expected = grpo_trainer.GRPOTrainer.get_off_policy_mask(
            advantages.unsqueeze(1), logps, old, mask.float(), threshold
        )
        got = off_policy_mask(logps, old, mask, advantages, threshold)
        assert torch.equal(got, expected), threshold
        assert (got[advantages >= 0] == 1).all()
    # by hand: a negative advantage and a mean KL of 0.5 is dropped at 0.4, kept at 0.5
    one = torch.zeros(1, 4)
    kept = [off_policy_mask(one, one + 0.5, torch.ones(1, 4), torch.tensor([-1.0]), t).item() for t in (0.4, 0.5)]
    assert kept == [0.0, 1.0]


def test_policy_weights_combines_the_masks():
    logps, old, entropies, advantages, mask = _batch()
    entropy_mask = high_entropy_mask(entropies, mask, 0.5)
    assert policy_weights(logps, mask, advantages) is None
    torch.testing.assert_close(policy_weights(logps, mask, advantages, entropy_mask=entropy_mask), entropy_mask.float())
    keep = off_policy_mask(logps, old, mask, advantages, 0.05)
    both = policy_weights(logps, mask, advantages, entropy_mask=entropy_mask, off_policy_threshold=0.05,
                          sampling_logps=old)  # fmt: skip
    torch.testing.assert_close(both, entropy_mask.float() * keep)
    # without sampler log-probs the policy is its own sampler: KL 0, nothing dropped
    assert (policy_weights(logps, mask, advantages, off_policy_threshold=0.0) == 1).all()


# ---------------------------------------------------------------------------------------------------------------------
# Entropy bonus and its adaptive coefficient


def test_entropy_bonus_against_a_loop_and_in_chunks():
    _, _, entropies, _, mask = _batch()
    weights = mask * torch.rand(mask.shape)  # a float mask weights the tokens
    poisoned = entropies.masked_fill(~mask, math.nan)
    total = sum(entropies[b, t].item() * weights[b, t].item() for b in range(6) for t in range(9) if mask[b, t])
    expected = 0.3 * total / weights.sum().item() / 4
    assert entropy_bonus(poisoned, weights, 0.3, accumulation=4).item() == pytest.approx(expected, rel=1e-6)
    chunks = sum(entropy_bonus(entropies[rows], weights[rows], 0.3, accumulation=4, num_tokens=weights.sum())
                 for rows in (slice(0, 2), slice(2, 6)))  # fmt: skip
    torch.testing.assert_close(chunks, entropy_bonus(entropies, weights, 0.3, accumulation=4))
    assert entropy_bonus(entropies, torch.zeros_like(mask), 0.3).item() == 0.0


def test_adaptive_entropy_steps_and_state():
    control = AdaptiveEntropy(0.05, coef_min=0.0, coef_max=0.08, delta=0.02, target=0.5)
    assert control.applied_coef == 0.0  # nothing measured yet
    one = torch.tensor(1.0)
    # a window of two micro-steps: (0.2 * 3 + 0.5 * 1) / 4 = 0.275 <= 0.5: the coefficient grows, capped at 0.08
    assert control.update(torch.tensor(0.6), torch.tensor(3.0), step_end=False) is None
    assert control.update(torch.tensor(0.5), one, step_end=True) == pytest.approx(0.275)
    assert control.coef == pytest.approx(0.07) and control.applied_coef == pytest.approx(0.07)
    control.update(torch.tensor(0.1), one, step_end=True)
    assert control.coef == pytest.approx(0.08)
    # reduce sums over processes: here a second process with mean entropy 3 pushes the mean above the target
    entropy = control.update(torch.tensor(0.2), one, step_end=True, reduce=lambda t: t + torch.tensor([3.0, 1.0]))
    assert entropy == pytest.approx(1.6)
    assert control.coef == pytest.approx(0.06) and control.applied_coef == 0.0
    restored = AdaptiveEntropy(0.5, coef_min=0.0, coef_max=1.0, delta=0.1, target=0.5)
    restored.load_state_dict(json.loads(json.dumps(control.state_dict())))
    assert (restored.coef, restored.last_entropy) == (control.coef, control.last_entropy)
    fresh = AdaptiveEntropy(0.5, coef_min=0.0, coef_max=1.0, delta=0.1, target=0.5)
    fresh.load_state_dict(json.loads(json.dumps(AdaptiveEntropy(0.5, coef_min=0.0, coef_max=1.0, delta=0.1,
                                                                target=0.5).state_dict())))  # fmt: skip
    assert fresh.last_entropy == math.inf


def _trl_stand_in(grpo_trainer, *, accumulation, quantile, threshold, coef, target):
    accelerator = _OneProcess()
    fake = SimpleNamespace(
        accelerator=accelerator,
        args=SimpleNamespace(
            use_bias_correction_kl=True, delta=None, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
            steps_per_generation=accumulation, entropy_target=target, entropy_coef_delta=0.02, entropy_coef_min=0.0,
            entropy_coef_max=0.1,
        ),
        top_entropy_quantile=quantile, off_policy_mask_threshold=threshold, importance_sampling_level="token", beta=0.0,
        loss_type="grpo", epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=accumulation, max_completion_length=16, _entropy_bonus_enabled=True,
        use_adaptive_entropy=True, entropy_coef=coef, _last_world_entropy=math.inf, _entropy_window_stats=None,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list)},
        get_off_policy_mask=grpo_trainer.GRPOTrainer.get_off_policy_mask,
    )  # fmt: skip
    fake.get_high_entropy_mask = lambda e, m, t: grpo_trainer.GRPOTrainer.get_high_entropy_mask(fake, e, m, t)
    return fake


def test_composed_policy_loss_matches_trl_over_steps():
    """TRL's _compute_loss with top_entropy_quantile, the off-policy mask and the adaptive entropy bonus, over three
    optimizer steps of two micro-steps, against grpo_loss + these functions: loss, gradients (log-probs and
    entropies) and the coefficient's trajectory."""
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    accumulation, quantile, threshold = 2, 0.6, 0.05
    fake = _trl_stand_in(grpo_trainer, accumulation=accumulation, quantile=quantile, threshold=threshold, coef=0.05,
                         target=0.3)  # fmt: skip
    control = AdaptiveEntropy(0.05, coef_min=0.0, coef_max=0.1, delta=0.02, target=0.3)
    coefs = []
    for step, scale in enumerate([0.05, 0.1, 1.5, 1.0, 0.05, 0.1]):  # entropies below, above, below the target
        logps, old, entropies, advantages, mask = _batch()
        entropies = entropies * scale
        step_end = step % accumulation == accumulation - 1
        fake.accelerator.sync_gradients = step_end
        leaves = [logps.clone().requires_grad_(), entropies.clone().requires_grad_()]
        fake._get_per_token_logps_and_entropies = lambda *args, leaves=leaves, **kwargs: (*leaves, None)
        inputs = {
            "prompt_ids": torch.zeros(6, 1, dtype=torch.long), "prompt_mask": torch.ones(6, 1, dtype=torch.long),
            "completion_ids": torch.zeros(6, 9, dtype=torch.long), "completion_mask": mask.long(),
            "advantages": advantages, "num_items_in_batch": mask.sum(), "old_per_token_logps": old,
        }  # fmt: skip
        trl_loss = grpo_trainer.GRPOTrainer._compute_loss(fake, None, inputs)
        trl_grads = torch.autograd.grad(trl_loss, leaves)

        ours = [logps.clone().requires_grad_(), entropies.clone().requires_grad_()]
        entropy_mask = high_entropy_mask(ours[1], mask, 1 - quantile)
        weights = policy_weights(ours[0], mask, advantages, entropy_mask=entropy_mask,
                                 off_policy_threshold=threshold, sampling_logps=old)  # fmt: skip
        policy = grpo_loss(ours[0], old, advantages, mask, loss_type="grpo", epsilon_high=0.28, policy_weights=weights)
        bonus_mask = mask & entropy_mask
        loss = policy / accumulation - entropy_bonus(ours[1], bonus_mask, control.applied_coef,
                                                      accumulation=accumulation)  # fmt: skip
        control.update((ours[1] * bonus_mask).sum(), bonus_mask.sum(), step_end=step_end)
        grads = torch.autograd.grad(loss, ours)
        torch.testing.assert_close(loss, trl_loss, rtol=1e-5, atol=1e-7, msg=f"loss {step}")
        for name, got, expected in zip(("logps", "entropies"), grads, trl_grads):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7, msg=f"d {name} {step}")
        if step_end:
            coefs.append(control.coef)
    assert coefs == pytest.approx(fake._metrics["train"]["entropy_coef"])
    assert coefs == pytest.approx([0.07, 0.05, 0.07])  # up, down, up
