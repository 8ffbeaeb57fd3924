"""posttrain's ops: each has a pure-PyTorch `<op>_ref`, an autograd Function over its kernels, and `<op>(..., impl=)`."""

from .dpo_loss import dpo_loss, dpo_loss_ref
from .fused_linear_divergence import FusedDivergence, fused_linear_divergence, fused_linear_divergence_ref
from .fused_linear_logprob import TokenLogprobs, fused_linear_logprob, fused_linear_logprob_ref
from .fused_linear_loss import FusedLoss, LossChunk, fused_linear_loss, fused_linear_loss_ref, row_chunks
from .grpo_advantages import grpo_advantages, grpo_advantages_ref
from .grpo_loss import GRPOLossFunction, GRPOLossMetrics, grpo_loss, grpo_loss_ref
from .rloo_advantages import rloo_advantages, rloo_advantages_ref
from .selective_log_softmax import selective_log_softmax, selective_log_softmax_ref

__all__ = [
    "FusedDivergence",
    "FusedLoss",
    "GRPOLossFunction",
    "GRPOLossMetrics",
    "LossChunk",
    "TokenLogprobs",
    "dpo_loss",
    "dpo_loss_ref",
    "fused_linear_divergence",
    "fused_linear_divergence_ref",
    "fused_linear_logprob",
    "fused_linear_logprob_ref",
    "fused_linear_loss",
    "fused_linear_loss_ref",
    "grpo_advantages",
    "grpo_advantages_ref",
    "grpo_loss",
    "grpo_loss_ref",
    "rloo_advantages",
    "rloo_advantages_ref",
    "row_chunks",
    "selective_log_softmax",
    "selective_log_softmax_ref",
]
