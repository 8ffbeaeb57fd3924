"""Loss math of the trainers, in plain PyTorch below them: what a trainer computes from per-token log-probs (and
entropies) besides the ops themselves, each function testable without a training run and usable on a chunk of whole
sequences or pairs."""

from .dpo import completion_lengths, dpo_preference_loss, per_sequence, sequence_logps, wpo_weights
from .grpo import (
    AdaptiveEntropy,
    entropy_bonus,
    entropy_threshold,
    high_entropy_mask,
    nanstd,
    off_policy_mask,
    policy_weights,
)
from .rloo import ClipFlags, clip_flags, rloo_loss

__all__ = [
    "AdaptiveEntropy",
    "ClipFlags",
    "clip_flags",
    "completion_lengths",
    "dpo_preference_loss",
    "entropy_bonus",
    "entropy_threshold",
    "high_entropy_mask",
    "nanstd",
    "off_policy_mask",
    "per_sequence",
    "policy_weights",
    "rloo_loss",
    "sequence_logps",
    "wpo_weights",
]
