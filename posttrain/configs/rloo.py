"""RLOOConfig: TRL 1.16's RLOO options, same names and defaults, plus posttrain's `use_fused_kernels`."""

from dataclasses import dataclass, field

from .online import GroupRolloutConfig, is_finite


@dataclass
class RLOOConfig(GroupRolloutConfig):
    """Configuration of `RLOOTrainer`: TRL 1.16's `RLOOConfig` field for field (names, defaults, validation).

    RLOO shares GRPO's generation batch, sampling, vLLM, reward and reference-model fields (`GroupRolloutConfig`,
    `OnlineConfig`); its own are listed here. Defaults that differ from TrainingArguments: learning_rate 1e-6,
    logging_steps 10, gradient_checkpointing True, bf16 True unless fp16, remove_unused_columns False.

    Parameters:
        num_generations: completions per prompt (default 2, >= 2: the baseline of each is the mean of the others).
        beta: the KL penalty's coefficient (default 0.05): beta x sum over the completion of log pi_old - log pi_ref
            is subtracted from each completion's reward; 0 builds no reference model.
        normalize_advantages: standardize the advantages over the generation batch (default False).
        reward_clip_range: (min, max) to clamp the weighted rewards to before the KL penalty (default None).
        use_fused_kernels: posttrain's switch (see PosttrainConfig).

    Example:
        >>> args = RLOOConfig(output_dir="out", num_generations=4, per_device_train_batch_size=8, beta=0.0)
        >>> args.steps_per_generation, args.generation_batch_size
        (1, 8)
    """

    num_generations: int | None = field(
        default=2, metadata={"help": "Completions sampled per prompt (the group size, >= 2)."}
    )
    beta: float = field(
        default=0.05, metadata={"help": "KL penalty coefficient in the reward; 0 builds no reference model."}
    )
    normalize_advantages: bool = field(
        default=False, metadata={"help": "Standardize the advantages over each generation batch (mean 0, std 1)."}
    )
    reward_clip_range: tuple[float, float] | None = field(
        default=None, metadata={"help": "Clamp the weighted rewards to (min, max); None: no clipping."}
    )

    def __post_init__(self):
        super().__post_init__()
        clip = self.reward_clip_range
        if clip is not None and (len(clip) != 2 or not all(is_finite(v) for v in clip) or clip[0] > clip[1]):
            raise ValueError(f"reward_clip_range must be (min, max) with finite min <= max, got {clip!r}")
