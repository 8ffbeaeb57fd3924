"""DistillationConfig: TRL 1.16's on-policy distillation options, same names and defaults, plus posttrain's
`use_fused_kernels`."""

from dataclasses import dataclass, field

from .online import OnlineConfig, check_finite


@dataclass
class DistillationConfig(OnlineConfig):
    """Configuration of `DistillationTrainer`: TRL 1.16's `DistillationConfig` field for field (names, defaults,
    validation).

    The sampling, vLLM and completion-logging fields are every online trainer's (`OnlineConfig`); the distillation's
    own are listed here. Defaults that differ from TrainingArguments: learning_rate 1e-6, logging_steps 10,
    gradient_checkpointing True, bf16 True unless fp16, remove_unused_columns False.

    Parameters:
        teacher_model_name_or_path: the teacher's hub id or path, used when the trainer gets no teacher_model.
        teacher_model_revision: the teacher's revision (branch, tag or commit).
        teacher_model_init_kwargs: from_pretrained keywords for a teacher given as a string (dtype default: the
            checkpoint's own, as TRL).
        beta: the generalized Jensen-Shannon divergence's interpolation, in [0, 1] (default 1.0): 0 is the forward KL
            KL(teacher || student), 1 the reverse KL(student || teacher), 0.5 the JSD. The divergence is taken at
            `temperature` (which also samples the completions).
        max_tool_calling_iterations: accepted; tools are not supported by posttrain's DistillationTrainer.
        use_fused_kernels: posttrain's switch (see PosttrainConfig).

    As TRL, one completion is sampled per prompt and each generation batch (per_device_train_batch_size x processes x
    gradient_accumulation_steps prompts) is sampled once and split into the accumulation's micro-batches:
    num_generations, num_iterations, steps_per_generation and generation_batch_size are derived, not fields.

    Example:
        >>> args = DistillationConfig(output_dir="out", teacher_model_name_or_path="Qwen/Qwen2.5-1.5B-Instruct",
        ...                           beta=0.5, temperature=0.9, max_completion_length=256)
    """

    _VALID_DICT_FIELDS = OnlineConfig._VALID_DICT_FIELDS + ["teacher_model_init_kwargs"]

    num_generations = 1
    num_iterations = 1
    use_transformers_continuous_batching = False  # TRL's distillation samples with generate or vLLM only

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher's hub id or path (when the trainer gets no teacher_model)."}
    )
    teacher_model_revision: str | None = field(
        default=None, metadata={"help": "The teacher's revision: a branch, tag or commit."}
    )
    teacher_model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "from_pretrained keyword arguments for a teacher given as a string."}
    )
    beta: float = field(
        default=1.0,
        metadata={"help": "Generalized JSD interpolation in [0, 1]: 0 forward KL, 1 reverse KL, 0.5 JSD."},
    )
    max_tool_calling_iterations: int | None = field(
        default=None, metadata={"help": "Maximum tool-calling turns (tools are not supported by posttrain)."}
    )

    def __post_init__(self):
        super().__post_init__()
        check_finite("beta", self.beta, "in [0, 1] (0: forward KL, 1: reverse KL, 0.5: JSD)", lambda x: 0 <= x <= 1)

    @property
    def steps_per_generation(self) -> int:
        """Micro-steps per generation batch: the gradient accumulation steps."""
        return self.gradient_accumulation_steps

    @property
    def generation_batch_size(self) -> int:
        """Completions per generation batch, over every process."""
        return self.per_device_train_batch_size * self.world_size * self.gradient_accumulation_steps
