"""GRPOTrainer: TRL 1.16's GRPO (same arguments, metrics and losses) on posttrain's fused log-prob, advantage and
loss kernels."""

import functools
import importlib.util
import json
import math
import os
import time
import warnings
from collections import defaultdict, deque
from typing import ClassVar

import torch
from accelerate.utils import gather, gather_object, is_peft_model, set_seed
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from posttrain.configs.grpo import GRPOConfig
from posttrain.data.common import is_conversational, pad
from posttrain.data.grpo import RepeatSampler, check_prompt_dataset, shuffle_batch, split_batch, tokenize_prompts
from posttrain.losses.grpo import AdaptiveEntropy, entropy_bonus, high_entropy_mask, nanstd, policy_weights
from posttrain.models.lm_head import HeadLoss, LabelLayout
from posttrain.models.loading import create_model, trainer_model_kwargs
from posttrain.ops.grpo_advantages import grpo_advantages
from posttrain.ops.grpo_loss import TOKEN_NORMALIZED_LOSSES, grpo_loss
from posttrain.rewards.registry import resolve_reward_func
from posttrain.rewards.scoring import reward_func_name, reward_model_scores, score_completions

from .base import PosttrainTrainer, no_grad_without_checkpointing, router_aux_loss_setup
from .generation import Completions, create_generation, importance_sampling_ratio, sampling_mismatch_stats


def _to_device(batches: list[dict], device) -> list[dict]:
    return [{key: value.to(device) if torch.is_tensor(value) else value for key, value in b.items()} for b in batches]


def _completion_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_width: int) -> torch.Tensor:
    """Labels for the completion tokens alone (the last completion_width columns, where the mask is on)."""
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :-completion_width] = -100
    return labels


ENTROPY_STATE_FILE = "entropy_ctrl_state.json"
BUFFER_FILE = "grpo_generation_batch_{}.pt"  # one per process


def _nan_reduce(values: torch.Tensor, reduce) -> float:
    """reduce() over the non-NaN values (NaN if there are none), as TRL's nanmin / nanmax."""
    kept = values[~torch.isnan(values)]
    return reduce(kept).item() if kept.numel() > 0 else math.nan


def _keep_examples(batch: list[dict]) -> list[dict]:
    """The data collator: GRPO works on the raw examples (prompts are tokenized after sampling)."""
    return batch


# (field, is it set away from what posttrain supports, why it is not supported)
_UNSUPPORTED = (
    ("cast_lm_head_to_fp32", lambda a: a.cast_lm_head_to_fp32,
     "keeping (and training) the LM head in float32 is not implemented; the fused kernel accumulates in float32"),
    ("log_completions_hub_repo", lambda a: a.log_completions_hub_repo is not None,
     "completions are written to output_dir/completions only"),
)  # fmt: skip


def _check_supported(args: GRPOConfig, **trainer_args) -> None:
    # the server mode's client needs vLLM only for NCCL weight transfer, checked when the server says so
    if args.use_vllm and args.vllm_mode == "colocate" and importlib.util.find_spec("vllm") is None:
        raise ImportError("use_vllm=True but vllm is not installed: pip install 'posttrain[vllm]'")
    for name, value in trainer_args.items():
        if value:
            raise NotImplementedError(
                f"{name} (tool use / custom rollouts) is not supported by posttrain's GRPOTrainer"
            )
    for name, is_set, reason in _UNSUPPORTED:
        if is_set(args):
            raise NotImplementedError(
                f"{name}={getattr(args, name)!r} is not supported by posttrain's GRPOTrainer: {reason}"
            )
    if args.max_tool_calling_iterations is not None:
        warnings.warn(f"max_tool_calling_iterations={args.max_tool_calling_iterations} has no effect without tools",
                      stacklevel=3)  # fmt: skip


def _warn_loss_setup(args: GRPOConfig) -> None:
    if args.loss_type == "luspo" and args.importance_sampling_level != "sequence":
        warnings.warn("loss_type='luspo' is meant for importance_sampling_level='sequence' (as in the LUSPO paper)",
                      stacklevel=3)  # fmt: skip
    if args.loss_type == "vespo" and args.importance_sampling_level != "token":
        warnings.warn("loss_type='vespo' computes sequence-level importance weights itself: leave "
                      "importance_sampling_level='token' (the default)", stacklevel=3)  # fmt: skip
    if args.importance_sampling_level == "sequence" and args.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        warnings.warn(
            f"importance_sampling_level='sequence' with loss_type={args.loss_type!r} sums per-token terms, weighting "
            "each sequence by its length; GSPO's per-sequence objective is loss_type='grpo'",
            stacklevel=3,
        )


