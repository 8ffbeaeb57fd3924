"""What every posttrain config shares: TRL's TrainingArguments defaults, plus posttrain's own switch."""

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from posttrain._compat import sync_checkpointing_alias

# Which end of an over-long sequence SFT and DPO keep ("keep_end" is deprecated in TRL 1.16)
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class PosttrainConfig(TrainingArguments):
    """TrainingArguments with the defaults every TRL 1.16 trainer config sets, and `use_fused_kernels`.

    Parameters:
        model_init_kwargs: keyword arguments for from_pretrained when the trainer's model is given as a string.
        trust_remote_code: allow models and tokenizers that ship their own Python code.
        logging_steps: 10 (TRL's default, where transformers has 500).
        gradient_checkpointing: True.
        bf16: True unless fp16 is set.
        activation_offloading: keep the activations saved for backward in CPU memory (TRL's field, for every trainer).
        tiled_mlp, tiled_mlp_tile_tokens: run each MLP over sequence tiles under recomputation (posttrain's own).
        use_fused_kernels: compute log-probs with posttrain's fused kernels (True) or with the plain PyTorch path
            through the full logits (False). Both give the same numbers.
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained when the trainer's model is a hub id or a path."},
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and tokenizers that ship their own Python code."}
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every X update steps: an integer, or a float in [0, 1) as a fraction of the run."},
    )
    gradient_checkpointing: bool = field(
        default=True,
        metadata={"help": "Recompute activations in the backward to save memory (about 20 percent slower)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "Use bf16 mixed precision. Defaults to True unless fp16 is set."},
    )
    lr_scheduler_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra arguments for the learning-rate scheduler, e.g. {'num_cycles': 1}."},
    )
    activation_offloading: bool = field(
        default=False,
        metadata={
            "help": "Keep the activations saved for backward in CPU memory (pinned, copied on a side stream on CUDA) "
            "and bring them back for backward: less GPU memory, at the cost of the copies."
        },
    )
    tiled_mlp: bool = field(
        default=False,
        metadata={
            "help": "Run each decoder layer's MLP over sequence tiles, recomputed in backward, so its [tokens, "
            "intermediate] activations are never whole (long sequences). Llama, Qwen2 and Qwen3 MLPs."
        },
    )
    tiled_mlp_tile_tokens: int | None = field(
        default=None,
        metadata={"help": "Tokens per MLP tile with tiled_mlp (default: the hidden size)."},
    )
    use_fused_kernels: bool = field(
        default=True,
        metadata={
            "help": "Compute log-probabilities with posttrain's fused kernels, without [batch, seq, vocab] logits. "
            "False uses the plain PyTorch path through the full logits (same numbers, more memory)."
        },
    )

    def __post_init__(self):
        self.bf16 = not self.fp16 if self.bf16 is None else self.bf16
        sync_checkpointing_alias(self)
        super().__post_init__()
