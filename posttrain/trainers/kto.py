"""KTOTrainer: TRL 1.16's KTOTrainer, drop-in, with log-probs from the fused head and losses from losses.kto.

A batch holds B unpaired examples (prompt + completion, labelled desirable or not) and, for the loss types that
estimate the KL term, B mismatched sequences (each prompt followed by the previous example's completion). A step runs
the reference on both sequences of each example (or reads its log-probs precomputed) and the policy on the mismatched
ones (without gradient), which give the reference point; then the policy on the B sequences, where the fused head
computes the loss of whole sequences and its gradients in the forward (posttrain.ops.fused_linear_loss).
"""

import functools
import warnings

import torch
from datasets import Dataset, IterableDataset
from transformers import TrainerCallback

from posttrain.configs.kto import KTOConfig
from posttrain.data.kto import (
    KL_COLUMN,
    REF_COLUMNS,
    DataCollatorForUnpairedPreference,
    prepare_unpaired_dataset,
    warn_if_unbalanced,
)
from posttrain.losses.kto import kl_estimate, kto_losses
from posttrain.models.lm_head import HeadLoss, LabelLayout

from .base import check_train_dataset, no_grad_without_checkpointing
from .preference import ReferenceTrainer

KL_PREFIX = "KL_"
# Batch keys that are not inputs of the policy's forward on the examples
NON_MODEL_KEYS = {"completion_mask", "label", *REF_COLUMNS}


