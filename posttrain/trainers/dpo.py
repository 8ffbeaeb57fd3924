"""DPOTrainer: TRL 1.16's DPOTrainer, drop-in, with the loss computed by the fused head (posttrain.losses.dpo).

One forward of the 2B sequences of a batch (B chosen, then B rejected; padded, or packed into one row with
padding_free) through the model patched by `add_fused_logprob_head` gives per-token log-probs, entropy, mean logit
and argmax flags without [batch, seq, vocab] logits. Everything after it works on a per-sequence view of those
per-token values ([2B, T'], one row per sequence), whichever the layout.
"""

import functools
import warnings

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback
from transformers.utils import logging

from posttrain.configs.dpo import DPOConfig
from posttrain.data.dpo import (
    REF_COLUMNS,
    TOKENIZED_COLUMNS,
    DataCollatorForPackedPreference,
    DataCollatorForPreference,
    prepare_preference_dataset,
)
from posttrain.data.token_ids import check_token_ids
from posttrain.losses.dpo import completion_lengths, dpo_preference_loss, per_sequence, sequence_logps, wpo_weights
from posttrain.models.attention import use_padding_free_attention
from posttrain.models.lm_head import HeadLoss, LabelLayout, packed_layout
from posttrain.ops.dpo_loss import LOSS_SEMANTICS

from .base import check_train_dataset
from .preference import ReferenceTrainer

logger = logging.get_logger(__name__)

# Batch keys that are not model inputs
NON_MODEL_KEYS = {"completion_mask", "sequence_lengths", *REF_COLUMNS}


