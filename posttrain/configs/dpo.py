"""DPOConfig: TRL 1.16's DPOConfig fields and defaults, checked up front."""

import math
import warnings
from dataclasses import dataclass, field

from posttrain.ops.dpo_loss import F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCE_TYPES, LOSS_TYPES, check_label_smoothing

from .base import TRUNCATION_MODES, PosttrainConfig


@dataclass
class DPOConfig(PosttrainConfig):
    """Configuration of `posttrain.DPOTrainer`, field for field TRL 1.16's `DPOConfig` (same names and defaults).

    Defaults that differ from TrainingArguments: learning_rate 1e-6, logging_steps 10, gradient_checkpointing True,
    bf16 True unless fp16 is set. posttrain adds `use_fused_kernels` (see PosttrainConfig).

    Model: model_init_kwargs (for `from_pretrained` when the model is given as a string), trust_remote_code,
    router_aux_loss_coef (MoE load-balancing loss weight; None: the model config's), disable_dropout (True).

    Data: dataset_num_proc, max_length (1024; prompt + completion, per sequence), truncation_mode ("keep_start", or
    the deprecated "keep_end"), padding_free (False; True packs the chosen and rejected sequences of a batch into one
    row), pad_to_multiple_of ("auto": 128 on Neuron, else None), precompute_ref_log_probs (False),
    precompute_ref_batch_size (None: the train / eval batch size).

    Loss: loss_type (["sigmoid"]; a string or a list, see `posttrain.ops.dpo_loss` for every type), loss_weights (one
    per loss type, default 1.0 each), ld_alpha (LD-DPO, in [0, 1]), f_divergence_type ("reverse_kl") and
    f_alpha_divergence_coef (0.5), label_smoothing (0.0), beta (0.1), use_weighting (WPO, False), discopop_tau (0.05),
    activation_offloading (False), sync_ref_model (TR-DPO, False), ref_model_mixup_alpha (0.6),
    ref_model_sync_steps (512). pad_token is deprecated (set tokenizer.pad_token instead).

    Raises ValueError, naming the field and the value, for an unknown loss_type / f_divergence_type /
    truncation_mode, loss_weights of another length than loss_type, label_smoothing outside the range its loss
    types accept, a non-positive beta, ld_alpha outside [0, 1], and the combinations TRL rejects.

    Example:
        >>> args = DPOConfig(output_dir="out", loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], beta=0.05)
        >>> args.loss_type
        ['sigmoid', 'sft']
    """

    
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})

    # Model
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={"help": "Weight of the MoE load-balancing loss (None: the model config's; 0.0: off)."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model and reference model."})

    # Data
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset preparation."})
    max_length: int | None = field(
        default=1024,
        metadata={"help": "Maximum tokens of prompt + completion; longer sequences are truncated. None: no limit."},
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "Which end of an over-long sequence to keep: 'keep_start', or the deprecated 'keep_end'.",
            "choices": list(TRUNCATION_MODES),
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={"help": "Pack the chosen and rejected sequences of a batch into one row without padding."},
    )
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad batches to a multiple of this length. 'auto': 128 on Neuron, no padding elsewhere."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute the reference log-probs of the whole dataset before training; no reference model "
                  "is kept in memory then."},
    )  # fmt: skip
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of that precomputation (None: per_device_train/eval_batch_size)."},
    )

    # Loss
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": f"Loss type(s), combined with loss_weights: {', '.join(LOSS_TYPES)}."},
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss type (default 1.0 each)."}
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={"help": "LD-DPO: weight in [0, 1] of the completion tokens beyond the shorter completion's length."},
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={"help": f"f-DPO divergence: {', '.join(F_DIVERGENCE_TYPES)}."},
    )
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "alpha of f_divergence_type='alpha_divergence'."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Preference-flip probability of robust / aot / aot_unpaired in [0, 0.5); EXO's epsilon in "
                  "(0, 0.5)."},
    )  # fmt: skip
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference (tau of IPO)."})
    use_weighting: bool = field(
        default=False, metadata={"help": "WPO: weight each pair by its completions' length-normalized probabilities."}
    )
    discopop_tau: float = field(default=0.05, metadata={"help": "tau of loss_type='discopop'."})
    activation_offloading: bool = field(
        default=False, metadata={"help": "Keep the activations saved for the backward in CPU memory."}
    )
    sync_ref_model: bool = field(
        default=False, metadata={"help": "TR-DPO: mix the policy into the reference model every ref_model_sync_steps."}
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "TR-DPO: ref = alpha * policy + (1 - alpha) * ref at each sync."}
    )
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO: steps between two syncs."})

    pad_token: str | None = field(
        default=None, metadata={"help": "Deprecated: set tokenizer.pad_token and pass the tokenizer instead."}
    )

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self._check_loss_settings()
        self._check_data_settings()
        if self.pad_token is not None:
            warnings.warn(
                "pad_token is deprecated (as in TRL, to be removed in 2.0): set tokenizer.pad_token and pass the "
                "tokenizer as processing_class instead",
                FutureWarning,
                stacklevel=3,
            )
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":
            text = self.pad_to_multiple_of
            self.pad_to_multiple_of = None if text.lower() in ("none", "null") else int(text)
        if self.pad_to_multiple_of == "auto":
            # Neuron compiles once per input shape: fixed multiples bound the number of compilations
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None

    def _check_loss_settings(self):
        unknown = [name for name in self.loss_type if name not in LOSS_TYPES]
        if not self.loss_type or unknown:
            raise ValueError(f"loss_type {self.loss_type!r}: each must be one of: {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(
                f"loss_weights {self.loss_weights!r} has {len(self.loss_weights)} weights but loss_type "
                f"{self.loss_type!r} has {len(self.loss_type)} loss types: give one weight per loss type"
            )
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        if self.loss_weights is not None and not all(
            isinstance(w, (int, float)) and math.isfinite(w) for w in self.loss_weights
        ):
            raise ValueError(f"loss_weights must be finite numbers, got {self.loss_weights!r}")
        if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
            raise ValueError(f"ref_model_mixup_alpha must lie in [0, 1], got {self.ref_model_mixup_alpha!r}")
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ValueError(
                f"f_divergence_type {self.f_divergence_type!r} is not one of: {', '.join(F_DIVERGENCE_TYPES)}"
            )
        unsupported = [name for name in self.loss_type if name not in F_DIVERGENCE_LOSS_TYPES]
        if self.f_divergence_type != "reverse_kl" and unsupported:
            raise ValueError(
                f"f_divergence_type {self.f_divergence_type!r} is only defined for the loss types built on the "
                f"chosen-minus-rejected margin ({', '.join(F_DIVERGENCE_LOSS_TYPES)}); loss_type {self.loss_type!r} "
                f"includes {', '.join(unsupported)}: use f_divergence_type='reverse_kl' with those"
            )
        for name in self.loss_type:
            check_label_smoothing(name, self.label_smoothing)
        if self.ld_alpha is not None and not (isinstance(self.ld_alpha, (int, float)) and 0.0 <= self.ld_alpha <= 1.0):
            raise ValueError(f"ld_alpha must lie in [0, 1] (or be None), got {self.ld_alpha!r}")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_type):
            raise NotImplementedError(
                f"use_weighting=True (WPO) cannot weight loss_type {self.loss_type!r}: aot and aot_unpaired sort the "
                "pairs, so per-pair weights would no longer line up with their pairs"
            )
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError(
                "sync_ref_model=True updates the reference model during training, so precompute_ref_log_probs=True "
                "would use stale reference log-probs: set one of them to False"
            )

    def _check_data_settings(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode {self.truncation_mode!r} is not one of: {', '.join(TRUNCATION_MODES)}")
        if self.truncation_mode == "keep_end":
            warnings.warn(
                "truncation_mode='keep_end' is deprecated (as in TRL, to be removed in 2.0): use 'keep_start'",
                FutureWarning,
                stacklevel=3,
            )
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length > 0):
            raise ValueError(f"max_length must be a positive integer or None, got {self.max_length!r}")
        for name in ("precompute_ref_batch_size", "ref_model_sync_steps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
