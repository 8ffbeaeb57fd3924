"""Model-side plumbing: the fused log-prob head, attention for packed sequences, the built-in tiny preset."""

from .attention import padding_free_attn_implementation
from .lm_head import FusedHead, TokenLogprobOutput, add_fused_logprob_head, fused_head_of
from .presets import byte_level_tokenizer, tiny_causal_lm, tiny_qwen2_config

__all__ = [
    "FusedHead",
    "TokenLogprobOutput",
    "add_fused_logprob_head",
    "byte_level_tokenizer",
    "fused_head_of",
    "padding_free_attn_implementation",
    "tiny_causal_lm",
    "tiny_qwen2_config",
]
