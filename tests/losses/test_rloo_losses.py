"""posttrain.losses.rloo: TRL 1.16's sequence-level clipped RLOO objective, chunk by chunk, and its clip flags."""

import pytest
import torch

from posttrain.losses.rloo import clip_flags, rloo_loss


def _trl_loss(logps, old_logps, advantages, eps_low, eps_high):
    # TRL's RLOOTrainer._compute_loss on summed sequence log-probs, in float64
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages).mean()


@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.1, 0.28)], ids=["symmetric", "dapo_high"])
def test_matches_trl_and_chunks_add_up(eps):
    logps = (torch.randn(7, dtype=torch.float64) - 5).requires_grad_()
    old = logps.detach() + torch.randn(7, dtype=torch.float64) * 0.3  # some ratios outside the clipping range
    advantages = torch.randn(7, dtype=torch.float64)
    expected = _trl_loss(logps, old, advantages, *eps)
    kwargs = {"epsilon_low": eps[0], "epsilon_high": eps[1], "num_sequences": 7}
    whole = rloo_loss(logps, old, advantages, **kwargs)
    chunks = [torch.tensor([0, 3]), torch.tensor([1, 2, 6]), torch.tensor([4, 5])]
    parts = sum(rloo_loss(logps[c], old[c], advantages[c], **kwargs) for c in chunks)
    torch.testing.assert_close(whole, expected)
    torch.testing.assert_close(parts, expected)
    (grad,) = torch.autograd.grad(parts, logps)
    (expected_grad,) = torch.autograd.grad(expected, logps)
    torch.testing.assert_close(grad, expected_grad)
    assert (grad == 0).any() and (grad != 0).any()  # clipped sequences carry no gradient, the others do


def test_on_policy_ratio_is_one_with_the_policy_gradient():
    logps = torch.tensor([-3.0, -5.0, -2.0], requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    loss = rloo_loss(logps, None, advantages, epsilon_low=0.2, epsilon_high=0.2, num_sequences=3)
    loss.backward()
    torch.testing.assert_close(loss, -advantages.mean())
    torch.testing.assert_close(logps.grad, -advantages / 3)


def test_clip_flags():
    ratio = torch.tensor([0.5, 0.5, 1.5, 1.5, 1.0])
    advantages = torch.tensor([-1.0, 1.0, 1.0, -1.0, 1.0])
    flags = clip_flags(ratio, advantages, 0.2, 0.2)
    assert flags.low.tolist() == [True, False, False, False, False]
    assert flags.high.tolist() == [False, False, True, False, False]
    assert flags.region.tolist() == [True, False, True, False, False]
