"""The built-in tiny causal LM: a small Qwen2-style model and an offline byte-level tokenizer with a chat template.

Nothing here touches a model hub, so tests, the quickstart and the CLI's default run anywhere.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2's, with {% generation %} markers around assistant turns (what assistant_only_loss needs)
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer with one token per byte (ids 0-255) plus <|endoftext|> (pad), <|im_start|> and <|im_end|> (eos).

    Example:
        >>> tok = byte_level_tokenizer()
        >>> tok.decode(tok("2+2=4")["input_ids"])
        '2+2=4'
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_qwen2_config(vocab_size: int = 256 + len(SPECIAL_TOKENS), **overrides) -> Qwen2Config:
    """A Qwen2 config small enough to train on a CPU in seconds (hidden 64, 2 layers, GQA 4/2 heads)."""
    tokenizer_ids = {"pad_token_id": 256, "bos_token_id": None, "eos_token_id": 258}
    defaults = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        **tokenizer_ids,
    )
    return Qwen2Config(**{**defaults, **overrides})


def tiny_causal_lm(seed: int = 0, **config_overrides) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialized tiny Qwen2ForCausalLM (float32) and its byte-level tokenizer, deterministic in `seed`.

    Example:
        >>> model, tokenizer = tiny_causal_lm()
        >>> model.save_pretrained("tiny"); tokenizer.save_pretrained("tiny")   # loadable with from_pretrained("tiny")
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(tiny_qwen2_config(**config_overrides))
    model.generation_config.pad_token_id = 256
    model.generation_config.eos_token_id = 258
    return model, byte_level_tokenizer()


# Sized for the quickstart's two-digit addition: wide enough to learn carrying within a few minutes on a CPU core
QUICKSTART_CONFIG = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}


def quickstart_causal_lm(seed: int = 0, **config_overrides) -> tuple[Qwen2ForCausalLM, PreTrainedTokenizerFast]:
    """The quickstart's model, freshly initialized (float32, ~0.56M parameters: hidden 128, 2 layers, 4 heads), and
    the byte-level tokenizer: the CLI's default model when no --model_name_or_path is given. Deterministic in `seed`.

    Example:
        >>> model, tokenizer = quickstart_causal_lm(seed=0)
        >>> model.config.hidden_size, model.config.num_hidden_layers
        (128, 2)
    """
    return tiny_causal_lm(seed, **{**QUICKSTART_CONFIG, **config_overrides})
