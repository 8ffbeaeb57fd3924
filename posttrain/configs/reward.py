"""RewardConfig: TRL 1.16's RewardConfig fields and defaults, checked up front."""

import math
import warnings
from dataclasses import dataclass, field

from .base import PosttrainConfig
from .sft import _resolve_pad_to_multiple_of


@dataclass
class RewardConfig(PosttrainConfig):
    """Configuration of `posttrain.RewardTrainer`, field for field TRL 1.16's `RewardConfig` (same names and defaults).

    Defaults that differ from TrainingArguments: learning_rate 1e-4, logging_steps 10, gradient_checkpointing True,
    bf16 True unless fp16 is set. posttrain adds `use_fused_kernels` (no effect here: a reward model has no LM head)
    and `padding_free`.

    Model: model_init_kwargs (for `AutoModelForSequenceClassification.from_pretrained` when the model is a string;
    num_labels is always 1), trust_remote_code, chat_template_path (a .jinja / .j2 file, or a tokenizer whose chat
    template and added tokens are cloned), disable_dropout (True).

    Data: dataset_num_proc, eos_token (default: the tokenizer's; appended to text chosen / rejected sequences that do
    not end with it), max_length (1024: pairs whose chosen or rejected sequence is longer are dropped, not truncated;
    None keeps all), pad_to_multiple_of ("auto": 128 on Neuron, else None), pad_token (deprecated, as in TRL),
    padding_free (posttrain's: pack each batch's sequences into one row, without padding).

    Training: center_rewards_coefficient (None: off; TRL recommends 0.01) adds coefficient * mean((r_chosen +
    r_rejected)^2) to the loss; activation_offloading (TRL's field) is PosttrainConfig's.

    Raises ValueError, naming the field and the value, for a negative or non-finite center_rewards_coefficient,
    a non-positive max_length or dataset_num_proc, and a pad_to_multiple_of that is not a positive integer.

    Example:
        >>> args = RewardConfig(output_dir="out", center_rewards_coefficient=0.01, bf16=False)
        >>> args.learning_rate, args.max_length
        (0.0001, 1024)
    """

    
    learning_rate: float = field(default=1e-4, metadata={"help": "The initial learning rate for AdamW."})

    # Model
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A .jinja/.j2 chat template file, or a tokenizer whose chat template is cloned."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model."})

    # Data
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    eos_token: str | None = field(
        default=None,
        metadata={"help": "End-of-sequence token (default: the processing class's eos_token)."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Pairs whose chosen or rejected sequence has more tokens than this are dropped. None: keep all."
        },
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batches to a multiple of this length. 'auto': 128 on Neuron, no padding elsewhere."},
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "posttrain: pack each batch's sequences into one row without padding (position_ids restart per "
            "sequence); needs a model whose reward head is `score`, as transformers' decoder-only classifiers."
        },
    )

    # Training
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight of mean((r_chosen + r_rejected)^2) in the loss, pulling the rewards towards zero mean "
            "(Eisenstein et al. 2023, Eq. 2). Recommended: 0.01. None: off."
        },
    )

    # Deprecated
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated: set `tokenizer.pad_token` and pass the tokenizer as `processing_class`."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = _resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        self._validate()
        if self.pad_token is not None:
            warnings.warn(
                "pad_token is deprecated (as in TRL 1.16, removed in 2.0): set tokenizer.pad_token and pass the "
                "tokenizer as processing_class",
                FutureWarning,
                stacklevel=3,
            )

    def _validate(self):
        coef = self.center_rewards_coefficient
        if coef is not None and not (isinstance(coef, (int, float)) and math.isfinite(coef) and coef >= 0):
            raise ValueError(f"center_rewards_coefficient must be None or a finite number >= 0, got {coef!r}")
        for name in ("max_length", "dataset_num_proc", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
