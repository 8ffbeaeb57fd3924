"""RLOOTrainer: TRL 1.16's RLOO (same arguments, metrics and loss) on posttrain's shared online trainer, its fused
log-prob head and the leave-one-out advantages kernel."""

import functools
from typing import ClassVar

import torch
from accelerate.utils import gather

from posttrain.configs.rloo import RLOOConfig
from posttrain.losses.rloo import clip_flags, rloo_loss
from posttrain.models.lm_head import HeadLoss, LabelLayout
from posttrain.ops.rloo_advantages import rloo_advantages

from .online import GroupRolloutTrainer, completion_labels


class RLOOTrainer(GroupRolloutTrainer):
    """REINFORCE Leave-One-Out, a drop-in for TRL 1.16's `RLOOTrainer`.

    Generation, rewards and completion logging are GRPO's (`posttrain.trainers.online`): for each prompt,
    `num_generations` completions are sampled and scored by every reward function. Each completion's reward (weighted
    sum, clipped to reward_clip_range, minus beta times its summed log-ratio to the reference policy) is compared with
    the mean reward of its prompt's other completions (`posttrain.ops.rloo_advantages`, optionally standardized over
    the batch with normalize_advantages). The policy is trained on TRL's sequence-level clipped objective, mean over
    the micro-batch of -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) with r = exp(log pi(completion) -
    log pi_old(completion)) (`posttrain.losses.rloo`), computed in the fused LM head chunk by chunk of whole sequences:
    no [batch, length, vocab] logits in the training step or in the old / reference log-prob passes.

    Args:
        model: a hub id or local path (loaded with args.model_init_kwargs), or a causal LM instance (PEFT ok).
        reward_funcs: one reward source or a list, as GRPOTrainer's: functions f(prompts, completions,
            completion_ids, **columns) -> list[float | None], sequence-classification reward models (instance, path or
            hub id), or names of built-in reward functions / dotted import paths.
        args: a posttrain RLOOConfig (default: RLOOConfig("<model name>-RLOO")).
        train_dataset / eval_dataset: datasets.Dataset with a "prompt" column, standard or conversational.
        processing_class, reward_processing_classes, callbacks, optimizers, quantization_config: as GRPOTrainer.
        peft_config: wraps the model with an adapter; with beta != 0 the reference is the model with adapters off.

    Not supported (NotImplementedError): vision-language processors, IterableDataset.

    Logged (TRL's names): reward, reward_std, rewards/<name>/mean and /std, frac_reward_zero_std, kl (beta != 0),
    entropy, clip_ratio/low_mean, /low_min, /high_mean, /high_max, /region_mean, completions/mean_length,
    /min_length, /max_length, /clipped_ratio, /mean_terminated_length, /min_terminated_length,
    /max_terminated_length, num_tokens, step_time, aux_loss (MoE with a nonzero router_aux_loss_coef).

    Example:
        >>> from posttrain import RLOOTrainer
        >>> trainer = RLOOTrainer(model="Qwen/Qwen2-0.5B-Instruct", reward_funcs="accuracy_reward",
        ...                       train_dataset=dataset)
        >>> trainer.train()
    """

    config_class = RLOOConfig
    trainer_suffix = "RLOO"
    loss_is_scaled_for_ga = False  # a micro-batch mean: Trainer divides it by the accumulation steps, as TRL's
    _tag_names: ClassVar[list[str]] = ["posttrain", "rloo"]

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: RLOOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        args = self.resolve_args(model, args)
        self._check_vllm(args)
        model_source = model
        model, processing_class = self._init_group(
            model, args, processing_class, peft_config, quantization_config, reward_funcs, reward_processing_classes,
            train_dataset, eval_dataset,
        )  # fmt: skip
        self._init_online(model, args, train_dataset, eval_dataset, processing_class, callbacks, optimizers,
                          entropy=True, temperature=args.temperature)  # fmt: skip
        self._finish_group(args, model_source, quantization_config)

    # ---- advantages ----

    def _needs_old_logprobs(self, batch: dict) -> bool:
        # the KL penalty in the reward compares the sampling policy with the reference
        return self.beta != 0.0 or super()._needs_old_logprobs(batch)

    def _advantages(self, rewards: torch.Tensor, batch: dict, mode: str) -> torch.Tensor:
        """Leave-one-out advantages [B_all] of the gathered rewards, with the KL penalty; logs kl, reward,
        reward_std, rewards/<name>/* and frac_reward_zero_std."""
        G = self.num_generations if mode == "train" else self.num_generations_eval
        kl = None
        if self.beta != 0.0:
            mask = batch["completion_mask"]
            # TRL's first-order estimate log pi_old - log pi_ref, summed over each completion (may be negative)
            per_token = (batch["old_per_token_logps"] - batch["ref_per_token_logps"]) * mask
            self._log_mean("kl", per_token.sum(), mask.sum(), mode)
            kl = gather(per_token.sum(dim=1))
        if G > 1:
            advantages, std = rloo_advantages(
                rewards, G, reward_weights=self.reward_weights.to(rewards.device),
                reward_clip_range=self.args.reward_clip_range, kl=kl, beta=self.beta,
                normalize=self.args.normalize_advantages, return_std=True, impl=self._ops_impl,
            )  # fmt: skip
        else:  # evaluation with num_generations_eval=1: a group of one has no baseline, every advantage is 0
            advantages = std = torch.zeros(rewards.shape[0], device=rewards.device)
        self._log_reward_metrics(rewards, torch.isclose(std, torch.zeros_like(std)), mode)
        return advantages

    # ---- loss ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TRL's RLOO loss of one micro-batch (the mean of the sequences' clipped objectives, plus the MoE aux loss)
        computed by the fused head with its gradients, chunk by chunk of whole sequences; logs its metrics."""
        if return_outputs:
            raise ValueError("RLOOTrainer.compute_loss cannot return outputs: the fused head produces no logits")
        mode = self._mode()
        mask = inputs["completion_mask"]
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], mask], dim=1)
        labels = completion_labels(input_ids, attention_mask, mask.shape[1])
        old = inputs.get("old_per_token_logps")
        old_logps = (old * mask).sum(dim=1) if old is not None else None
        layout = LabelLayout(labels[:, 1:] != -100)
        groups = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(labels[:, 1:])
        of_chunk = functools.partial(self._chunk_loss, layout, old_logps, inputs["advantages"])
        head_loss = HeadLoss(of_chunk, groups=groups)
        out = self._completion_outputs(model, input_ids, labels, attention_mask=attention_mask,
                                       aux_loss=self.aux_loss_enabled, head_loss=head_loss)  # fmt: skip
        # a completion with no token in the loss (mask_truncated_completions) has ratio 1: its -A is a constant
        empty = mask.sum(dim=1) == 0
        loss = out.loss - inputs["advantages"][empty].sum() / mask.shape[0]
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * out.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(out.aux_loss).mean().item())
        logps = (out.logprobs[:, -mask.shape[1] :] * mask).sum(dim=1)
        self._log_loss_metrics(logps, old_logps, inputs["advantages"], out.entropy[:, -mask.shape[1] :], mask, mode)
        return loss

    def _chunk_loss(self, layout: LabelLayout, old_logps, advantages, chunk) -> torch.Tensor:
        sequences = torch.unique(layout.sequence_of(chunk.rows))
        logps, _ = layout.dense(chunk.rows, chunk.logprobs, sequences=sequences)
        return rloo_loss(
            logps.sum(dim=1), old_logps[sequences] if old_logps is not None else None, advantages[sequences],
            epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high, num_sequences=len(advantages),
        )  # fmt: skip

    def _log_loss_metrics(self, logps, old_logps, advantages, entropies, mask, mode) -> None:
        """TRL's entropy (token mean) and clip_ratio/* (over every process's sequences) from the detached values."""
        mask = mask.to(entropies.dtype)
        self._log_mean("entropy", (entropies * mask).sum(), mask.sum(), mode)
        ratio = torch.exp(logps - (old_logps if old_logps is not None else logps))
        flags = clip_flags(ratio, advantages, self.epsilon_low, self.epsilon_high)
        low, high, region = (self.accelerator.gather(f.float()) for f in flags)
        metrics = self._metrics[mode]
        metrics["clip_ratio/low_mean"].append(low.nanmean().item())
        metrics["clip_ratio/low_min"].append(low.min().item())
        metrics["clip_ratio/high_mean"].append(high.nanmean().item())
        metrics["clip_ratio/high_max"].append(high.max().item())
        metrics["clip_ratio/region_mean"].append(region.nanmean().item())