class DPOTrainer(ReferenceTrainer):
    """Direct Preference Optimization, as TRL 1.16's `DPOTrainer` (same arguments, data formats, losses and metrics).

    Args:
        model: a hub id or local path (loaded with AutoModelForCausalLM.from_pretrained and args.model_init_kwargs;
            dtype float32 unless given), a PreTrainedModel, or a PeftModel.
        ref_model: the reference policy. When None, it is built from the same source as `model` (loaded again from
            the id / path, or a deep copy of an in-memory model), except that none is kept when
            precompute_ref_log_probs is set (the reference log-probs are computed from `model` before training), and
            a PEFT model's reference is the model with its adapter disabled.
        args: a DPOConfig (default: DPOConfig("<model name>-DPO")).
        data_collator: default DataCollatorForPreference (padded) or DataCollatorForPackedPreference
            (args.padding_free). A custom one must return the same keys.
        train_dataset, eval_dataset: preference data with `chosen` and `rejected` columns and optionally `prompt`,
            text or conversational (see posttrain.data.dpo.prepare_preference_dataset); eval_dataset may also be a
            dict of named datasets.
        processing_class: the tokenizer (default: loaded from the model's name or path; pad token defaults to EOS).
        compute_metrics, callbacks, optimizers: as transformers.Trainer's.
        quantization_config: a BitsAndBytesConfig applied when `model` is loaded from an id / path.
        peft_config: wrap the model with this PEFT adapter (needs peft installed).

    For a Mixture-of-Experts policy, router_aux_loss_coef (None: the architecture's own) times its load-balancing loss
    on the batch is added to the loss, as TRL.

    Logged (TRL's names): loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies, logps/chosen,
    logps/rejected, logits/chosen, logits/rejected, entropy, mean_token_accuracy, num_tokens, and aux_loss (MoE with a
    nonzero coefficient).

    Example:
        >>> from posttrain import DPOConfig, DPOTrainer
        >>> dataset = Dataset.from_dict({"prompt": ["2+2="], "chosen": ["4"], "rejected": ["5"]})
        >>> trainer = DPOTrainer("Qwen/Qwen2.5-0.5B-Instruct", args=DPOConfig("out", beta=0.1), train_dataset=dataset)
        >>> trainer.train()
    """

    config_class = DPOConfig
    trainer_suffix = "DPO"
    reference_columns = REF_COLUMNS
    resumable_attributes = ("_total_train_tokens",)
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        args = self.resolve_args(model, args)
        check_train_dataset(train_dataset, args)
        model_source = model
        model, processing_class = self.load_policy(
            model, ref_model, args, processing_class, peft_config, quantization_config
        )
        _check_text_only(train_dataset)
        self.padding_free = args.padding_free
        if self.padding_free:
            use_padding_free_attention(_unwrap_peft(model))
        if data_collator is None:
            data_collator = _default_collator(args, processing_class)

        self.beta = args.beta
        self.loss_types = list(args.loss_type)
        self.loss_weights = list(args.loss_weights or [1.0] * len(self.loss_types))
        self.ld_alpha = args.ld_alpha
        self.use_weighting = args.use_weighting
        self.precompute_ref_logps = args.precompute_ref_log_probs

        self._vocab_size = model.get_input_embeddings().num_embeddings
        train_dataset = self.prepare_dataset(train_dataset, processing_class, args, "train")
        eval_dataset = self.prepare_eval_datasets(eval_dataset, processing_class, args)

        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers,
        )  # fmt: skip
        # logits/* need the mean logit, mean_token_accuracy the argmax, WPO's weights log sum_v p_v^2
        stats = ("mean_logit", "is_argmax", *(("log_sum_sq_probs",) if args.use_weighting else ()))
        self.finish_reference_setup(model, ref_model, model_source, args, quantization_config, entropy=True,
                                    stats=stats)  # fmt: skip

    # ----------------------------------------------------------------------------------------------------------------
    # Set-up

    def prepare_dataset(self, dataset, processing_class, args: DPOConfig, dataset_name: str):
        with args.main_process_first(desc=f"preparing the {dataset_name} dataset"):
            prepared = prepare_preference_dataset(
                dataset, processing_class, max_length=args.max_length, truncation_mode=args.truncation_mode,
                num_proc=args.dataset_num_proc if isinstance(dataset, Dataset) else None, dataset_name=dataset_name,
            )  # fmt: skip
        return check_token_ids(prepared, self._vocab_size, dataset_name, TOKENIZED_COLUMNS)

    def configure_reference(self, reference) -> None:
        if self.padding_free:
            use_padding_free_attention(reference)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*TOKENIZED_COLUMNS, *REF_COLUMNS]

    def compute_ref_log_probs(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference log-probs (chosen [B], rejected [B]) of one collated batch, summed over the completion tokens
        (with LD-DPO's weighting when ld_alpha is set). `model` is the reference model, or the policy itself before
        training (with its PEFT adapter disabled for a PEFT policy)."""
        model_kwargs, labels = _model_inputs(inputs)
        with torch.no_grad(), self.reference_context(model), self.accelerator.autocast():
            outputs = model(**model_kwargs, logprob_labels=labels)
        per_token = per_sequence(outputs.logprobs, inputs.get("sequence_lengths"))
        mask = per_sequence(outputs.label_mask, inputs.get("sequence_lengths"))
        return sequence_logps(per_token, mask, self.ld_alpha).chunk(2)

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The DPO loss of one batch: sum over loss types of loss_weight * mean over pairs (posttrain.losses.dpo), and
        the batch's metrics appended to self._metrics.

        Where every loss term is a sum over pairs (all but aot / aot_unpaired, which sort across the batch, and sft
        with WPO weights, whose mean weight spans the batch), the fused head computes it with its gradients in the
        forward, chunk by chunk of whole pairs; otherwise from the per-token log-probs."""
        mode = "train" if self.model.training else "eval"
        model_kwargs, labels = _model_inputs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        ref_logps = self.reference_logps(inputs)
        pairs_loss = _PairsLoss(self, inputs, ref_logps, self._sft_token_count(num_items_in_batch))
        if self._loss_in_head:
            layout = _label_layout(labels, inputs)
            head_loss = HeadLoss(functools.partial(pairs_loss.of_chunk, layout), groups=pairs_loss.groups(layout))
            outputs = model(**model_kwargs, logprob_labels=labels, head_loss=head_loss)
            loss = outputs.loss
        else:
            outputs = model(**model_kwargs, logprob_labels=labels)
            loss = pairs_loss.of_batch(outputs)
        tokens = {
            name: per_sequence(getattr(outputs, name), inputs.get("sequence_lengths"))
            for name in ("logprobs", "label_mask", "entropy", "mean_logit", "is_argmax", "log_sum_sq_probs")
            if getattr(outputs, name) is not None
        }
        chosen_logps, rejected_logps = sequence_logps(tokens["logprobs"].detach(), tokens["label_mask"], self.ld_alpha).chunk(2)
        logps = (chosen_logps, rejected_logps, *(ref.to(chosen_logps) for ref in ref_logps))
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_metrics(mode, logps, tokens, inputs)
        if return_outputs:
            warnings.warn(
                "return_outputs=True (logits for compute_metrics) is deprecated, as in TRL (removed in 2.0): the fused "
                "head builds no logits, so they come from an extra forward pass",
                FutureWarning,
                stacklevel=2,
            )
            with torch.no_grad():
                return loss, model(**model_kwargs)
        return loss

    @property
    def _loss_in_head(self) -> bool:
        sorts_batch = any(LOSS_SEMANTICS[name].sorts_batch for name in self.loss_types)
        return not sorts_batch and not (self.use_weighting and "sft" in self.loss_types)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """With an "sft" loss term: the chosen-completion tokens of the whole accumulated batch (of every process
        when average_tokens_across_devices), so that the term is their mean, as it would be without accumulation."""
        if "sft" not in self.loss_types or not batch_samples:
            return None
        count = sum(_chosen_label_count(batch) for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def _sft_token_count(self, num_items_in_batch) -> torch.Tensor | None:
        # The micro-batch's share of the accumulated count: Trainer divides this loss by the accumulation steps, and
        # DDP averages the gradients of the processes the count spans
        if num_items_in_batch is None:
            return None
        processes = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
        return num_items_in_batch / (self.current_gradient_accumulation_steps * processes)

    def _log_metrics(self, mode: str, logps, tokens, inputs) -> None:
        metrics, total = self._metrics[mode], self._sum_over_processes
        mask = tokens["label_mask"]
        chosen_mask = mask.chunk(2)[0]
        n_tokens = total(mask.sum())
        entropy = total((tokens["entropy"].detach() * mask).sum())
        metrics["entropy"].append((entropy / n_tokens).item() if n_tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(total(_num_tokens(inputs)).item()) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for side, mean_logit, side_mask in zip(("chosen", "rejected"), tokens["mean_logit"].chunk(2), mask.chunk(2)):
            count = total(side_mask.sum()).item()
            summed = total(mean_logit[side_mask].sum()).item()
            metrics[f"logits/{side}"].append(summed / count if count > 0 else 0.0)
        chosen_tokens = total(chosen_mask.sum())
        correct = total((tokens["is_argmax"].chunk(2)[0] & chosen_mask).sum())
        metrics["mean_token_accuracy"].append((correct / chosen_tokens).item() if chosen_tokens > 0 else 0.0)

        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps = logps
        chosen_rewards = self.beta * (chosen_logps - ref_chosen_logps).detach()
        rejected_rewards = self.beta * (rejected_logps - ref_rejected_logps).detach()
        values = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": chosen_logps.detach(),
            "logps/rejected": rejected_logps.detach(),
        }
        for name, value in values.items():
            metrics[name].append(self.accelerator.gather(value).mean().item())

# --------------------------------------------------------------------------------------------------------------------
# Construction helpers


def _check_text_only(train_dataset) -> None:
    first = next(iter(train_dataset), None) or {}
    if "image" in first or "images" in first:
        raise NotImplementedError(
            "vision preference data (an 'image' / 'images' column) is not supported by posttrain's DPOTrainer yet; "
            "use TRL's DPOTrainer for vision-language models"
        )


def _default_collator(args: DPOConfig, tokenizer):
    collator = DataCollatorForPackedPreference if args.padding_free else DataCollatorForPreference
    return collator(
        pad_token_id=tokenizer.pad_token_id, max_length=args.max_length, truncation_mode=args.truncation_mode,
        pad_to_multiple_of=args.pad_to_multiple_of,
    )  # fmt: skip


def _unwrap_peft(model):
    return model.get_base_model() if is_peft_model(model) else model


# --------------------------------------------------------------------------------------------------------------------
# Batch layout: padded [2B, T] or one packed row [1, L] with sequence_lengths [2B]


def _model_inputs(inputs: dict) -> tuple[dict, torch.Tensor]:
    """The model's keyword arguments and the labels (-100 outside completions, and on each packed sequence's first
    token, which must not be predicted from the previous sequence's last)."""
    model_kwargs = {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    lengths = inputs.get("sequence_lengths")
    if lengths is not None:
        starts = torch.cumsum(lengths, 0) - lengths
        labels[:, starts] = -100
    return model_kwargs, labels


def _chosen_label_count(inputs: dict) -> torch.Tensor:
    """The chosen completions' label tokens in a collated batch (what the "sft" term averages over)."""
    _, labels = _model_inputs(inputs)
    return per_sequence(labels[:, 1:] != -100, inputs.get("sequence_lengths")).chunk(2)[0].sum()


def _num_tokens(inputs: dict) -> torch.Tensor:
    lengths = inputs.get("sequence_lengths")
    return lengths.sum() if lengths is not None else inputs["attention_mask"].sum()


def _label_layout(labels: torch.Tensor, inputs: dict) -> LabelLayout:
    mask = labels[:, 1:] != -100
    lengths = inputs.get("sequence_lengths")
    return LabelLayout(mask) if lengths is None else packed_layout(mask, lengths)


class _PairsLoss:
    """The DPO loss of a batch's pairs, from their per-token log-probs: of the whole batch, or (`of_chunk`) of the
    whole pairs in a chunk of the fused head's rows, as that chunk's share of the batch's loss."""

    def __init__(self, trainer: "DPOTrainer", inputs: dict, ref_logps, sft_token_count):
        args = trainer.args
        self.trainer = trainer
        self.ref_chosen, self.ref_rejected = ref_logps
        self.sequence_lengths = inputs.get("sequence_lengths")
        lengths = completion_lengths(inputs["completion_mask"], self.sequence_lengths)
        self.chosen_lengths, self.rejected_lengths = lengths.chunk(2)
        self.num_pairs = len(self.chosen_lengths)
        self.sft_token_count = sft_token_count if sft_token_count is not None else _chosen_label_count(inputs)
        self.options = dict(
            loss_types=trainer.loss_types, loss_weights=trainer.loss_weights, beta=trainer.beta,
            label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
            impl="auto" if args.use_fused_kernels else "torch",
        )  # fmt: skip

    def groups(self, layout: LabelLayout) -> torch.Tensor:
        """Each label position's pair (sequence i and i + B are pair i), [R, T - 1] as the head loss wants them."""
        groups = torch.zeros(layout.mask_shape, dtype=torch.long, device=layout.sequence_ids.device)
        groups.view(-1)[layout.positions] = layout.sequence_ids % self.num_pairs
        return groups

    def of_chunk(self, layout: LabelLayout, chunk) -> torch.Tensor:
        pairs = torch.unique(layout.sequence_of(chunk.rows) % self.num_pairs)
        sequences = torch.cat([pairs, pairs + self.num_pairs])
        logps, log_sum_sq, mask = layout.dense(chunk.rows, chunk.logprobs, chunk.log_sum_sq_probs, sequences=sequences)
        return self._loss(logps, mask, log_sum_sq, pairs)

    def of_batch(self, outputs) -> torch.Tensor:
        lengths = self.sequence_lengths
        logps, mask = per_sequence(outputs.logprobs, lengths), per_sequence(outputs.label_mask, lengths)
        log_sum_sq = per_sequence(outputs.log_sum_sq_probs, lengths) if outputs.log_sum_sq_probs is not None else None
        return self._loss(logps, mask, log_sum_sq, torch.arange(self.num_pairs, device=logps.device))

    def _loss(self, logps, mask, log_sum_sq, pairs) -> torch.Tensor:
        trainer = self.trainer
        chosen, rejected = sequence_logps(logps, mask, trainer.ld_alpha).chunk(2)
        chosen_mask = mask.chunk(2)[0]
        weights = wpo_weights(logps.detach(), log_sum_sq, mask) if trainer.use_weighting else None
        return dpo_preference_loss(
            chosen, rejected, self.ref_chosen[pairs].to(chosen), self.ref_rejected[pairs].to(chosen),
            chosen_lengths=self.chosen_lengths[pairs], rejected_lengths=self.rejected_lengths[pairs],
            sft_logps=torch.where(chosen_mask, logps.chunk(2)[0], 0.0).sum(1), sft_tokens=chosen_mask.sum(1),
            pair_weights=weights, num_pairs=self.num_pairs, num_sft_tokens=self.sft_token_count, **self.options,
        )  # fmt: skip
