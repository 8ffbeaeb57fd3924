"""GRPOConfig: TRL 1.16's GRPO options, same names and defaults, plus posttrain's `use_fused_kernels`."""

import math
import warnings
from dataclasses import dataclass, field

from posttrain.ops.grpo_advantages import MULTI_OBJECTIVE_AGGREGATIONS, SCALE_REWARDS
from posttrain.ops.grpo_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES

from .base import PosttrainConfig

VLLM_MODES = ("colocate", "server")
VLLM_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


def _is_finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _finite(field: str, value, condition: str, holds) -> None:
    """A field that must be a finite number meeting `condition` (its text, with `holds` its check)."""
    if not (_is_finite(value) and holds(value)):
        raise ValueError(f"{field} must be a finite number {condition}".rstrip() + f", got {value!r}")


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of: {', '.join(map(str, choices))}")


@dataclass
class GRPOConfig(PosttrainConfig):
    """Configuration of `GRPOTrainer`: TRL 1.16's `GRPOConfig` field for field (names, defaults, validation).

    Only GRPO's own options are listed here; the rest are transformers' `TrainingArguments`. Defaults that differ from
    TrainingArguments: learning_rate 1e-6, logging_steps 10, gradient_checkpointing True, bf16 True unless fp16,
    remove_unused_columns False (reward functions read the dataset's other columns).

    The batch arithmetic: one generation batch of `generation_batch_size` completions (prompts x num_generations) is
    sampled, scored and split into `steps_per_generation` micro-batches of `per_device_train_batch_size` (per process);
    set at most one of the two, the other follows (default: steps_per_generation = gradient_accumulation_steps).
    Each generation batch is trained on `num_iterations` times.

    Parameters (grouped as in TRL):
        Model: model_init_kwargs, trust_remote_code, router_aux_loss_coef, disable_dropout, cast_lm_head_to_fp32.
        Data: remove_unused_columns, num_generations (>= 2), num_generations_eval, max_completion_length,
            ds3_gather_for_generation, shuffle_dataset, pad_to_multiple_of ("auto": 128 on Neuron, else none).
        Generation: generation_batch_size, steps_per_generation, temperature, top_p, top_k, min_p, generation_kwargs
            (extra GenerationConfig / SamplingParams fields, which win over the ones above), chat_template_kwargs,
            repetition_penalty, cache_implementation, use_transformers_continuous_batching (+ config),
            transformers_sampling_logprobs (posttrain's: the importance-sampling correction without vLLM).
        vLLM (optional dependency, `pip install 'posttrain[vllm]'`): use_vllm, vllm_mode, vllm_model_impl,
            vllm_enable_sleep_mode, vllm_structured_outputs_regex, vllm_server_*, vllm_group_port,
            vllm_gpu_memory_utilization, vllm_max_model_length, vllm_tensor_parallel_size,
            vllm_importance_sampling_correction / _mode / _clip_max / _clip_min (and the deprecated _cap).
        Loss: beta (KL coefficient; a reference model is built only when it is not 0), num_iterations, epsilon,
            epsilon_high (default: epsilon), delta, loss_type (default "dapo"), importance_sampling_level,
            sapo_temperature_pos / _neg, vespo_*, reward_weights, multi_objective_aggregation, scale_rewards ("group",
            "batch", "none"; True and False are mapped to "group" and "none"), mask_truncated_completions,
            sync_ref_model / ref_model_mixup_alpha / ref_model_sync_steps, top_entropy_quantile, entropy_coef,
            use_adaptive_entropy / entropy_coef_min / _max / _delta / entropy_target, max_tool_calling_iterations,
            off_policy_mask_threshold, use_bias_correction_kl.
        Logging: log_completions, log_multimodal, num_completions_to_print, log_unique_prompts,
            log_completions_hub_repo.
        use_fused_kernels: posttrain's switch (see PosttrainConfig).

    Which of these GRPOTrainer implements is listed in its docstring; a field it does not implement raises
    NotImplementedError there when set away from its default.

    Example:
        >>> args = GRPOConfig(output_dir="out", num_generations=4, per_device_train_batch_size=8,
        ...                   max_completion_length=256, loss_type="grpo", beta=0.04)
        >>> args.steps_per_generation, args.generation_batch_size
        (1, 8)
    """

    _VALID_DICT_FIELDS = PosttrainConfig._VALID_DICT_FIELDS + [
        "transformers_continuous_batching_config", "generation_kwargs", "chat_template_kwargs",
    ]  # fmt: skip

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})

    # Model and reference model
    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of the MoE load-balancing loss (None: the model config's; 0.0: off)."}
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability to 0."})
    cast_lm_head_to_fp32: bool = field(
        default=False, metadata={"help": "Run the LM head in float32 (untied embeddings only)."}
    )

    # Data
    remove_unused_columns: bool | None = field(
        default=False,
        metadata={"help": "Keep only the 'prompt' column. Leave False when reward functions read other columns."},
    )
    num_generations: int | None = field(
        default=8, metadata={"help": "Completions sampled per prompt (the group size, >= 2)."}
    )
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Completions per prompt in evaluation (None: num_generations)."}
    )
    max_completion_length: int | None = field(default=512, metadata={"help": "Maximum tokens per completion."})
    ds3_gather_for_generation: bool = field(
        default=True, metadata={"help": "DeepSpeed ZeRO-3: gather the policy's weights for generation."}
    )
    shuffle_dataset: bool | None = field(default=True, metadata={"help": "Shuffle the training prompts."})
    pad_to_multiple_of: int | str | None = field(
        default="auto",
        metadata={"help": "Pad prompt and completion ids to a multiple of this ('auto': 128 on Neuron, else none)."},
    )

    # Generation
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Completions per generation batch (None: per_device_train_batch_size x processes x "
                  "steps_per_generation). Exclusive with steps_per_generation."},
    )  # fmt: skip
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-steps per generation batch (None: gradient_accumulation_steps)."}
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (also applied to log-probs)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass, in (0, 1]."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling threshold, in [0, 1]."})
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra GenerationConfig (or vLLM SamplingParams) fields; they override the ones above."},
    )
    chat_template_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Extra keyword arguments for apply_chat_template."}
    )
    repetition_penalty: float = field(default=1.0, metadata={"help": "Repetition penalty (1.0: none)."})
    cache_implementation: str | None = field(
        default=None, metadata={"help": "KV-cache implementation for transformers' generate."}
    )

    # vLLM
    use_vllm: bool = field(default=False, metadata={"help": "Generate with vLLM (the `vllm` extra)."})
    vllm_mode: str = field(default="colocate", metadata={"help": "'colocate' (in-process) or 'server'."})
    vllm_model_impl: str = field(default="vllm", metadata={"help": "vLLM model implementation: 'vllm' or "
                                                           "'transformers'."})  # fmt: skip
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Offload vLLM's weights and cache during the optimizer step."}
    )
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Regex constraining vLLM's outputs (None: off)."}
    )
    vllm_server_base_url: str | None = field(default=None, metadata={"help": "vLLM server URL (server mode)."})
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "vLLM server host (server mode)."})
    vllm_server_port: int = field(default=8000, metadata={"help": "vLLM server port (server mode)."})
    vllm_server_timeout: float = field(default=240.0, metadata={"help": "Seconds to wait for the vLLM server."})
    vllm_group_port: int = field(default=51216, metadata={"help": "Port of the weight-update group (server mode)."})
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of GPU memory vLLM may use (colocate mode)."}
    )
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "vLLM context window (None: from the model config)."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallelism (colocate mode)."})

    # Loss
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0 builds no reference model."})
    num_iterations: int = field(default=1, metadata={"help": "Optimization passes per generation batch."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the ratio: 1 - epsilon."})
    delta: float | None = field(default=None, metadata={"help": "Upper cap of the unclipped ratio (two-sided)."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping bound: 1 + epsilon_high (None: epsilon)."}
    )
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO gate temperature, advantage <= 0."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO gate temperature, advantage > 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "VESPO power exponent, positive advantages."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "VESPO decay, positive advantages."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO power exponent, negative advantages."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO decay, negative advantages."})
    importance_sampling_level: str = field(
        default="token", metadata={"help": "Importance ratio per 'token' or per 'sequence' (GSPO)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (None: all 1)."}
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
    mask_truncated_completions: bool = field(
        default=False, metadata={"help": "Leave completions that hit max_completion_length out of the loss."}
    )
    sync_ref_model: bool = field(
        default=False, metadata={"help": "Mix the policy into the reference model every ref_model_sync_steps."}
    )
    ref_model_mixup_alpha: float = field(
        default=0.6, metadata={"help": "ref = alpha * policy + (1 - alpha) * ref at each sync."}
    )
    ref_model_sync_steps: int = field(default=512, metadata={"help": "Optimizer steps between reference syncs."})
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
    off_policy_mask_threshold: float | None = field(
        default=None, metadata={"help": "Drop negative-advantage sequences whose KL exceeds this (None: off)."}
    )
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "Multiply the KL term by the importance ratio (unbiased reverse KL)."}
    )

    # Logging
    log_completions: bool = field(default=False, metadata={"help": "Log (prompt, completion) samples."})
    log_multimodal: bool = field(default=True, metadata={"help": "Log images with the completions."})
    num_completions_to_print: int | None = field(default=None, metadata={"help": "Completions to print."})
    log_unique_prompts: bool = field(default=False, metadata={"help": "Log each prompt once."})
    log_completions_hub_repo: str | None = field(
        default=None, metadata={"help": "Hub dataset repository to upload the logged completions to."}
    )

    # transformers' continuous batching
    use_transformers_continuous_batching: bool = field(
        default=False, metadata={"help": "Generate with transformers' continuous batching engine."}
    )
    transformers_continuous_batching_config: dict | str | None = field(
        default=None, metadata={"help": "ContinuousBatchingConfig keyword arguments."}
    )
    transformers_sampling_logprobs: bool = field(
        default=False,
        metadata={"help": "posttrain only: transformers' generate / continuous batching report the sampled tokens' "
                  "log-probs (processed logits, as vLLM's processed_logprobs), so that the "
                  "vllm_importance_sampling_* correction and the off-policy mask use them as with vLLM (TRL corrects "
                  "vLLM samples only)."},
    )  # fmt: skip

    # Deprecated in TRL, kept so that configs written for it still load
    use_transformers_paged: bool = field(
        default=False, metadata={"help": "Deprecated: use use_transformers_continuous_batching."}
    )
    vllm_importance_sampling_cap: float | None = field(
        default=None, metadata={"help": "Deprecated: use vllm_importance_sampling_clip_max."}
    )

    def __post_init__(self):
        super().__post_init__()
        self._resolve_padding()
        self._resolve_deprecated()
        self.scale_rewards = {True: "group", False: "none"}.get(self.scale_rewards, self.scale_rewards)
        self._check_choices()
        parallelism = getattr(self, "parallelism_config", None)
        if parallelism is not None and (parallelism.cp_enabled or parallelism.sp_enabled):
            raise ValueError(
                "parallelism_config with cp_size > 1 or sp_size > 1 is not supported by GRPO: its inputs are built "
                "from the generated completions inside the trainer, after the data loader would have sharded them"
            )
        if self.auto_find_batch_size:
            raise ValueError(
                "auto_find_batch_size=True is not supported by GRPO: halving the batch on out-of-memory would split "
                "the groups of num_generations completions of a prompt; lower per_device_train_batch_size instead"
            )
        if self.log_completions_hub_repo is not None and not self.log_completions:
            raise ValueError(f"log_completions_hub_repo={self.log_completions_hub_repo!r} needs log_completions=True")
        self._resolve_generation_batch()
        self._check_vllm_importance_sampling()

    def _resolve_padding(self):
        # the CLI passes every value as a string
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":
            value = self.pad_to_multiple_of
            self.pad_to_multiple_of = None if value.lower() in ("none", "null") else int(value)
        if self.pad_to_multiple_of == "auto":
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None

    def _resolve_deprecated(self):
        if self.use_transformers_paged:
            warnings.warn(
                "use_transformers_paged is deprecated (as in TRL): use use_transformers_continuous_batching",
                FutureWarning,
                stacklevel=3,
            )
            self.use_transformers_continuous_batching = True
        if self.vllm_importance_sampling_cap is not None:
            warnings.warn(
                "vllm_importance_sampling_cap is deprecated (as in TRL): use vllm_importance_sampling_clip_max",
                FutureWarning,
                stacklevel=3,
            )
            self.vllm_importance_sampling_clip_max = self.vllm_importance_sampling_cap

    def _check_choices(self):
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        _one_of("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        _one_of("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_SAMPLING_LEVELS)
        _one_of("multi_objective_aggregation", self.multi_objective_aggregation, MULTI_OBJECTIVE_AGGREGATIONS)
        _one_of("vllm_mode", self.vllm_mode, VLLM_MODES)
        _one_of("vllm_importance_sampling_mode", self.vllm_importance_sampling_mode, VLLM_IS_MODES)
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int):
            raise TypeError(f"num_generations must be an integer >= 2, got {self.num_generations!r}")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2, got {self.num_generations}: GRPO's advantages compare each "
                "completion with the other completions of its prompt"
            )
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be an integer >= 1, got {self.max_completion_length!r}")
        if not 0.0 <= self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        _finite("temperature", self.temperature, "> 0", lambda x: x > 0)
        _finite("beta", self.beta, ">= 0 (the KL coefficient; 0 builds no reference model)", lambda x: x >= 0)
        _finite("epsilon", self.epsilon, ">= 0", lambda x: x >= 0)
        if self.epsilon_high is not None:
            _finite("epsilon_high", self.epsilon_high, ">= 0", lambda x: x >= 0)
        _finite("entropy_coef", self.entropy_coef, "", lambda x: True)
        for weight in self.reward_weights or ():
            if not _is_finite(weight):
                raise ValueError(f"reward_weights must be finite numbers, got {self.reward_weights!r}")

    def _resolve_generation_batch(self):
        global_batch = self.per_device_train_batch_size * self.world_size
        if self.generation_batch_size is not None and self.steps_per_generation is not None:
            raise ValueError(
                f"set generation_batch_size ({self.generation_batch_size}) or steps_per_generation "
                f"({self.steps_per_generation}), not both: each determines the other"
            )
        if self.generation_batch_size is None:
            if self.steps_per_generation is None:
                self.steps_per_generation = self.gradient_accumulation_steps
            self.generation_batch_size = global_batch * self.steps_per_generation
        else:
            if self.generation_batch_size % global_batch != 0:
                raise ValueError(
                    f"generation_batch_size ({self.generation_batch_size}) must be a multiple of the global batch "
                    f"size, per_device_train_batch_size x processes = {global_batch}"
                )
            self.steps_per_generation = self.generation_batch_size // global_batch
        if self.generation_batch_size % self.num_generations != 0:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size}) must be a multiple of num_generations "
                f"({self.num_generations}): each prompt's {self.num_generations} completions must be in one "
                "generation batch"
            )
        if self.do_eval and self.eval_strategy != "no":
            eval_generations = self.num_generations_eval or self.num_generations
            eval_batch = self.per_device_eval_batch_size * self.world_size
            if eval_batch % eval_generations != 0:
                raise ValueError(
                    f"the global eval batch size ({eval_batch}) must be a multiple of the generations per prompt "
                    f"in evaluation ({eval_generations})"
                )

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