class GRPOTrainer(PosttrainTrainer):
    """Group Relative Policy Optimization, a drop-in for TRL 1.16's `GRPOTrainer`.

    For each prompt, `num_generations` completions are sampled (`posttrain.trainers.generation`: transformers'
    `generate` or continuous batching, a vLLM engine in each process or a vLLM server, as TRL 1.16 runs them); every
    reward function scores them; advantages are the rewards normalized within each prompt's group
    (`posttrain.ops.grpo_advantages`); the policy is trained on the clipped importance-weighted objective
    (`posttrain.ops.grpo_loss`). Log-probs (at GRPO's temperature) and entropies come from the fused LM-head kernel:
    no [batch, length, vocab] logits in the training step or in the old / reference log-prob passes. With
    args.use_fused_kernels=False, log-probs, advantages and loss all take the plain PyTorch paths (same numbers).

    Args:
        model: a hub id or local path (loaded with args.model_init_kwargs), or a causal LM instance (PEFT ok).
        reward_funcs: one reward source or a list. Each is a function f(prompts, completions, completion_ids,
            **columns) -> list[float | None] (columns: the dataset's other columns, plus trainer_state, log_extra and
            log_metric; async functions run concurrently); a sequence-classification reward model (instance, or a
            path / hub id loaded with num_labels=1); or a string naming a built-in reward function
            ("accuracy_reward", "think_format_reward", "soft_overlong_punishment") or a dotted import path.
        args: a posttrain GRPOConfig (default: GRPOConfig("<model name>-GRPO")); a trl.GRPOConfig is rejected.
        train_dataset / eval_dataset: datasets.Dataset with a "prompt" column, standard (strings) or conversational
            (lists of messages; completions are then [{"role": "assistant", "content": ...}]).
        processing_class: the tokenizer (default: the model's). reward_processing_classes: tokenizers of the reward
            models, one per reward source (None entries: loaded from the reward model's path).
        callbacks, optimizers: as transformers.Trainer. quantization_config: added to model_init_kwargs.
        peft_config: wraps the model with an adapter; with beta != 0 the reference is the model with adapters off.
        tools, rollout_func, environment_factory: accepted for signature compatibility; not supported (error if set).

    When the sampler reports its log-probs (vLLM; transformers with args.transformers_sampling_logprobs), the policy
    term is weighted by TRL's importance-sampling correction of the sampler / trainer mismatch
    (vllm_importance_sampling_correction, _mode, _clip_min, _clip_max), and the off-policy mask compares with the
    sampler's log-probs. Around generate the policy is gathered under DeepSpeed ZeRO-3 (ds3_gather_for_generation) and
    FSDP1 (summon_full_params); the vLLM weight sync gathers one parameter at a time (ZeRO-3's GatheredParameters,
    FSDP2's full_tensor(), FSDP1 unit by unit), PEFT adapters merged in.

    Not supported (NotImplementedError when set): cast_lm_head_to_fp32, log_completions_hub_repo, vision-language
    processors, IterableDataset.

    For a Mixture-of-Experts policy, router_aux_loss_coef (None: the architecture's own) times its load-balancing loss
    on the micro-batch is added to the loss (scaled for gradient accumulation), as TRL.

    Logged (TRL's names): reward, reward_std, rewards/<name>/mean and /std, frac_reward_zero_std, kl (beta != 0),
    entropy, clip_ratio/low_mean, /low_min, /high_mean, /high_max, /region_mean (cispo: cispo_clip_ratio),
    completions/mean_length, /min_length, /max_length, /clipped_ratio, /mean_terminated_length,
    /min_terminated_length, /max_terminated_length, num_tokens, step_time, policy_loss / entropy_coef with an
    entropy bonus, aux_loss (MoE with a nonzero coefficient), and with the sampling correction
    sampling/sampling_logp_difference/mean and /max, sampling/importance_sampling_ratio/min, /mean and /max.

    Example:
        >>> from posttrain import GRPOTrainer
        >>> from posttrain.rewards import accuracy_reward
        >>> trainer = GRPOTrainer(model="Qwen/Qwen2-0.5B-Instruct", reward_funcs=accuracy_reward, train_dataset=dataset)
        >>> trainer.train()
    """

    config_class = GRPOConfig
    trainer_suffix = "GRPO"
    resumable_attributes = ("_step",)
    tokenizer_kwargs = {"padding_side": "left", "truncation_side": "left"}  # noqa: RUF012  (read-only)
    loss_is_scaled_for_ga = True
    _tag_names: ClassVar[list[str]] = ["posttrain", "grpo"]

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: GRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tools=None,
        rollout_func=None,
        environment_factory=None,
    ):
        args = self.resolve_args(model, args)
        _check_supported(args, tools=tools, rollout_func=rollout_func, environment_factory=environment_factory)
        _warn_loss_setup(args)
        set_seed(args.seed)  # before the model: PEFT initializes adapters randomly
        model_source = model
        model = self.load_model(model, args, quantization_config)
        processing_class = self.load_processing_class(model, processing_class, args)
        self.eos_token_ids = self._eos_token_ids(model)
        if peft_config is None and is_peft_model(model) and args.beta != 0.0:
            warnings.warn(
                "beta != 0 with an already-wrapped PeftModel: the reference log-probs come from the model with its "
                "adapters disabled (TRL copies the initial adapter as the reference instead)",
                stacklevel=2,
            )
        model = self.wrap_peft(model, peft_config, args)
        self.router_aux_loss_coef, self.aux_loss_enabled = router_aux_loss_setup(model, args.router_aux_loss_coef)
        self.reward_funcs, self.reward_func_names = self._load_reward_funcs(reward_funcs, args)
        self.reward_weights = self._reward_weights(args)
        self.reward_processing_classes = self._reward_tokenizers(reward_processing_classes, args)
        self._check_datasets(train_dataset, eval_dataset, args)

        self.num_generations = args.num_generations
        self.num_generations_eval = args.num_generations_eval or args.num_generations
        self.num_iterations = args.num_iterations
        self.epsilon_low = args.epsilon
        self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        self.beta = args.beta
        self._entropy_control = None
        if args.use_adaptive_entropy:
            self._entropy_control = AdaptiveEntropy(
                args.entropy_coef, coef_min=args.entropy_coef_min, coef_max=args.entropy_coef_max,
                delta=args.entropy_coef_delta, target=args.entropy_target,
            )  # fmt: skip
        self._step = 0  # micro-steps (one per training_step call), across gradient accumulation
        self._buffered_inputs = None
        self._step_time = 0.0

        super().__init__(
            model=model, args=args, data_collator=_keep_examples, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
        )  # fmt: skip
        self.finish_setup(args, entropy=True, temperature=args.temperature)
        self.ref_model = self._build_ref_model(model_source, args, quantization_config)
        self._ops_impl = "auto" if args.use_fused_kernels else "torch"
        self._logs = self._empty_completion_logs(args.generation_batch_size)
        self._pending_extra_logs = defaultdict(list)
        self._pending_metrics = defaultdict(list)

        set_seed(args.seed, device_specific=True)  # processes must not sample identical completions
        self._generation = create_generation(self.model, args, self._tokenizer, self.eos_token_ids, self.accelerator)
        self.model.add_model_tags(self._tag_names)
        self._prepare_reward_models()
        if args.log_completions:
            self._check_completion_logging(args)

    # ---- construction ----

    def _eos_token_ids(self, model) -> list[int]:
        """The ids that end a completion: every eos id the model declares (e.g. an end-of-turn token), plus the
        tokenizer's."""
        declared = model.generation_config.eos_token_id
        declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
        tokenizer_eos = self._tokenizer.eos_token_id
        for attribute in ("response_template", "response_schema"):
            if getattr(self._tokenizer, attribute, None) is not None:
                warnings.warn(
                    f"the tokenizer has a {attribute}: TRL parses conversational completions with it, posttrain "
                    "decodes them as plain text (the assistant message's content)",
                    stacklevel=3,
                )
        return declared if tokenizer_eos in declared else [tokenizer_eos, *declared]

    def _load_reward_funcs(self, reward_funcs, args) -> tuple[list, list[str]]:
        if reward_funcs is None or (isinstance(reward_funcs, list) and not reward_funcs):
            raise ValueError("reward_funcs is required: a reward function, a reward model, or a list of them")
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        for i, func in enumerate(funcs):
            if isinstance(func, str):
                named = resolve_reward_func(func, max_completion_len=args.max_completion_length)
                funcs[i] = named if named is not None else self._load_reward_model(func, args)
            elif not (isinstance(func, torch.nn.Module) or callable(func)):
                raise TypeError(
                    f"reward_funcs[{i}] must be a callable, a reward model or a string, got {type(func).__name__}"
                )
        return funcs, [reward_func_name(f) for f in funcs]

    def _load_reward_model(self, path: str, args):
        kwargs = {"device_map": None, **trainer_model_kwargs(args), "num_labels": 1}
        try:
            return create_model(path, kwargs, architecture=AutoModelForSequenceClassification)
        except OSError as err:
            raise ValueError(
                f"reward function {path!r} is not a built-in reward name, an importable dotted path, nor a loadable "
                f"reward model: {err}"
            ) from err

    def _reward_weights(self, args) -> torch.Tensor:
        if args.reward_weights is None:
            return torch.ones(len(self.reward_funcs), dtype=torch.float32)
        if len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(args.reward_weights)} weights but there are {len(self.reward_funcs)} "
                f"reward functions ({', '.join(self.reward_func_names)})"
            )
        return torch.tensor(args.reward_weights, dtype=torch.float32)

    def _reward_tokenizers(self, classes, args) -> list:
        n = len(self.reward_funcs)
        classes = [None] * n if classes is None else list(classes) if isinstance(classes, (list, tuple)) else [classes]
        if len(classes) != n:
            raise ValueError(f"reward_processing_classes has {len(classes)} entries for {n} reward functions")
        for i, func in enumerate(self.reward_funcs):
            if not isinstance(func, torch.nn.Module):
                continue
            if classes[i] is None:
                classes[i] = AutoTokenizer.from_pretrained(
                    func.config._name_or_path, trust_remote_code=args.trust_remote_code
                )
            if classes[i].pad_token_id is None:
                classes[i].pad_token = classes[i].eos_token
            # the reward model scores the last non-pad token, so it must know the pad id
            func.config.get_text_config().pad_token_id = classes[i].pad_token_id
        return classes

    @staticmethod
    def _check_datasets(train_dataset, eval_dataset, args):
        if train_dataset is None:
            raise ValueError("train_dataset is required (a datasets.Dataset with a 'prompt' column)")
        check_prompt_dataset(train_dataset, "train_dataset", args.generation_batch_size // args.num_generations)
        evals = eval_dataset.items() if isinstance(eval_dataset, dict) else [("eval_dataset", eval_dataset)]
        for name, dataset in evals:
            if dataset is not None:
                check_prompt_dataset(dataset, name if name == "eval_dataset" else f"eval_dataset[{name!r}]", 1)

    def _build_ref_model(self, model_source, args, quantization_config):
        """A frozen copy of the initial policy when beta != 0; None with beta == 0 (no KL term) or PEFT (the
        reference is the policy with its adapters disabled)."""
        if args.beta == 0.0 or is_peft_model(self.model):
            if args.sync_ref_model:
                raise ValueError(
                    "sync_ref_model=True needs a reference model, which GRPOTrainer builds only with beta != 0 and "
                    "without PEFT (there, the reference is the model with its adapters disabled)"
                )
            return None
        reference = self.create_reference_model(model_source, args, quantization_config)
        return self.prepare_reference_model(reference, args, temperature=args.temperature)

    def _prepare_reward_models(self):
        for i, func in enumerate(self.reward_funcs):
            if isinstance(func, torch.nn.Module):
                self.reward_funcs[i] = self.accelerator.prepare_model(func, evaluation_mode=True, device_placement=True)

    def _check_completion_logging(self, args):
        backends = [name for name in ("wandb", "trackio") if name in (args.report_to or [])]
        if backends or args.log_unique_prompts:
            warnings.warn(
                f"log_completions writes output_dir/completions/*.parquet and prints the samples; posttrain does not "
                f"send the completions table to {', '.join(backends) or 'a logging backend'} (so log_unique_prompts "
                "has no effect)",
                stacklevel=3,
            )
        if self.accelerator.is_main_process:
            os.makedirs(os.path.join(args.output_dir, "completions"), exist_ok=True)

    @staticmethod
    def _empty_completion_logs(size: int) -> dict:
        return {
            "prompt": deque(maxlen=size),
            "completion": deque(maxlen=size),
            "rewards": defaultdict(lambda: deque(maxlen=size)),
            "advantages": deque(maxlen=size),
            "extra": defaultdict(lambda: deque(maxlen=size)),
        }

    # ---- data ----

    def _set_signature_columns_if_needed(self):
        # with remove_unused_columns=True, only the prompt survives (the model's forward signature is irrelevant)
        if self._signature_columns is None:
            self._signature_columns = ["prompt"]

    def get_train_dataloader(self):
        # Each loader batch is a whole generation batch of this process: completions are sampled once for all the
        # steps_per_generation micro-steps it feeds (see _prepare_inputs)
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        return RepeatSampler(
            dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.num_generations,
            batch_size=self.args.generation_batch_size // self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )

    def _get_eval_sampler(self, eval_dataset):
        return RepeatSampler(eval_dataset, mini_repeat_count=self.num_generations_eval, seed=self.args.seed)

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation: one generation per batch, no reuse
            return self._generate_and_score_completions(generation_batch)
        steps = self.args.steps_per_generation
        if self._step % (steps * self.num_iterations) == 0 or self._buffered_inputs is None:
            scored = shuffle_batch(self._generate_and_score_completions(generation_batch))
            self._buffered_inputs = split_batch(scored, steps)
        return self._buffered_inputs[self._step % steps]

    # ---- generation and scoring ----

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        mode = "train" if self.model.training else "eval"
        prompts = [example["prompt"] for example in inputs]
        prompt_ids_list = tokenize_prompts(self.processing_class, prompts, self.args.chat_template_kwargs)
        sampled = self._sample(prompt_ids_list, mode)
        completion_ids_list = sampled.ids
        completions = self._decode(prompts, completion_ids_list)
        is_truncated = self._log_lengths(mode, prompt_ids_list, completion_ids_list)

        prompt_ids, prompt_mask = self._pad_ids(prompt_ids_list, "left")
        completion_ids, completion_mask = self._pad_ids(completion_ids_list, "right")
        if self.args.mask_truncated_completions:
            completion_mask = completion_mask * (~is_truncated).unsqueeze(1).int()
        batch = {
            "prompt_ids": prompt_ids,
            "prompt_mask": prompt_mask,
            "completion_ids": completion_ids,
            "completion_mask": completion_mask,
            "num_items_in_batch": self.accelerator.gather(completion_mask.sum()).sum(),
        }
        sampling_logps = sampled.padded_logprobs(self.args.pad_to_multiple_of, self.accelerator.device)
        if sampling_logps is not None:
            batch["sampling_per_token_logps"] = sampling_logps
        batch.update(self._reference_logprobs(batch, mode))
        if self._corrects_sampling(sampled):
            batch["importance_sampling_ratio"] = self._importance_sampling_ratio(batch, mode)

        rewards = self._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        advantages = self._advantages(rewards, mode)
        local = slice(
            self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts)
        )
        batch["advantages"] = advantages[local]
        self._record_completions(prompts, completions, rewards, advantages, mode)
        return batch

    def _sample(self, prompt_ids: list[list[int]], mode: str) -> Completions:
        """One completion per prompt (each prompt comes num_generations times in a row), with the sampler's log-probs
        when it reports them. An engine with its own weights (vLLM) first gets the policy's, once per optimizer step."""
        self._generation.sync_weights(self.model, self.state.global_step)
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        return self._generation.generate(self.model_wrapped, prompt_ids, num_generations)

    def _corrects_sampling(self, sampled: Completions) -> bool:
        return self.args.vllm_importance_sampling_correction and sampled.logprobs is not None

    def _importance_sampling_ratio(self, batch: dict, mode: str) -> torch.Tensor:
        """TRL's importance-sampling correction of the sampler / trainer mismatch ([B, T] or [B, 1]), and its
        sampling/* metrics."""
        args, old, sampling = self.args, batch["old_per_token_logps"], batch["sampling_per_token_logps"]
        mask = batch["completion_mask"]
        ratio = importance_sampling_ratio(
            old, sampling, mask, mode=args.vllm_importance_sampling_mode,
            clip_min=args.vllm_importance_sampling_clip_min, clip_max=args.vllm_importance_sampling_clip_max,
        )  # fmt: skip
        stats = sampling_mismatch_stats(old, sampling, mask, ratio, mode=args.vllm_importance_sampling_mode)
        gathered = {name: self.accelerator.gather(value[None]) for name, value in stats.items()}
        metrics = self._metrics[mode]
        metrics["sampling/sampling_logp_difference/mean"].append(gathered["mean_delta"].mean().item())
        metrics["sampling/sampling_logp_difference/max"].append(gathered["max_delta"].max().item())
        metrics["sampling/importance_sampling_ratio/min"].append(_nan_reduce(gathered["ratio_min"], torch.min))
        metrics["sampling/importance_sampling_ratio/mean"].append(gathered["ratio_mean"].nanmean().item())
        metrics["sampling/importance_sampling_ratio/max"].append(_nan_reduce(gathered["ratio_max"], torch.max))
        return ratio

    def _decode(self, prompts: list, completion_ids: list[list[int]]) -> list:
        texts = self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            return [[{"role": "assistant", "content": text}] for text in texts]
        return texts

    def _pad_ids(self, ids: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [torch.tensor(x, dtype=torch.long) for x in ids]
        multiple = self.args.pad_to_multiple_of
        padded = pad(rows, self._tokenizer.pad_token_id, side, multiple).to(self.accelerator.device)
        mask = pad([torch.ones_like(r) for r in rows], 0, side, multiple).to(self.accelerator.device)
        return padded, mask

    def _log_lengths(self, mode, prompt_ids, completion_ids) -> torch.Tensor:
        """Log TRL's completions/* and num_tokens metrics; returns this process's [B] truncation flags."""
        device = self.accelerator.device
        prompt_lengths = self.accelerator.gather(torch.tensor([len(x) for x in prompt_ids], device=device))
        lengths = self.accelerator.gather(torch.tensor([len(x) for x in completion_ids], device=device)).float()
        if mode == "train":
            self.state.num_input_tokens_seen += (prompt_lengths.sum() + lengths.sum()).item()
        metrics = self._metrics[mode]
        metrics["num_tokens"] = [self.state.num_input_tokens_seen]
        metrics["completions/mean_length"].append(lengths.mean().item())
        metrics["completions/min_length"].append(lengths.min().item())
        metrics["completions/max_length"].append(lengths.max().item())
        stops = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        is_truncated = torch.tensor([not ids or ids[-1] not in stops for ids in completion_ids], device=device)
        all_truncated = self.accelerator.gather(is_truncated)
        metrics["completions/clipped_ratio"].append(all_truncated.float().mean().item())
        terminated = lengths[~all_truncated] if (~all_truncated).any() else lengths.new_zeros(1)
        metrics["completions/mean_terminated_length"].append(terminated.mean().item())
        metrics["completions/min_terminated_length"].append(terminated.min().item())
        metrics["completions/max_terminated_length"].append(terminated.max().item())
        return is_truncated

    def _completion_outputs(self, model, input_ids, labels, *, attention_mask, head_loss=None, aux_loss=False):
        """The patched forward (fused LM head, no full logits) over prompt + completion, with the completion tokens as
        labels (`_completion_labels`): a TokenLogprobOutput ([B, T - 1] fields; the completion is the last C columns).
        As TRL, the model gets the attention mask but no position ids."""
        router = {"output_router_logits": True} if aux_loss else {}
        with self.accelerator.autocast():
            return model(input_ids=input_ids, attention_mask=attention_mask, logprob_labels=labels,
                         head_loss=head_loss, **router)  # fmt: skip

    def _token_logprobs(self, model, input_ids, attention_mask, num_completion_tokens, *, batch_size=None):
        """Per-token log-probs [B, C] of the last C positions (the completion) under `model`, computed `batch_size`
        rows at a time (no gradient tracked by the caller)."""
        C = num_completion_tokens
        batch_size = batch_size or input_ids.shape[0]
        logps = []
        for start in range(0, input_ids.shape[0], batch_size):
            ids, mask = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            out = self._completion_outputs(model, ids, _completion_labels(ids, mask, C), attention_mask=mask)
            logps.append(out.logprobs[:, -C:])
        return torch.cat(logps)

    def _reference_logprobs(self, batch: dict, mode: str) -> dict:
        """old_per_token_logps (when the batch is reused across optimizer steps) and ref_per_token_logps (beta != 0)."""
        input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        attention_mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
        args = (input_ids, attention_mask, batch["completion_ids"].shape[1])
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        out = {}
        unwrapped = self.accelerator.unwrap_model(self.model)
        with no_grad_without_checkpointing(unwrapped, self.args.gradient_checkpointing_kwargs):
            # Unless generation happens exactly at optimizer-step boundaries, the policy has moved since sampling; the
            # sampling correction compares the sampler with the trainer at sampling time
            generate_every = self.args.steps_per_generation * self.num_iterations
            misaligned = self.args.gradient_accumulation_steps % generate_every != 0
            if misaligned or (self.args.vllm_importance_sampling_correction and "sampling_per_token_logps" in batch):
                out["old_per_token_logps"] = self._token_logprobs(self.model, *args, batch_size=batch_size)
            if self.beta != 0.0:
                if self.ref_model is not None:
                    out["ref_per_token_logps"] = self._token_logprobs(self.ref_model, *args, batch_size=batch_size)
                else:
                    with unwrapped.disable_adapter():
                        out["ref_per_token_logps"] = self._token_logprobs(self.model, *args, batch_size=batch_size)
        return out

    def _log_completion_extra(self, column: str, values: list) -> None:
        """Add a column to the completions log; reward functions get it as the `log_extra` keyword argument."""
        self._pending_extra_logs[column].extend(values)

    def _log_metric(self, name: str, value: float) -> None:
        """Log a scalar (averaged per logging step); reward functions get it as the `log_metric` keyword argument."""
        self._pending_metrics[name].append(value)

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids) -> torch.Tensor:
        """Rewards [B_all, R] of every process's completions (gathered: groups may span processes), NaN for None."""
        device = self.accelerator.device
        columns = {key: [x[key] for x in inputs] for key in inputs[0] if key not in ("prompt", "completion",
                                                                                      "completion_ids")}  # fmt: skip
        columns.update(trainer_state=self.state, log_extra=self._log_completion_extra, log_metric=self._log_metric)

        def model_scores(i):
            tokenizer = self.reward_processing_classes[i]
            if is_conversational({"prompt": prompts[0]}):
                texts = [
                    tokenizer.apply_chat_template(p + c, tokenize=False, **(self.args.chat_template_kwargs or {}))
                    for p, c in zip(prompts, completions)
                ]
            else:
                texts = [p + c for p, c in zip(prompts, completions)]
            return reward_model_scores(self.reward_funcs[i], tokenizer, texts, device)

        rewards = score_completions(
            self.reward_funcs, self.reward_func_names, prompts=prompts, completions=completions,
            completion_ids=completion_ids, columns=columns, model_scores=model_scores, device=device,
        )  # fmt: skip
        return gather(rewards)

    def _advantages(self, rewards: torch.Tensor, mode: str) -> torch.Tensor:
        """Advantages [B_all] from the gathered rewards; logs reward, reward_std, rewards/<name>/* and
        frac_reward_zero_std."""
        G = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards.device)
        total = (rewards * weights).nansum(dim=1)
        total[torch.isnan(rewards).all(dim=1)] = math.nan
        if G > 1:
            advantages, std = grpo_advantages(
                rewards, G, reward_weights=weights, scale_rewards=self.args.scale_rewards,
                multi_objective_aggregation=self.args.multi_objective_aggregation, return_std=True,
                impl=self._ops_impl,
            )  # fmt: skip
        else:  # evaluation with num_generations_eval=1: a group of one has no baseline, every advantage is 0
            advantages, std = torch.zeros_like(total), torch.zeros_like(total)
            if self.args.scale_rewards == "batch" and self.args.multi_objective_aggregation == "sum_then_normalize":
                std = nanstd(total).expand_as(total)
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards[:, i]).item())
        metrics["reward"].append(torch.nanmean(total).item())
        metrics["reward_std"].append(nanstd(total).item())
        metrics["frac_reward_zero_std"].append(torch.isclose(std, torch.zeros_like(std)).float().mean().item())
        return advantages

    def _record_completions(self, prompts, completions, rewards, advantages, mode):
        """Keep the latest samples for log_completions; flush what reward functions logged through log_extra and
        log_metric (gathered over processes, in a fixed key order so that every process gathers the same keys)."""
        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards[:, i].tolist())
        self._logs["advantages"].extend(advantages.tolist())
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            values = self._pending_extra_logs.get(column, [None] * len(prompts))
            self._logs["extra"][column].extend(gather_object(values))
        self._pending_extra_logs.clear()
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            stats = torch.tensor([sum(values), len(values)], dtype=torch.float32, device=self.accelerator.device)
            total, count = self.accelerator.gather(stats).view(-1, 2).sum(dim=0).tolist()
            self._metrics[mode][name].append(total / count)
        self._pending_metrics.clear()

    # ---- loss ----

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        self._step_time += time.perf_counter() - start
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._step_time)
            self._step_time = 0.0
        return loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The GRPO loss of one micro-batch (policy term, KL, entropy bonus, MoE aux loss), scaled for gradient
        accumulation, and its metrics.

        The fused head computes the loss with its gradients in the forward, chunk by chunk of whole sequences, except
        with top_entropy_quantile < 1, whose entropy cut-off spans every completion token of every process: there the
        loss comes from the per-token log-probs and entropies."""
        if return_outputs:
            raise ValueError("GRPOTrainer.compute_loss cannot return outputs: the fused head produces no logits")
        mode = "train" if self.model.training else "eval"
        terms = _LossTerms(self, inputs, mode)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        labels = _completion_labels(input_ids, attention_mask, terms.width)
        forward = functools.partial(self._completion_outputs, model, input_ids, labels, attention_mask=attention_mask,
                                    aux_loss=self.aux_loss_enabled)  # fmt: skip
        if self.args.top_entropy_quantile < 1.0:
            out = forward()
            logps, entropies = out.logprobs[:, -terms.width :], out.entropy[:, -terms.width :]
            entropy_mask = high_entropy_mask(
                entropies, terms.mask, 1.0 - self.args.top_entropy_quantile, gather=self._gather_entropies
            )
            loss = terms.of_sequences(terms.all_sequences, logps, entropies, entropy_mask)
            logps, entropies = logps.detach(), entropies.detach()
        else:
            layout = LabelLayout(labels[:, 1:] != -100)
            out = forward(head_loss=HeadLoss(functools.partial(terms.of_chunk, layout), groups=terms.groups))
            loss, logps, entropies = out.loss, out.logprobs[:, -terms.width :], out.entropy[:, -terms.width :]
        if self.aux_loss_enabled:
            # a per-micro-batch mean, scaled for gradient accumulation as the policy loss is
            loss = loss + self.router_aux_loss_coef * out.aux_loss / terms.accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(out.aux_loss).mean().item())
        self._record_loss_metrics(terms, logps, entropies, mode)
        return loss

    def _gather_entropies(self, local: torch.Tensor) -> torch.Tensor:
        # entropies are >= 0, so a negative pad marks the padding that evens out the processes' counts
        gathered = self.accelerator.gather(self.accelerator.pad_across_processes(local, dim=0, pad_index=-1e9))
        return gathered[gathered != -1e9]

    @property
    def entropy_coef(self) -> float:
        """The entropy bonus coefficient (adapted each step with use_adaptive_entropy)."""
        return self._entropy_control.coef if self._entropy_control is not None else self.args.entropy_coef

    def _record_loss_metrics(self, terms, logps, entropies, mode: str) -> None:
        """TRL's loss metrics from the detached log-probs: clip ratios, KL, entropy, policy_loss and entropy_coef with
        an entropy bonus; advances the adaptive entropy coefficient."""
        entropy_mask = None
        if self.args.top_entropy_quantile < 1.0:
            entropy_mask = high_entropy_mask(
                entropies, terms.mask, 1.0 - self.args.top_entropy_quantile, gather=self._gather_entropies
            )
        with torch.no_grad():
            policy_loss, stats = terms.policy_loss(terms.all_sequences, logps, entropy_mask, return_metrics=True)
        self._log_loss_metrics(stats, entropies, terms.mask, mode)
        if not terms.bonus_enabled:
            return
        self._metrics[mode]["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
        if mode != "train":
            return
        if self._entropy_control is not None:
            bonus_mask = terms.bonus_mask(terms.all_sequences, entropy_mask).to(entropies.dtype)
            self._entropy_control.update(
                (entropies * bonus_mask).sum(), bonus_mask.sum(), step_end=self.accelerator.sync_gradients,
                reduce=lambda t: self.accelerator.reduce(t, reduction="sum"),
            )  # fmt: skip
        if self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)

    def _log_loss_metrics(self, stats, entropies, mask, mode):
        def reduce(t):
            return self.accelerator.reduce(t, reduction="sum")

        for name, value in stats.logs(self.args.loss_type, reduce=reduce, gather=self.accelerator.gather).items():
            self._metrics[mode][name].append(value.item())
        mask = mask.to(entropies.dtype)
        totals = reduce(torch.stack([(entropies.detach() * mask).sum(), mask.sum()]))
        self._metrics[mode]["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None

    # ---- logging and checkpoints ----

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        # NaN values (e.g. a reward function that returned None for a whole batch) are left out of the averages; a
        # metric with nothing else to average is logged as None, as TRL does
        empty = []
        for key, values in self._metrics[mode].items():
            kept = [v for v in values if not math.isnan(v)]
            if values and not kept:
                empty.append(key)
            values[:] = kept
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + key: None for key in empty})
        super().log(logs, start_time)
        if self.args.log_completions and self.accelerator.is_main_process:
            self._write_completions()

    def _write_completions(self):
        import pandas as pd

        table = {
            "step": [self.state.global_step] * len(self._logs["prompt"]),
            "prompt": list(self._logs["prompt"]),
            "completion": list(self._logs["completion"]),
            **{name: list(values) for name, values in self._logs["rewards"].items()},
            **{name: list(values) for name, values in self._logs["extra"].items()},
            "advantage": list(self._logs["advantages"]),
        }
        frame = pd.DataFrame(table)
        path = os.path.join(self.args.output_dir, "completions", f"completions_{self.state.global_step:05d}.parquet")
        frame.to_parquet(path)
        shown = frame if self.args.num_completions_to_print is None else frame.head(self.args.num_completions_to_print)
        print(shown.drop(columns=["step"]).to_string(max_colwidth=80))

    def save_extra_state(self, folder: str) -> None:
        super().save_extra_state(folder)
        # the generation batch still in use (num_iterations > 1, or steps_per_generation beyond the accumulation)
        buffered = _to_device(self._buffered_inputs, "cpu") if self._buffered_inputs is not None else None
        torch.save(buffered, os.path.join(folder, BUFFER_FILE.format(self.accelerator.process_index)))
        if self._entropy_control is not None and self.args.should_save:
            with open(os.path.join(folder, ENTROPY_STATE_FILE), "w") as f:
                json.dump(self._entropy_control.state_dict(), f)

    def load_extra_state(self, checkpoint: str) -> None:
        super().load_extra_state(checkpoint)
        path = os.path.join(checkpoint, BUFFER_FILE.format(self.accelerator.process_index))
        if os.path.exists(path):
            buffered = torch.load(path, weights_only=True)
            self._buffered_inputs = _to_device(buffered, self.accelerator.device) if buffered is not None else None
        path = os.path.join(checkpoint, ENTROPY_STATE_FILE)
        if self._entropy_control is not None and os.path.exists(path):
            with open(path) as f:
                self._entropy_control.load_state_dict(json.load(f))


class _LossTerms:
    """GRPO's loss of one micro-batch, by sequences: `of_sequences` gives the share of the micro-batch's loss (policy
    term over the accumulation steps, minus the entropy bonus) of any subset of its sequences, with the whole
    micro-batch's normalizers, so that the fused head's chunks of whole sequences sum to the micro-batch's loss."""

    def __init__(self, trainer: "GRPOTrainer", inputs: dict, mode: str):
        args = trainer.args
        self.trainer, self.inputs, self.args = trainer, inputs, args
        self.mask = inputs["completion_mask"]
        self.width = self.mask.shape[1]
        self.all_sequences = torch.arange(self.mask.shape[0], device=self.mask.device)
        self.accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1
        self.token_normalized = args.loss_type in TOKEN_NORMALIZED_LOSSES
        if self.token_normalized:
            # the loss tokens of the whole generation batch, per process and micro-step (may be below 1)
            num_items = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
            if mode == "train":
                num_items = num_items * self.accumulation / args.steps_per_generation
            self.num_items = num_items
        else:
            self.num_items = self.mask.sum().clamp(min=1)  # bnpo's micro-batch token mean
        self.bonus_enabled = args.entropy_coef != 0.0 or args.use_adaptive_entropy
        control = trainer._entropy_control
        self.bonus_coef = control.applied_coef if control is not None else args.entropy_coef
        self.groups = self.all_sequences[:, None].expand(-1, inputs["prompt_ids"].shape[1] + self.width - 1)

    def bonus_mask(self, sequences, entropy_mask):
        mask = self.mask[sequences]
        return mask if entropy_mask is None else mask * entropy_mask

    def policy_loss(self, sequences, logps, entropy_mask=None, return_metrics=False):
        inputs, args, trainer = self.inputs, self.args, self.trainer
        old = inputs.get("old_per_token_logps")
        old = old[sequences] if old is not None else None
        sampling = inputs.get("sampling_per_token_logps")
        ref = inputs.get("ref_per_token_logps")
        advantages = inputs["advantages"][sequences]
        weights = policy_weights(
            logps, self.mask[sequences], advantages, entropy_mask=entropy_mask,
            off_policy_threshold=args.off_policy_mask_threshold,
            sampling_logps=sampling[sequences] if sampling is not None else old,
        )  # fmt: skip
        return grpo_loss(
            logps, old, advantages, self.mask[sequences], ref_logps=ref[sequences] if ref is not None else None,
            beta=trainer.beta, epsilon_low=trainer.epsilon_low, epsilon_high=trainer.epsilon_high, delta=args.delta,
            loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
            max_completion_length=args.max_completion_length, num_items=self.num_items,
            num_sequences=len(self.all_sequences), sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg, vespo_k_pos=args.vespo_k_pos,
            vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
            vespo_lambda_neg=args.vespo_lambda_neg, use_bias_correction_kl=args.use_bias_correction_kl,
            policy_weights=weights, return_metrics=return_metrics, impl=trainer._ops_impl,
            importance_sampling_ratio=None if (r := inputs.get("importance_sampling_ratio")) is None else r[sequences],
        )  # fmt: skip

    def of_sequences(self, sequences, logps, entropies, entropy_mask=None) -> torch.Tensor:
        policy = self.policy_loss(sequences, logps, entropy_mask)
        # dapo / cispo / vespo are normalized by the accumulated batch's token count already; the rest by micro-step
        loss = policy if self.token_normalized else policy / self.accumulation
        if self.bonus_enabled:
            # with top_entropy_quantile < 1 the bonus acts on the same high-entropy tokens as the policy gradient (the
            # entropy mask then covers the whole micro-batch, and so do `sequences`)
            num_tokens = self.bonus_mask(self.all_sequences, entropy_mask).sum().clamp(min=1)
            loss = loss - entropy_bonus(
                entropies, self.bonus_mask(sequences, entropy_mask), self.bonus_coef, accumulation=self.accumulation,
                num_tokens=num_tokens,
            )  # fmt: skip
        return loss

    def of_chunk(self, layout: LabelLayout, chunk) -> torch.Tensor:
        sequences = torch.unique(layout.sequence_of(chunk.rows))
        logps, entropies, _ = layout.dense(chunk.rows, chunk.logprobs, chunk.entropy, sequences=sequences)
        return self.of_sequences(sequences, logps[:, -self.width :], entropies[:, -self.width :])
