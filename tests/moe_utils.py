"""Tiny Mixture-of-Experts causal LMs for the MoE tests (importable as `moe_utils`: pyproject puts tests/ on sys.path).

Built offline from a config, with the byte-level tokenizer of posttrain.models: hidden 64, 2 layers, 4 experts, top-2,
vocabulary 259. Saved directories load with from_pretrained in both TRL and posttrain.
"""

import torch
from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

from posttrain.models import byte_level_tokenizer

# The architecture's own coefficient, which router_aux_loss_coef=None selects. Larger than the 0.001 default so that
# the aux term moves the logged loss by ~2% (aux_loss is ~2 for 4 experts, top-2), far above the parity tolerances.
ARCHITECTURE_COEF = 0.05

_COMMON = {
    "vocab_size": 259,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    "router_aux_loss_coef": ARCHITECTURE_COEF,
    "pad_token_id": 256,
    "bos_token_id": None,
    "eos_token_id": 258,
    "attn_implementation": "sdpa",
}
ARCHITECTURES = {
    "qwen2_moe": lambda **kw: Qwen2MoeForCausalLM(
        Qwen2MoeConfig(
            num_experts=4, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64, **kw
        )
    ),
    "mixtral": lambda **kw: MixtralForCausalLM(MixtralConfig(num_local_experts=4, intermediate_size=32, **kw)),
}


def tiny_moe_lm(seed: int = 0, architecture: str = "qwen2_moe", **overrides):
    """A freshly initialized tiny MoE causal LM (float32), deterministic in `seed`, and the byte-level tokenizer."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ARCHITECTURES[architecture](**{**_COMMON, **overrides})
    model.generation_config.pad_token_id = 256
    model.generation_config.eos_token_id = 258
    return model, byte_level_tokenizer()


def save_tiny_moe(path, seed: int = 0, **overrides) -> str:
    """tiny_moe_lm saved with its tokenizer to `path`; returns the path as a string."""
    model, tokenizer = tiny_moe_lm(seed, **overrides)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
