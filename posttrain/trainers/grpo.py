"""GRPOTrainer: TRL 1.16's GRPO (same arguments, metrics and losses) on posttrain's fused log-prob, advantage and
loss kernels."""

import functools
import json
import math
import os
import warnings
from typing import ClassVar

import torch

from posttrain.configs.grpo import GRPOConfig
from posttrain.losses.grpo import AdaptiveEntropy, entropy_bonus, high_entropy_mask, nanstd, policy_weights
from posttrain.models.lm_head import HeadLoss, LabelLayout
from posttrain.ops.grpo_advantages import grpo_advantages
from posttrain.ops.grpo_loss import TOKEN_NORMALIZED_LOSSES, grpo_loss

from .generation import Completions, importance_sampling_ratio, sampling_mismatch_stats
from .online import GroupRolloutTrainer, completion_labels

ENTROPY_STATE_FILE = "entropy_ctrl_state.json"


def _nan_reduce(values: torch.Tensor, reduce) -> float:
    """reduce() over the non-NaN values (NaN if there are none), as TRL's nanmin / nanmax."""
    kept = values[~torch.isnan(values)]
    return reduce(kept).item() if kept.numel() > 0 else math.nan


# (field, is it set away from what posttrain supports, why it is not supported)
_UNSUPPORTED = (
    ("cast_lm_head_to_fp32", lambda a: a.cast_lm_head_to_fp32,
     "keeping (and training) the LM head in float32 is not implemented; the fused kernel accumulates in float32"),
    ("log_completions_hub_repo", lambda a: a.log_completions_hub_repo is not None,
     "completions are written to output_dir/completions only"),
)  # fmt: skip


def _check_supported(args: GRPOConfig) -> None:
    for name, is_set, reason in _UNSUPPORTED:
        if is_set(args):
            raise NotImplementedError(
                f"{name}={getattr(args, name)!r} is not supported by posttrain's GRPOTrainer: {reason}"
            )


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


class GRPOTrainer(GroupRolloutTrainer):
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
        self._check_vllm(args)
        self._refuse_tools(args, tools=tools, rollout_func=rollout_func, environment_factory=environment_factory)
        _check_supported(args)
        _warn_loss_setup(args)
        model_source = model
        model, processing_class = self._init_group(
            model, args, processing_class, peft_config, quantization_config, reward_funcs, reward_processing_classes,
            train_dataset, eval_dataset,
        )  # fmt: skip
        self._entropy_control = None
        if args.use_adaptive_entropy:
            self._entropy_control = AdaptiveEntropy(
                args.entropy_coef, coef_min=args.entropy_coef_min, coef_max=args.entropy_coef_max,
                delta=args.entropy_coef_delta, target=args.entropy_target,
            )  # fmt: skip
        self._init_online(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                          entropy=True, temperature=args.temperature)  # fmt: skip
        self._finish_group(args, model_source, quantization_config)

    # ---- the sampler / trainer mismatch ----

    def _logprob_passes(self, batch: dict, sampled: Completions, mode: str) -> None:
        sampling_logps = sampled.padded_logprobs(self.args.pad_to_multiple_of, self.accelerator.device)
        if sampling_logps is not None:
            batch["sampling_per_token_logps"] = sampling_logps
        super()._logprob_passes(batch, sampled, mode)
        if self.args.vllm_importance_sampling_correction and sampled.logprobs is not None:
            batch["importance_sampling_ratio"] = self._importance_sampling_ratio(batch, mode)

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

    # ---- advantages ----

    def _advantages(self, rewards: torch.Tensor, batch: dict, mode: str) -> torch.Tensor:
        """Advantages [B_all] from the gathered rewards; logs reward, reward_std, rewards/<name>/* and
        frac_reward_zero_std."""
        G = self.num_generations if mode == "train" else self.num_generations_eval
        weights = self.reward_weights.to(rewards.device)
        if G > 1:
            advantages, std = grpo_advantages(
                rewards, G, reward_weights=weights, scale_rewards=self.args.scale_rewards,
                multi_objective_aggregation=self.args.multi_objective_aggregation, return_std=True,
                impl=self._ops_impl,
            )  # fmt: skip
        else:  # evaluation with num_generations_eval=1: a group of one has no baseline, every advantage is 0
            total = self._weighted_rewards(rewards)
            advantages, std = torch.zeros_like(total), torch.zeros_like(total)
            if self.args.scale_rewards == "batch" and self.args.multi_objective_aggregation == "sum_then_normalize":
                std = nanstd(total).expand_as(total)
        self._log_reward_metrics(rewards, torch.isclose(std, torch.zeros_like(std)), mode)
        return advantages

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The GRPO loss of one micro-batch (policy term, KL, entropy bonus, MoE aux loss), scaled for gradient
        accumulation, and its metrics.

        The fused head computes the loss with its gradients in the forward, chunk by chunk of whole sequences, except
        with top_entropy_quantile < 1, whose entropy cut-off spans every completion token of every process: there the
        loss comes from the per-token log-probs and entropies."""
        if return_outputs:
            raise ValueError("GRPOTrainer.compute_loss cannot return outputs: the fused head produces no logits")
        mode = self._mode()
        terms = _LossTerms(self, inputs, mode)
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        labels = completion_labels(input_ids, attention_mask, terms.width)
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
        self._log_mean("entropy", (entropies.detach() * mask).sum(), mask.sum(), mode)

    # ---- checkpoints ----

    def save_extra_state(self, folder: str) -> None:
        super().save_extra_state(folder)
        if self._entropy_control is not None and self.args.should_save:
            with open(os.path.join(folder, ENTROPY_STATE_FILE), "w") as f:
                json.dump(self._entropy_control.state_dict(), f)

    def load_extra_state(self, checkpoint: str) -> None:
        super().load_extra_state(checkpoint)
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
