"""What the online trainers' configs share: TRL 1.16 repeats these fields, with the same names and defaults, in
GRPOConfig, RLOOConfig and DistillationConfig (sampling, vLLM, completion logging); GRPO and RLOO also share the
grouped generation batch, the clipped ratio and the reference model (`GroupRolloutConfig`)."""

import math
import warnings
from dataclasses import dataclass, field

from .base import PosttrainConfig

VLLM_MODES = ("colocate", "server")


def is_finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_finite(field: str, value, condition: str, holds) -> None:
    """A field that must be a finite number meeting `condition` (its text, with `holds` its check)."""
    if not (is_finite(value) and holds(value)):
        raise ValueError(f"{field} must be a finite number {condition}".rstrip() + f", got {value!r}")


def check_one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not one of: {', '.join(map(str, choices))}")


@dataclass
class OnlineConfig(PosttrainConfig):
    """The fields every online trainer's config has (TRL 1.16 names and defaults): completions are sampled from the
    policy during training, then learned from.

    Defaults that differ from TrainingArguments: learning_rate 1e-6, logging_steps 10, gradient_checkpointing True,
    bf16 True unless fp16, remove_unused_columns False (the trainer reads the raw prompts; reward functions may read
    the other columns).

    Parameters:
        Model: disable_dropout.
        Data: remove_unused_columns, max_completion_length, ds3_gather_for_generation, shuffle_dataset,
            pad_to_multiple_of ("auto": 128 on Neuron, else none).
        Generation: temperature (also applied to the training log-probs / divergence), top_p, top_k, min_p,
            generation_kwargs (extra GenerationConfig / SamplingParams fields, which win over the ones above),
            chat_template_kwargs, repetition_penalty, cache_implementation.
        vLLM (optional dependency, `pip install 'posttrain[vllm]'`): use_vllm, vllm_mode, vllm_model_impl,
            vllm_enable_sleep_mode, vllm_structured_outputs_regex, vllm_server_*, vllm_group_port,
            vllm_gpu_memory_utilization, vllm_max_model_length, vllm_tensor_parallel_size.
        Logging: log_completions, num_completions_to_print, log_unique_prompts.
    """

    _VALID_DICT_FIELDS = PosttrainConfig._VALID_DICT_FIELDS + ["generation_kwargs", "chat_template_kwargs"]

    # Read by the generation backends; GRPOConfig declares them as fields, the other online configs never correct
    # for the sampler's log-probs
    transformers_sampling_logprobs = False
    vllm_importance_sampling_correction = False

    learning_rate: float = field(default=1e-6, metadata={"help": "Initial AdamW learning rate."})
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability to 0."})

    # Data
    remove_unused_columns: bool | None = field(
        default=False,
        metadata={"help": "Keep only the 'prompt' column. Leave False when reward functions read other columns."},
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

    # Logging
    log_completions: bool = field(default=False, metadata={"help": "Log (prompt, completion) samples."})
    num_completions_to_print: int | None = field(default=None, metadata={"help": "Completions to print."})
    log_unique_prompts: bool = field(default=False, metadata={"help": "Log each prompt once."})

    def __post_init__(self):
        super().__post_init__()
        self._resolve_padding()
        check_one_of("vllm_mode", self.vllm_mode, VLLM_MODES)
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be an integer >= 1, got {self.max_completion_length!r}")
        check_finite("temperature", self.temperature, "> 0", lambda x: x > 0)
        parallelism = getattr(self, "parallelism_config", None)
        if parallelism is not None and (parallelism.cp_enabled or parallelism.sp_enabled):
            raise ValueError(
                f"parallelism_config with cp_size > 1 or sp_size > 1 is not supported by {self.trainer_name}: its "
                "inputs are built from the generated completions inside the trainer, after the data loader would "
                "have sharded them"
            )

    @property
    def trainer_name(self) -> str:
        return type(self).__name__.removesuffix("Config")

    def _resolve_padding(self):
        # the CLI passes every value as a string
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":
            value = self.pad_to_multiple_of
            self.pad_to_multiple_of = None if value.lower() in ("none", "null") else int(value)
        if self.pad_to_multiple_of == "auto":
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None


@dataclass
class GroupRolloutConfig(OnlineConfig):
    """OnlineConfig plus what GRPO and RLOO share (TRL 1.16 names; `num_generations` and `beta` defaults are each
    trainer's own): groups of `num_generations` completions per prompt scored by reward functions, a generation batch
    reused over micro-steps and iterations, the clipped importance ratio, the reference model for the KL term.

    The batch arithmetic: one generation batch of `generation_batch_size` completions (prompts x num_generations) is
    sampled, scored and split into `steps_per_generation` micro-batches of `per_device_train_batch_size` (per process);
    set at most one of the two, the other follows (default: steps_per_generation = gradient_accumulation_steps).
    Each generation batch is trained on `num_iterations` times.

    Parameters:
        Model: router_aux_loss_coef (None: the model config's).
        Data: num_generations (>= 2), num_generations_eval.
        Generation: generation_batch_size, steps_per_generation, use_transformers_continuous_batching (+ config; the
            deprecated use_transformers_paged).
        Loss: beta (KL coefficient; a reference model is built only when it is not 0), num_iterations, epsilon,
            epsilon_high (default: epsilon), reward_weights, mask_truncated_completions, sync_ref_model /
            ref_model_mixup_alpha / ref_model_sync_steps.
        Logging: log_multimodal.
    """

    _VALID_DICT_FIELDS = OnlineConfig._VALID_DICT_FIELDS + ["transformers_continuous_batching_config"]

    router_aux_loss_coef: float | None = field(
        default=None, metadata={"help": "Weight of the MoE load-balancing loss (None: the model config's; 0.0: off)."}
    )
    num_generations: int | None = field(
        default=8, metadata={"help": "Completions sampled per prompt (the group size, >= 2)."}
    )
    num_generations_eval: int | None = field(
        default=None, metadata={"help": "Completions per prompt in evaluation (None: num_generations)."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={"help": "Completions per generation batch (None: per_device_train_batch_size x processes x "
                  "steps_per_generation). Exclusive with steps_per_generation."},
    )  # fmt: skip
    steps_per_generation: int | None = field(
        default=None, metadata={"help": "Micro-steps per generation batch (None: gradient_accumulation_steps)."}
    )
    beta: float = field(default=0.0, metadata={"help": "KL coefficient; 0 builds no reference model."})
    num_iterations: int = field(default=1, metadata={"help": "Optimization passes per generation batch."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clipping bound of the ratio: 1 - epsilon."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "Upper clipping bound: 1 + epsilon_high (None: epsilon)."}
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per reward function (None: all 1)."}
    )
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
    log_multimodal: bool = field(default=True, metadata={"help": "Log images with the completions."})
    use_transformers_continuous_batching: bool = field(
        default=False, metadata={"help": "Generate with transformers' continuous batching engine."}
    )
    transformers_continuous_batching_config: dict | str | None = field(
        default=None, metadata={"help": "ContinuousBatchingConfig keyword arguments."}
    )
    use_transformers_paged: bool = field(
        default=False, metadata={"help": "Deprecated: use use_transformers_continuous_batching."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.use_transformers_paged:
            warnings.warn(
                "use_transformers_paged is deprecated (as in TRL): use use_transformers_continuous_batching",
                FutureWarning,
                stacklevel=3,
            )
            self.use_transformers_continuous_batching = True
        if self.auto_find_batch_size:
            raise ValueError(
                f"auto_find_batch_size=True is not supported by {self.trainer_name}: halving the batch on "
                "out-of-memory would split the groups of num_generations completions of a prompt; lower "
                "per_device_train_batch_size instead"
            )
        self._check_group_fields()
        self._resolve_generation_batch()

    def _check_group_fields(self):
        if isinstance(self.num_generations, bool) or not isinstance(self.num_generations, int):
            raise TypeError(f"num_generations must be an integer >= 2, got {self.num_generations!r}")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be >= 2, got {self.num_generations}: the advantages compare each completion "
                "with the other completions of its prompt"
            )
        if self.num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {self.num_iterations}")
        check_finite("beta", self.beta, ">= 0 (the KL coefficient; 0 builds no reference model)", lambda x: x >= 0)
        check_finite("epsilon", self.epsilon, ">= 0", lambda x: x >= 0)
        if self.epsilon_high is not None:
            check_finite("epsilon_high", self.epsilon_high, ">= 0", lambda x: x >= 0)
        for weight in self.reward_weights or ():
            if not is_finite(weight):
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
