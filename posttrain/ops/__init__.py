"""posttrain's ops: each has a pure-PyTorch `<op>_ref`, an autograd Function over its kernels, and `<op>(..., impl=)`."""

from .fused_linear_logprob import TokenLogprobs, fused_linear_logprob, fused_linear_logprob_ref
from .selective_log_softmax import selective_log_softmax, selective_log_softmax_ref

__all__ = [
    "TokenLogprobs",
    "fused_linear_logprob",
    "fused_linear_logprob_ref",
    "selective_log_softmax",
    "selective_log_softmax_ref",
]
