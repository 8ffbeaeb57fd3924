"""posttrain's ops: each has a pure-PyTorch `<op>_ref`, an autograd Function over its kernels, and `<op>(..., impl=)`."""

from .dpo_loss import dpo_loss, dpo_loss_ref
from .fused_linear_logprob import TokenLogprobs, fused_linear_logprob, fused_linear_logprob_ref
from .grpo_advantages import grpo_advantages, grpo_advantages_ref
from .grpo_loss import GRPOLossFunction, GRPOLossMetrics, grpo_loss, grpo_loss_ref
from .selective_log_softmax import selective_log_softmax, selective_log_softmax_ref

__all__ = [
    "GRPOLossFunction",
    "GRPOLossMetrics",
    "TokenLogprobs",
    "dpo_loss",
    "dpo_loss_ref",
    "fused_linear_logprob",
    "fused_linear_logprob_ref",
    "grpo_advantages",
    "grpo_advantages_ref",
    "grpo_loss",
    "grpo_loss_ref",
    "selective_log_softmax",
    "selective_log_softmax_ref",
]
