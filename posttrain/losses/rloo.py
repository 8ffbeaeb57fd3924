"""RLOO's loss below the trainer: TRL 1.16's sequence-level clipped objective and its clip statistics.

Each function takes any subset of a micro-batch's sequences (the fused linear loss calls the loss chunk by chunk of
whole sequences); the micro-batch's sequence count, which normalizes the loss, is an explicit argument.
"""

from typing import NamedTuple

import torch


class ClipFlags(NamedTuple):
    """Per sequence ([B] bool): the ratio was clipped from below (with a negative advantage), from above (with a
    positive one), either (TRL's clip_ratio/low_*, /high_*, /region_mean)."""

    low: torch.Tensor
    high: torch.Tensor
    region: torch.Tensor


def rloo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    *,
    epsilon_low: float,
    epsilon_high: float,
    num_sequences: int,
) -> torch.Tensor:
    """The share of these sequences in TRL's RLOO loss of a micro-batch of `num_sequences` sequences:
    sum over them of -min(r A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A), divided by num_sequences, where
    r = exp(logps - old_logps) is the sequence-level ratio.

    Args:
        logps: [n] float, each sequence's log-prob summed over its completion tokens (differentiable).
        old_logps: [n] the same under the policy that sampled them; None when that is the current policy (on-policy:
            the ratio is exp(logps - logps.detach()), 1 with the policy gradient's derivative).
        advantages: [n] float.
        epsilon_low, epsilon_high: the clipping range of the ratio.
        num_sequences: the micro-batch's sequence count (the mean's denominator, every chunk's the same).

    Returns:
        0-d float tensor.

    Example:
        >>> rloo_loss(torch.tensor([-3.0, -5.0]), torch.tensor([-3.1, -4.9]), torch.tensor([1.0, -1.0]),
        ...           epsilon_low=0.2, epsilon_high=0.2, num_sequences=2)
        tensor(-0.1002)
    """
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages).sum() / num_sequences


def clip_flags(ratio: torch.Tensor, advantages: torch.Tensor, epsilon_low: float, epsilon_high: float) -> ClipFlags:
    """Which sequences' ratios [B] the clipping bounds (see ClipFlags).

    Example:
        >>> clip_flags(torch.tensor([0.5, 1.5, 1.0]), torch.tensor([-1.0, 1.0, 1.0]), 0.2, 0.2).region
        tensor([ True,  True, False])
    """
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return ClipFlags(low, high, low | high)
