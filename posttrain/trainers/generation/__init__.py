"""Generation backends of the online trainers (GRPO; RLOO and Distillation alike): transformers' `generate`, its
continuous batching, a colocated vLLM engine, a vLLM server. Each returns the completions' token ids and, when the
engine has them, the sampled tokens' log-probs (for the importance-sampling correction)."""

from .base import Completions, GenerationBackend, truncate_after_eos
from .importance_sampling import importance_sampling_ratio, sampling_mismatch_stats
from .transformers_engine import ContinuousBatchingGeneration, TransformersGeneration, generation_config
from .vllm_engine import VLLMColocateGeneration, VLLMServerGeneration

__all__ = [
    "Completions",
    "ContinuousBatchingGeneration",
    "GenerationBackend",
    "TransformersGeneration",
    "VLLMColocateGeneration",
    "VLLMServerGeneration",
    "create_generation",
    "generation_config",
    "importance_sampling_ratio",
    "sampling_mismatch_stats",
    "truncate_after_eos",
]


def create_generation(model, args, tokenizer, eos_token_ids: list[int], accelerator) -> GenerationBackend:
    """The backend GRPOConfig-style `args` ask for: vLLM (use_vllm, vllm_mode), transformers' continuous batching
    (use_transformers_continuous_batching) or `generate`. `model` is the policy before accelerate's prepare."""
    if args.use_vllm:
        if args.vllm_mode == "server":
            return VLLMServerGeneration(args, accelerator)
        return VLLMColocateGeneration(model, args, accelerator)
    backend = ContinuousBatchingGeneration if args.use_transformers_continuous_batching else TransformersGeneration
    return backend(args, tokenizer, eos_token_ids, accelerator, report_logprobs=args.transformers_sampling_logprobs)
