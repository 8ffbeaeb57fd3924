"""SFTConfig: TRL 1.16's SFT fields and defaults, validated when the config is built."""

import warnings
from dataclasses import dataclass, field
from typing import Any

from .base import TRUNCATION_MODES, PosttrainConfig

PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
LOSS_TYPES = ("nll", "dft")
DATASET_KWARGS = ("skip_prepare_dataset",)


@dataclass
class SFTConfig(PosttrainConfig):
    """Configuration of `posttrain.SFTTrainer`: the fields of TRL 1.16's `SFTConfig`, with the same defaults.

    Model:
        model_init_kwargs: keyword arguments for `from_pretrained` when the trainer's `model` is a string.
        trust_remote_code: forwarded to `from_pretrained` of the model.
        router_aux_loss_coef: MoE load-balancing loss weight (None: the model config's; 0.0 turns it off).
        chat_template_path: a .jinja / .j2 file, or a tokenizer (path or hub id) whose chat template and added tokens
            are cloned into the processing class.

    Data:
        dataset_text_field: column holding the text of language-modeling datasets ("text").
        dataset_kwargs: {"skip_prepare_dataset": bool} (the only key TRL reads).
        dataset_num_proc: processes for `Dataset.map`.
        eos_token / pad_token: override the tokenizer's (pad_token is deprecated, as in TRL).
        max_length: tokens per sequence (1024); longer ones are truncated, and packing fills rows of this length.
            None disables truncation.
        truncation_mode: "keep_start" (default) or "keep_end" (deprecated in TRL 1.16).
        shuffle_dataset: shuffle the prepared dataset with `seed`.
        packing / packing_strategy: pack sequences into max_length rows: "bfd" (best-fit decreasing, overflow
            truncated), "bfd_split" (overflow split into more sequences) or "wrapped" (concatenated and cut).
        padding_free: flatten each batch into one row with position_ids restarting per sequence (on with bfd packing).
        pad_to_multiple_of: pad batches to a multiple of this; "auto" = 128 on Neuron, else None.
        eval_packing: pack the eval dataset (None: as `packing`).

    Training:
        completion_only_loss: loss on completions only (None: on for prompt-completion data).
        assistant_only_loss: loss on assistant turns only (needs a chat template with {% generation %} markers).
        loss_type: "nll" or "dft" (each token's loss weighted by its detached probability); "chunked_nll" is a
            deprecated alias of "nll".
        learning_rate: 2e-5 (TRL's default).

    Example:
        >>> args = SFTConfig(output_dir="out", max_length=512, packing=True, bf16=False)
        >>> args.packing_strategy, args.padding_free, args.completion_only_loss
        ('bfd', False, None)
    """

    _VALID_DICT_FIELDS = PosttrainConfig._VALID_DICT_FIELDS + ["dataset_kwargs"]

    learning_rate: float = field(default=2e-5, metadata={"help": "The initial learning rate for AdamW."})

    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss (None: the model config's; 0.0: off)."},
    )
    chat_template_path: str | None = field(
        default=None,
        metadata={"help": "A .jinja/.j2 chat template file, or a tokenizer whose chat template is cloned."},
    )

    dataset_text_field: str = field(default="text", metadata={"help": "Column holding the text of each example."})
    dataset_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Options of the dataset preparation; the only key is `skip_prepare_dataset`."},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for the dataset preparation."})
    eos_token: str | None = field(
        default=None,
        metadata={"help": "End-of-sequence token (default: the processing class's eos_token)."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokens per sequence (truncation; the row length when packing). None: no limit."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={"help": "Which end of a too-long sequence is kept.", "choices": list(TRUNCATION_MODES)},
    )
    shuffle_dataset: bool = field(default=False, metadata={"help": "Shuffle the prepared dataset."})
    packing: bool = field(default=False, metadata={"help": "Pack sequences into rows of `max_length` tokens."})
    packing_strategy: str = field(
        default="bfd",
        metadata={"help": "How sequences are packed.", "choices": list(PACKING_STRATEGIES)},
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Flatten each batch into one unpadded row (always on with bfd / bfd_split packing)."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batches to a multiple of this value; 'auto' pads to 128 on Neuron only."},
    )
    eval_packing: bool | None = field(
        default=None,
        metadata={"help": "Pack the eval dataset (None: same as `packing`)."},
    )

    completion_only_loss: bool | None = field(
        default=None,
        metadata={"help": "Loss on the completion only (None: on for prompt-completion datasets)."},
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={"help": "Loss on the assistant turns only (conversational datasets)."},
    )
    loss_type: str = field(
        default="nll",
        metadata={"help": "'nll' or 'dft' (Dynamic Fine-Tuning).", "choices": [*LOSS_TYPES, "chunked_nll"]},
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "Deprecated: set `tokenizer.pad_token` and pass the tokenizer as `processing_class`."},
    )

    def __post_init__(self):
        super().__post_init__()
        self.pad_to_multiple_of = _resolve_pad_to_multiple_of(self.pad_to_multiple_of, self.device.type)
        self._resolve_deprecated_values()
        self._validate()

    def _resolve_deprecated_values(self):
        if self.loss_type == "chunked_nll":
            _deprecated("loss_type='chunked_nll' is deprecated (as in TRL 1.16); it computes the same as 'nll'")
            self.loss_type = "nll"
        if self.packing_strategy == "bfd-requeue":
            _deprecated("packing_strategy='bfd-requeue' is deprecated (as in TRL 1.16); it is now 'bfd_split'")
            self.packing_strategy = "bfd_split"
        if self.truncation_mode == "keep_end":
            _deprecated("truncation_mode='keep_end' is deprecated (as in TRL 1.16); prefer 'keep_start'")
        if self.pad_token is not None:
            _deprecated("pad_token is deprecated (as in TRL 1.16): set tokenizer.pad_token and pass the tokenizer")

    def _validate(self):
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {self.max_length!r}")
        _check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        _check_choice("packing_strategy", self.packing_strategy, PACKING_STRATEGIES)
        _check_choice("loss_type", self.loss_type, LOSS_TYPES)
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError(
                f"pad_to_multiple_of must be a positive integer, 'auto' or None, got {self.pad_to_multiple_of}"
            )
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ValueError(f"dataset_num_proc must be a positive integer or None, got {self.dataset_num_proc}")
        unknown = sorted(set(self.dataset_kwargs or {}) - set(DATASET_KWARGS))
        if unknown:
            warnings.warn(
                f"dataset_kwargs keys {unknown} are ignored: the only key SFT reads is 'skip_prepare_dataset'",
                stacklevel=3,
            )


def _resolve_pad_to_multiple_of(value, device_type: str) -> int | None:
    if isinstance(value, str) and value != "auto":
        if value.lower() in ("none", "null"):
            return None
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"pad_to_multiple_of must be an integer, 'auto' or None, got {value!r}") from None
    if value == "auto":
        # Neuron compiles one graph per input shape; padding bounds how many it compiles
        return 128 if device_type == "neuron" else None
    return value


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of: {', '.join(choices)}")


def _deprecated(message: str) -> None:
    warnings.warn(message, FutureWarning, stacklevel=4)
