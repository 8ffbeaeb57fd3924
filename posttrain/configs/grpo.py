"""GRPOConfig: TRL 1.16's GRPO options, same names and defaults, plus posttrain's `use_fused_kernels`."""

import warnings
from dataclasses import dataclass, field

from posttrain.ops.grpo_advantages import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS
from posttrain.ops.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES

from .online import GroupRolloutConfig, check_finite, check_one_of, is_finite

VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class GRPOConfig(GroupRolloutConfig):
    """Configuration of `GRPOTrainer`: TRL 1.16's `GRPOConfig` field for field (names, defaults, validation).

    Only GRPO's own options are listed here; those it shares with RLOO (the grouped generation batch, the clipped
    ratio, the reference model) are in `GroupRolloutConfig`, those of every online trainer (sampling, vLLM, completion
    logging) in `OnlineConfig`, the rest are transformers' `TrainingArguments`. Defaults that differ from
    TrainingArguments: learning_rate 1e-6, logging_steps 10, gradient_checkpointing True, bf16 True unless fp16,
    remove_unused_columns False (reward functions read the dataset's other columns).

    Parameters (grouped as in TRL):
        Model: cast_lm_head_to_fp32.
        Generation: transformers_sampling_logprobs (posttrain's: the importance-sampling correction without vLLM).
        vLLM: vllm_importance_sampling_correction / _mode / _clip_max / _clip_min (and the deprecated _cap).
        Loss: num_generations (default 8), beta (default 0.0), delta, loss_type (default "dapo"),
            importance_sampling_level, sapo_temperature_pos / _neg, vespo_*, multi_objective_aggregation,
            scale_rewards ("group", "batch", "none"; True and False are mapped to "group" and "none"),
            top_entropy_quantile, entropy_coef, use_adaptive_entropy / entropy_coef_min / _max / _delta /
            entropy_target, max_tool_calling_iterations, off_policy_mask_threshold, use_bias_correction_kl.
        Logging: log_completions_hub_repo.
        use_fused_kernels: posttrain's switch (see PosttrainConfig).

    Which of these GRPOTrainer implements is listed in its docstring; a field it does not implement raises
    NotImplementedError there when set away from its default.

    Example:
        >>> args = GRPOConfig(output_dir="out", num_generations=4, per_device_train_batch_size=8,
        ...                   max_completion_length=256, loss_type="grpo", beta=0.04)
        >>> args.steps_per_generation, args.generation_batch_size
        (1, 8)
    """

    # Model
    cast_lm_head_to_fp32: bool = field(
        default=False, metadata={"help": "Run the LM head in float32 (untied embeddings only)."}
    )

    # Loss
    delta: float | None = field(default=None, metadata={"help": "Upper cap of the unclipped ratio (two-sided)."})
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO gate temperature, advantage <= 0."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO gate temperature, advantage > 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "VESPO power exponent, positive advantages."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "VESPO decay, positive advantages."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO power exponent, negative advantages."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO decay, negative advantages."})
    importance_sampling_level: str = field(
        default="token", metadata={"help": "Importance ratio per 'token' or per 'sequence' (GSPO)."}
    )
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={"help": "'sum_then_normalize' or 'normalize_then_sum' (GDPO) for several reward functions."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Divide advantages by the 'group' std, the 'batch' std, or not ('none'); True/False map "
                  "to 'group'/'none'."},
    )  # fmt: skip
    loss_type: str = field(default="dapo", metadata={"help": f"One of: {', '.join(LOSS_TYPES)}."})
    top_entropy_quantile: float = field(
        default=1.0, metadata={"help": "Train only on the top quantile of tokens by entropy (1.0: all)."}
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the mean-entropy bonus (0: off)."})
    use_adaptive_entropy: bool = field(
        default=False, metadata={"help": "Adapt entropy_coef each optimizer step toward entropy_target."}
    )
    entropy_coef_min: float = field(default=0.0, metadata={"help": "Adaptive entropy: lower bound of the coef."})
    entropy_coef_max: float = field(default=1.0, metadata={"help": "Adaptive entropy: upper bound of the coef."})
    entropy_coef_delta: float = field(default=0.005, metadata={"help": "Adaptive entropy: step of the coef."})
    entropy_target: float = field(
        default=0.2, metadata={"help": "Adaptive entropy: the bonus applies at or below this mean entropy (nats)."}
    )
    max_tool_calling_iterations: int | None = field(
        default=None, metadata={"help": "Maximum tool-calling turns (None: no limit)."}
    )
    off_policy_mask_threshold: float | None = field(
        default=None, metadata={"help": "Drop negative-advantage sequences whose KL exceeds this (None: off)."}
    )
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "Multiply the KL term by the importance ratio (unbiased reverse KL)."}
    )

    # vLLM importance sampling
    vllm_importance_sampling_correction: bool = field(
        default=True, metadata={"help": "Correct the vLLM / training log-prob mismatch by importance sampling."}
    )
    vllm_importance_sampling_mode: str = field(
        default="sequence_mask", metadata={"help": f"One of: {', '.join(VLLM_IS_MODES)}."}
    )
    vllm_importance_sampling_clip_max: float | None = field(
        default=3.0, metadata={"help": "Upper bound of the vLLM importance ratio."}
    )
    vllm_importance_sampling_clip_min: float | None = field(
        default=None, metadata={"help": "Lower bound of the vLLM importance ratio."}
    )

    # Logging
    log_completions_hub_repo: str | None = field(
        default=None, metadata={"help": "Hub dataset repository to upload the logged completions to."}
    )

    # Generation (posttrain's own)
    transformers_sampling_logprobs: bool = field(
        default=False,
        metadata={"help": "posttrain only: transformers' generate / continuous batching report the sampled tokens' "
                  "log-probs (processed logits, as vLLM's processed_logprobs), so that the "
                  "vllm_importance_sampling_* correction and the off-policy mask use them as with vLLM (TRL corrects "
                  "vLLM samples only)."},
    )  # fmt: skip

    # Deprecated in TRL, kept so that configs written for it still load
    vllm_importance_sampling_cap: float | None = field(
        default=None, metadata={"help": "Deprecated: use vllm_importance_sampling_clip_max."}
    )

    def __post_init__(self):
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        if self.vllm_importance_sampling_cap is not None:
            warnings.warn(
                "vllm_importance_sampling_cap is deprecated (as in TRL): use vllm_importance_sampling_clip_max",
                FutureWarning,
                stacklevel=3,
            )
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap
        super().__post_init__()
        self._check_choices()
        if self.log_completions_hub_repo is not None and not self.log_completions:
            raise ValueError(f"log_completions_hub_repo={self.log_completions_hub_repo!r} needs log_completions=True")
        self._check_vllm_importance_sampling()

    def _check_choices(self):
        check_one_of("loss_type", self.loss_type, LOSS_TYPES)
        check_one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        check_one_of("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        check_one_of("multi_objective_aggregation", self.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
        check_one_of("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, VLLM_IS_MODES)
        if not (is_finite(self.top_entropy_quantile) and 0.0 <= self.top_entropy_quantile <= 1.0):
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        check_finite("entropy_coef", self.entropy_coef, "", lambda x: True)

    def _check_vllm_importance_sampling(self):
        low, high = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if low is not None and high is not None and low >= high:
            raise ValueError(
                f"vllm_importance_sampling_clip_min ({low}) must be < vllm_importance_sampling_clip_max ({high})"
            )
        if (
            self.loss_type == "vespo"
            and (self.use_vllm or self.transformers_sampling_logprobs)
            and self.vllm_importance_sampling_correction
            and self.vllm_importance_sampling_mode.startswith("sequence_")
        ):
            raise ValueError(
                f"loss_type='vespo' folds vLLM's per-token importance ratios into its sequence weight: "
                f"vllm_importance_sampling_mode must be 'token_truncate' or 'token_mask', got "
                f"{self.vllm_importance_sampling_mode!r}"
            )
        truncating = self.vllm_importance_sampling_mode.endswith("_truncate")
        if self.vllm_importance_sampling_correction and truncating and low is None and high is None:
            raise ValueError(
                f"vllm_importance_sampling_mode={self.vllm_importance_sampling_mode!r} needs "
                "vllm_importance_sampling_clip_min or vllm_importance_sampling_clip_max"
            )
