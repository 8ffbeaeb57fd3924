"""KTOConfig: TRL 1.16's KTOConfig fields and defaults, checked up front."""

import math
from dataclasses import dataclass, field

from posttrain.losses.kto import ESTIMATES_KL, LOSS_TYPES, check_loss_type

from .base import PosttrainConfig


@dataclass
class KTOConfig(PosttrainConfig):
    """Configuration of `posttrain.KTOTrainer`, field for field TRL 1.16's `KTOConfig` (same names and defaults).

    Defaults that differ from TrainingArguments: learning_rate 1e-6, logging_steps 10, gradient_checkpointing True,
    bf16 True unless fp16 is set, train_sampling_strategy "sequential" (the KL estimate pairs each example with its
    neighbour in a fixed-order batch). posttrain adds `use_fused_kernels` (see PosttrainConfig).

    Model: model_init_kwargs (for `from_pretrained` when the model is given as a string), trust_remote_code,
    router_aux_loss_coef (MoE load-balancing loss weight; None: the model config's), disable_dropout (True).

    Data: dataset_num_proc, max_length (1024; prompt + completion, per sequence, truncated at the end),
    pad_to_multiple_of ("auto": 128 on Neuron, else None), precompute_ref_log_probs (False), precompute_ref_batch_size
    (None: the train / eval batch size).

    Loss: loss_type ("kto" or "apo_zero_unpaired"), beta (0.1), desirable_weight and undesirable_weight (1.0 each:
    the factors of the desirable and undesirable examples' losses), activation_offloading (False), sync_ref_model
    (TR-DPO's reference mixing, False), ref_model_mixup_alpha (0.6), ref_model_sync_steps (512).

    Raises ValueError, naming the field and the value, for an unknown loss_type, a non-positive beta, a negative or
    non-finite weight, a KL-estimating loss type with per_device_train_batch_size 1 or a sampling strategy other than
    "sequential", sync_ref_model with precompute_ref_log_probs, and non-positive sizes.

    Example:
        >>> args = KTOConfig(output_dir="out", desirable_weight=1.33, per_device_train_batch_size=8)
        >>> args.train_sampling_strategy
        'sequential'
    """

    
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Order of the training examples: 'random', 'sequential' or 'group_by_length'. The loss types "
            "that estimate the KL term (all but 'apo_zero_unpaired') need 'sequential': each example's mismatched "
            "completion comes from its neighbour in the same batch.",
            "choices": ["random", "sequential", "group_by_length"],
        },
    )

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
        metadata={"help": "Maximum tokens of prompt + completion; longer sequences lose their end. None: no limit."},
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
    loss_type: str = field(
        default="kto",
        metadata={"help": f"Loss type: {', '.join(LOSS_TYPES)}.", "choices": list(LOSS_TYPES)},
    )
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL constraint to the reference."})
    desirable_weight: float = field(
        default=1.0,
        metadata={
            "help": "Factor of the desirable examples' losses (to balance unequal desirable / undesirable counts)."
        },
    )
    undesirable_weight: float = field(
        default=1.0,
        metadata={"help": "Factor of the undesirable examples' losses (to balance unequal counts)."},
    )
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

    def __post_init__(self):
        self._check_loss_settings()
        self._check_sizes()
        super().__post_init__()
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":
            text = self.pad_to_multiple_of
            self.pad_to_multiple_of = None if text.lower() in ("none", "null") else int(text)
        if self.pad_to_multiple_of == "auto":
            # Neuron compiles once per input shape: fixed multiples bound the number of compilations
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None

    @property
    def estimates_kl(self) -> bool:
        """Whether loss_type reads the KL estimate from mismatched (prompt, completion) pairs."""
        return ESTIMATES_KL[self.loss_type]

    def _check_loss_settings(self):
        check_loss_type(self.loss_type)
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a finite number > 0, got {self.beta!r}")
        for name in ("desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.estimates_kl and self.train_sampling_strategy != "sequential":
            raise ValueError(
                f"train_sampling_strategy {self.train_sampling_strategy!r} breaks loss_type {self.loss_type!r}: its KL "
                "estimate pairs each example with the completion of its neighbour in the same batch, which needs "
                "train_sampling_strategy='sequential' (or use loss_type='apo_zero_unpaired')"
            )
        if self.estimates_kl and self.per_device_train_batch_size <= 1:
            raise ValueError(
                f"per_device_train_batch_size={self.per_device_train_batch_size} with loss_type {self.loss_type!r}: "
                "the KL estimate pairs each example with another one of its batch, so a batch of 1 pairs it with "
                "itself and the KL term equals the implied reward. Use a batch size > 1"
            )
        if self.sync_ref_model and self.precompute_ref_log_probs:
            raise ValueError(
                "sync_ref_model=True updates the reference model during training, so precompute_ref_log_probs=True "
                "would use stale reference log-probs: set one of them to False"
            )

    def _check_sizes(self):
        if self.max_length is not None and not (isinstance(self.max_length, int) and self.max_length > 0):
            raise ValueError(f"max_length must be a positive integer or None, got {self.max_length!r}")
        for name in ("precompute_ref_batch_size", "ref_model_sync_steps"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
