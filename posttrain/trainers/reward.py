"""RewardTrainer: TRL 1.16's reward modelling, a sequence classifier with one output trained on preference pairs with
the Bradley-Terry loss."""

import warnings
from collections.abc import Callable

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import (
    AutoModelForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TrainingArguments,
)

from posttrain.configs.reward import RewardConfig
from posttrain.data.reward import (
    DataCollatorForPackedPreference,
    DataCollatorForPreference,
    prepare_reward_dataset,
    score_positions,
)
from posttrain.data.sft import set_chat_template
from posttrain.losses.reward import bradley_terry_loss, pair_statistics
from posttrain.models.attention import use_padding_free_attention

from .base import PosttrainTrainer, check_train_dataset

# Batch keys that are the loss's, not the model's
NON_MODEL_KEYS = ("margin", "sequence_lengths")
# Where transformers' classifiers keep their output layer (decoder-only ones: score)
HEAD_NAMES = ("score", "classifier")


class RewardTrainer(PosttrainTrainer):
    """Reward modelling, a drop-in for TRL 1.16's `RewardTrainer`: same arguments, dataset formats, metrics and saved
    model.

    The model is a sequence classifier with a single output (`AutoModelForSequenceClassification`, num_labels=1; for a
    causal LM checkpoint the `score` head is new and initialized randomly after `set_seed(args.seed)`), which reads
    each sequence's reward at its last non-pad token. Each batch holds B pairs; the loss is
    mean(-log sigmoid(r_chosen - r_rejected - margin)) (margin: the dataset's optional `margin` column), plus
    center_rewards_coefficient * mean((r_chosen + r_rejected)^2) when set. There is no LM head, so no fused kernel.
    With padding_free=True (posttrain's option), each batch's 2B sequences are packed into one row with no padding
    and the rewards are read at the same positions, with the same numbers.

    Logged (as TRL): loss, num_tokens (tokens seen in training so far), min_reward / mean_reward / max_reward (over
    the batch's 2B rewards), accuracy (pairs whose chosen reward is strictly higher) and margin (mean of r_chosen -
    r_rejected). The saved model is the classifier (its score head included), loadable with
    AutoModelForSequenceClassification.

    Args:
        model: a hub id or local path (loaded with `args.model_init_kwargs` and num_labels=1), or a sequence
            classifier with num_labels=1 (a PeftModel of one included).
        args: a RewardConfig (or TrainingArguments, converted); default RewardConfig("<model name>-Reward").
        data_collator: default `DataCollatorForPreference` (`DataCollatorForPackedPreference` with padding_free).
        train_dataset / eval_dataset: preference data, see `posttrain.data.reward.prepare_reward_dataset` (an eval
            dict is allowed).
        processing_class: the tokenizer (default: the model's). Its pad token (else its eos token) becomes the model
            config's pad_token_id, which locates each sequence's last token.
        quantization_config: for a model given as a string (e.g. bitsandbytes with PEFT).
        peft_config: wrap the model with this PEFT adapter (needs peft). Use task_type="SEQ_CLS" (or
            modules_to_save=["score"]) so that the new score head is trained.

    Example:
        >>> dataset = Dataset.from_dict({"prompt": ["2+2="], "chosen": ["4"], "rejected": ["5"]})
        >>> trainer = RewardTrainer("Qwen/Qwen2-0.5B-Instruct", args=RewardConfig("out"), train_dataset=dataset)
        >>> trainer.train()
    """

    config_class = RewardConfig
    trainer_suffix = "Reward"
    model_architecture = AutoModelForSequenceClassification
    model_init_overrides = {"num_labels": 1}  # noqa: RUF012  (read-only)
    uses_fused_head = False
    loss_is_scaled_for_ga = False  # a per-batch mean, as TRL: Trainer divides by the accumulation steps
    _tag_names = ("posttrain", "reward-trainer")

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: RewardConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config=None,
        peft_config=None,
    ):
        args = self.resolve_args(model, args)
        check_train_dataset(train_dataset, args)
        model = self.load_model(model, args, quantization_config)
        processing_class = self.load_processing_class(model, processing_class, args)
        model = self._setup_model(model, args, peft_config)
        if args.padding_free:
            _reward_head(model)  # the packed path reads the head's per-token scores
            use_padding_free_attention(_unwrap_peft(model))
        if data_collator is None:
            collator_class = DataCollatorForPackedPreference if args.padding_free else DataCollatorForPreference
            data_collator = collator_class(self._tokenizer.pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of)
        train_dataset = self._prepare_dataset(train_dataset, args, "train")
        eval_dataset = self._prepare_eval_datasets(eval_dataset, args)
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )  # fmt: skip
        self.finish_setup(args)
        # Trainer's evaluation calls compute_loss (for the loss and the rewards) only when no labels are expected
        self.can_return_loss = True
        self.label_names = []
        self._total_train_tokens = 0
        self.model.add_model_tags(list(self._tag_names))

    # ---- construction ----

    def load_model(self, model, args, quantization_config=None) -> PreTrainedModel:
        """PosttrainTrainer.load_model (num_labels=1 for a model given as a string); a built model must already have
        num_labels=1."""
        model = super().load_model(model, args, quantization_config)
        _check_single_label(model)
        return model

    def _setup_model(self, model, args: RewardConfig, peft_config):
        """Chat template and PEFT adapter, as TRL sets them up before Trainer.__init__."""
        added_tokens = (
            set_chat_template(model, self._tokenizer, args.chat_template_path) if args.chat_template_path else []
        )
        if peft_config is not None and added_tokens:
            raise NotImplementedError(
                "chat_template_path added tokens to the vocabulary; training their embeddings through a PEFT adapter "
                "is not supported yet: add the tokens before building the adapter"
            )
        model = self.wrap_peft(model, peft_config, args)
        if is_peft_model(model):
            _warn_if_head_is_frozen(model)
        return model

    def _prepare_dataset(self, dataset, args: RewardConfig, dataset_name: str):
        with args.main_process_first(desc=f"preparing the {dataset_name} dataset"):
            return prepare_reward_dataset(
                dataset, self._tokenizer, max_length=args.max_length,
                num_proc=args.dataset_num_proc if isinstance(dataset, Dataset) else None, dataset_name=dataset_name,
            )  # fmt: skip

    def _prepare_eval_datasets(self, eval_dataset, args: RewardConfig):
        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict):
            return {name: self._prepare_dataset(dataset, args, name) for name, dataset in eval_dataset.items()}
        return self._prepare_dataset(eval_dataset, args, "eval")

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin"]

    # ---- training ----

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The Bradley-Terry loss of one batch of B pairs (see the class docstring); records the metrics."""
        mode = "train" if self.model.training else "eval"
        model_inputs = {key: value for key, value in inputs.items() if key not in NON_MODEL_KEYS}
        model_inputs["use_cache"] = False
        if "sequence_lengths" in inputs:
            outputs, rewards = self._packed_forward(model, model_inputs, inputs["sequence_lengths"])
        else:
            outputs = model(**model_inputs)
            rewards = outputs.logits
        chosen, rejected = rewards.squeeze(-1).chunk(2)
        loss = bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.args.center_rewards_coefficient)
        self._record_metrics(mode, rewards.detach(), chosen.detach(), rejected.detach(), _num_tokens(inputs))
        return (loss, outputs) if return_outputs else loss

    def _packed_forward(self, model, model_inputs: dict, sequence_lengths: torch.Tensor):
        """(outputs, rewards [2B, 1]) of a packed row: the head's per-token scores, read where the padded layout
        reads them. The forward runs through the wrapped model (DDP, DeepSpeed); a hook keeps the head's output."""
        head = _reward_head(self.policy_lm)
        captured = []
        handle = head.register_forward_hook(lambda module, args, output: captured.append(output))
        try:
            outputs = model(**model_inputs)
        finally:
            handle.remove()
        pad_token_id = self.policy_lm.config.get_text_config().pad_token_id
        positions = score_positions(model_inputs["input_ids"], sequence_lengths, pad_token_id)
        rewards = captured[-1][0, positions]
        outputs.logits = rewards
        return outputs, rewards

    def _record_metrics(self, mode: str, rewards, chosen, rejected, num_tokens: torch.Tensor) -> None:
        gather, gather_for_metrics = self.accelerator.gather, self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        if mode == "train":
            self._total_train_tokens += gather_for_metrics(num_tokens).sum().item() // self.get_tp_size()
        metrics["num_tokens"] = [self._total_train_tokens]
        all_rewards = gather(rewards)
        metrics["min_reward"].append(all_rewards.min().item())
        metrics["mean_reward"].append(all_rewards.mean().item())
        metrics["max_reward"].append(all_rewards.max().item())
        accuracy, margin = pair_statistics(chosen, rejected)
        metrics["accuracy"].append(gather_for_metrics(accuracy).mean().item())
        metrics["margin"].append(gather_for_metrics(margin).mean().item())

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer.evaluate; a dataset passed here (not a name) is prepared as the eval datasets given at init."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._prepare_eval_datasets(eval_dataset, self.args)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