class KTOTrainer(ReferenceTrainer):
    """Kahneman-Tversky Optimization, as TRL 1.16's `KTOTrainer` (same arguments, data formats, losses and metrics).

    Args:
        model: a hub id or local path (loaded with AutoModelForCausalLM.from_pretrained and args.model_init_kwargs;
            dtype float32 unless given), a PreTrainedModel, or a PeftModel.
        ref_model: the reference policy. When None, it is built from the same source as `model` (loaded again from
            the id / path, or a deep copy of an in-memory model), except that none is kept when
            precompute_ref_log_probs is set (the reference log-probs are computed from `model` before training), and
            a PEFT model's reference is the model with its adapter disabled (or a frozen copy of a pretrained one).
        args: a KTOConfig (default: KTOConfig("<model name>-KTO")).
        data_collator: default DataCollatorForUnpairedPreference. A custom one must return the same keys and truncate
            the sequences itself.
        train_dataset, eval_dataset: unpaired data (`prompt`, `completion`, bool `label`) or paired data (`chosen`,
            `rejected`, optionally `prompt`; unpaired into a desirable and an undesirable example), text or
            conversational (see posttrain.data.kto.prepare_unpaired_dataset); eval_dataset may also be a dict of
            named datasets.
        processing_class: the tokenizer (default: loaded from the model's name or path; pad token defaults to EOS).
        compute_metrics, callbacks, optimizers: as transformers.Trainer's.
        quantization_config: a BitsAndBytesConfig applied when `model` is loaded from an id / path.
        peft_config: wrap the model with this PEFT adapter (needs peft installed).

    The loss is the mean over the batch of each example's weighted loss (posttrain.losses.kto.kto_losses); "kto"
    compares each implied reward with the batch's KL estimate, the mean over processes of the mismatched pairs'
    policy - reference log-probs, clamped at 0 and without gradient. For a Mixture-of-Experts policy,
    router_aux_loss_coef (None: the architecture's own) times its load-balancing loss is added, as TRL.

    Logged (TRL's names): loss, kl, entropy, num_tokens, logits/chosen, logits/rejected, rewards/chosen, logps/chosen,
    rewards/rejected, logps/rejected, rewards/margins (the */chosen and */rejected values only for steps that have
    such examples, margins when they have both), and aux_loss (MoE with a nonzero coefficient).

    Example:
        >>> from posttrain import KTOConfig, KTOTrainer
        >>> dataset = Dataset.from_dict({"prompt": ["2+2=", "2+2="], "completion": ["4", "5"], "label": [True, False]})
        >>> trainer = KTOTrainer("Qwen/Qwen2.5-0.5B-Instruct", args=KTOConfig("out"), train_dataset=dataset)
        >>> trainer.train()
    """

    config_class = KTOConfig
    trainer_suffix = "KTO"
    reference_columns = REF_COLUMNS
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model,
        ref_model=None,
        args: KTOConfig | None = None,
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
        if data_collator is None:
            data_collator = DataCollatorForUnpairedPreference(
                self._tokenizer.pad_token_id, max_length=args.max_length, pad_to_multiple_of=args.pad_to_multiple_of
            )

        self.beta = args.beta
        self.loss_type = args.loss_type
        self.desirable_weight = args.desirable_weight
        self.undesirable_weight = args.undesirable_weight
        self.calculate_KL = args.estimates_kl
        self.precompute_ref_logps = args.precompute_ref_log_probs

        train_dataset = self.prepare_dataset(train_dataset, processing_class, args, "train")
        if isinstance(train_dataset, Dataset):
            warn_if_unbalanced(train_dataset["label"], args.desirable_weight, args.undesirable_weight)
        eval_dataset = self.prepare_eval_datasets(eval_dataset, processing_class, args)

        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers,
        )  # fmt: skip
        # logits/* read the mean logit
        self.finish_reference_setup(model, ref_model, model_source, args, quantization_config, entropy=True,
                                    stats=("mean_logit",))  # fmt: skip

    # ----------------------------------------------------------------------------------------------------------------
    # Set-up

    def prepare_dataset(self, dataset, processing_class, args: KTOConfig, dataset_name: str):
        # The mismatched pairs are formed within blocks of the train batch size, for the eval datasets too (as TRL)
        kl_batch_size = args.per_device_train_batch_size if args.estimates_kl else None
        with args.main_process_first(desc=f"preparing the {dataset_name} dataset"):
            return prepare_unpaired_dataset(
                dataset, processing_class, max_length=args.max_length, kl_batch_size=kl_batch_size,
                num_proc=args.dataset_num_proc if isinstance(dataset, Dataset) else None, dataset_name=dataset_name,
            )  # fmt: skip

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "completion_ids", KL_COLUMN, "label", *REF_COLUMNS]

    def compute_ref_log_probs(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The reference log-probs of one collated batch, summed over the completion tokens: of the examples [B], and
        of the mismatched pairs [B] (None for a loss type without the KL term). `model` is the reference model, or the
        policy itself before training (with its PEFT adapter disabled for a PEFT policy)."""
        with torch.no_grad(), self.reference_context(model), self.accelerator.autocast():
            logps = _completion_logps(model, inputs)
            kl_logps = _completion_logps(model, inputs, KL_PREFIX) if self.calculate_KL else None
        return logps, kl_logps

    # ----------------------------------------------------------------------------------------------------------------
    # Loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The KTO loss of one batch (the mean of posttrain.losses.kto.kto_losses), and the batch's metrics
        appended to self._metrics.

        The reference point and the reference log-probs come first; the fused head then computes the loss with its
        gradients in the forward, chunk by chunk of whole sequences."""
        mode = "train" if self.model.training else "eval"
        desirable = inputs["label"].bool()
        ref_logps, ref_kl_logps = self.reference_logps(inputs)
        ref_logps = ref_logps.float()
        kl = self._kl_estimate(model, inputs, ref_kl_logps)
        model_kwargs, labels = _model_kwargs(inputs), _labels(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        examples = _ExamplesLoss(self, ref_logps, desirable, kl, labels[:, 1:] != -100)
        outputs = model(**model_kwargs, logprob_labels=labels, head_loss=examples.head_loss())
        loss = outputs.loss + examples.of_unlabelled()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(outputs.aux_loss).mean().item())
        self._log_metrics(mode, inputs, outputs, outputs.logprobs.sum(1), ref_logps, desirable, kl)
        if not return_outputs:
            return loss
        warnings.warn(
            "return_outputs=True (logits for compute_metrics) is deprecated, as in TRL (removed in 2.0): the fused "
            "head builds no logits, so they come from an extra forward pass",
            FutureWarning,
            stacklevel=2,
        )
        with torch.no_grad():
            return loss, model(**model_kwargs)

    def _kl_estimate(self, model, inputs, ref_kl_logps) -> torch.Tensor:
        """The batch's reference point (0 for a loss type without it), from the policy's log-probs of the mismatched
        pairs, taken without gradient."""
        if not self.calculate_KL:
            return torch.zeros((), device=inputs["input_ids"].device)
        with no_grad_without_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            kl_logps = _completion_logps(model, inputs, KL_PREFIX)
        return kl_estimate(kl_logps, ref_kl_logps.to(kl_logps), gather=self.accelerator.gather_for_metrics)

    def _log_metrics(self, mode: str, inputs, outputs, logps, ref_logps, desirable, kl) -> None:
        metrics, total = self._metrics[mode], self._sum_over_processes
        mask = outputs.label_mask
        metrics["kl"].append(kl.item())
        n_tokens = total(mask.sum())
        entropy = total((outputs.entropy.detach() * mask).sum())
        metrics["entropy"].append((entropy / n_tokens).item() if n_tokens > 0 else 0.0)
        if mode == "train":
            self._total_train_tokens += int(total(inputs["attention_mask"].sum()).item()) // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            side_mask = mask & rows[:, None]
            count = total(side_mask.sum()).item()
            if count > 0:
                metrics[f"logits/{side}"].append(total(outputs.mean_logit[side_mask].sum()).item() / count)
        rewards = self.beta * (logps - ref_logps)
        counts = {}
        for side, rows in (("chosen", desirable), ("rejected", ~desirable)):
            counts[side] = total(rows.sum()).item()
            if counts[side] > 0:
                metrics[f"rewards/{side}"].append(total(rewards[rows].nansum()).item() / counts[side])
                metrics[f"logps/{side}"].append(total(logps[rows].nansum()).item() / counts[side])
        if counts["chosen"] > 0 and counts["rejected"] > 0:
            metrics["rewards/margins"].append(metrics["rewards/chosen"][-1] - metrics["rewards/rejected"][-1])

class _ExamplesLoss:
    """The KTO loss of a batch's examples from their per-token log-probs: each chunk of the fused head's rows (whole
    sequences) gives its examples' share of the batch mean."""

    def __init__(self, trainer: KTOTrainer, ref_logps, desirable, kl, label_mask: torch.Tensor):
        self.ref_logps, self.desirable, self.kl, self.label_mask = ref_logps, desirable, kl, label_mask
        self.options = {
            "beta": trainer.beta, "loss_type": trainer.loss_type, "desirable_weight": trainer.desirable_weight,
            "undesirable_weight": trainer.undesirable_weight,
        }  # fmt: skip

    def head_loss(self) -> HeadLoss:
        layout = LabelLayout(self.label_mask)
        rows = torch.arange(len(self.label_mask), device=self.label_mask.device)
        return HeadLoss(functools.partial(self.of_chunk, layout), groups=rows[:, None].expand_as(self.label_mask))

    def of_chunk(self, layout: LabelLayout, chunk) -> torch.Tensor:
        sequences = layout.sequence_of(chunk.rows)
        examples = torch.unique(sequences)
        logps = chunk.logprobs.new_zeros(len(self.desirable)).index_add(0, sequences, chunk.logprobs)[examples]
        return self._losses(logps, examples).sum() / len(self.desirable)

    def of_unlabelled(self) -> torch.Tensor:
        """The share of the examples without a label position (no chunk holds them): their log-prob is 0, so their
        loss is a constant, as TRL counts it."""
        examples = (~self.label_mask.any(1)).nonzero().squeeze(1)
        logps = self.ref_logps.new_zeros(len(examples))
        return self._losses(logps, examples).sum() / len(self.desirable)

    def _losses(self, logps, examples) -> torch.Tensor:
        ref_logps = self.ref_logps[examples].to(logps)
        return kto_losses(logps, ref_logps, self.desirable[examples], self.kl.to(logps), **self.options)


# --------------------------------------------------------------------------------------------------------------------
# Batch layout: B padded sequences (prefix ""), and B mismatched ones (prefix "KL_")


def _model_kwargs(inputs: dict) -> dict:
    """The policy's keyword arguments for the examples' sequences (what a custom collator adds included)."""
    return {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS and not key.startswith(KL_PREFIX)}


def _labels(inputs: dict, prefix: str = "") -> torch.Tensor:
    """input_ids with -100 outside the completions."""
    return inputs[f"{prefix}input_ids"].masked_fill(inputs[f"{prefix}completion_mask"] == 0, -100)


def _completion_logps(model, inputs: dict, prefix: str = "") -> torch.Tensor:
    """[B] summed completion log-probs of the examples' sequences (prefix "") or of the mismatched ones ("KL_")."""
    outputs = model(
        input_ids=inputs[f"{prefix}input_ids"],
        attention_mask=inputs[f"{prefix}attention_mask"],
        logprob_labels=_labels(inputs, prefix),
    )
    return outputs.logprobs.sum(1)