def _num_tokens(inputs: dict) -> torch.Tensor:
    lengths = inputs.get("sequence_lengths")
    return lengths.sum() if lengths is not None else inputs["attention_mask"].sum()


def _unwrap_peft(model):
    return model.get_base_model() if is_peft_model(model) else model


def _check_single_label(model) -> None:
    num_labels = getattr(model.config, "num_labels", None)
    if num_labels != 1:
        raise ValueError(
            f"the model ({type(model).__name__}) has num_labels={num_labels}, but a reward model outputs one score per "
            "sequence: pass a sequence classifier built with num_labels=1 (e.g. AutoModelForSequenceClassification."
            "from_pretrained(path, num_labels=1)), or the model's path to have it loaded that way"
        )


def _reward_head(model) -> torch.nn.Module:
    """The classifier's output layer, `score` (transformers' decoder-only classifiers), which the packed path reads
    token by token; a ValueError for a model without one."""
    head = getattr(_unwrap_peft(model), "score", None)
    if head is None:
        raise ValueError(
            f"padding_free=True needs a classifier whose output layer is `score` (transformers' decoder-only "
            f"ForSequenceClassification models), and {type(_unwrap_peft(model)).__name__} has none: set "
            "padding_free=False"
        )
    return head


def _warn_if_head_is_frozen(model) -> None:
    head_params = [
        param for name, param in model.named_parameters() if any(part in HEAD_NAMES for part in name.split("."))
    ]
    if head_params and not any(param.requires_grad for param in head_params):
        warnings.warn(
            "the PEFT adapter leaves the reward head (score / classifier) frozen at its random initialization: use "
            "task_type='SEQ_CLS' in the peft_config, or add modules_to_save=['score']",
            stacklevel=4,
        )
