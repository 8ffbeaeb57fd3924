"""SFTTrainer: TRL 1.16's supervised fine-tuning, with the loss from the fused log-prob head (no [B, T, V] logits)."""

import functools
import warnings
from collections.abc import Callable

import torch
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin, TrainingArguments

from posttrain.configs.sft import SFTConfig
from posttrain.data.packing import DataCollatorForLanguageModeling
from posttrain.data.sft import check_assistant_only_loss, first_example, prepare_sft_dataset, set_chat_template
from posttrain.data.token_ids import check_token_ids
from posttrain.losses.sft import sft_loss
from posttrain.models.attention import use_padding_free_attention
from posttrain.models.lm_head import HeadLoss

from .base import PosttrainTrainer, check_train_dataset, router_aux_loss_setup

_PACKED_STRATEGIES = ("bfd", "bfd_split")


class SFTTrainer(PosttrainTrainer):
    """Supervised fine-tuning, a drop-in for TRL 1.16's `SFTTrainer`: same arguments, dataset formats and metrics.

    The loss is the token-mean negative log-likelihood of the label tokens (labels != -100), from
    `fused_linear_logprob` on the last hidden state, never building [batch, seq, vocab] logits. Under gradient
    accumulation it is normalized by the label tokens of the whole accumulated batch (`num_items_in_batch`), as TRL.
    With loss_type="dft", each token's loss is weighted by its detached probability. For a Mixture-of-Experts model,
    router_aux_loss_coef (None: the architecture's own) times its load-balancing loss is added, averaged over the
    accumulated micro-batches, as TRL.

    Logged: loss, num_tokens (tokens seen in training so far: attention-mask ones, or the row length when padding-free),
    mean_token_accuracy (label tokens that are the argmax), entropy (mean over label tokens) and, for MoE models with a
    nonzero coefficient, aux_loss (the unweighted load-balancing loss), as TRL.

    Args:
        model: a hub id or local path (loaded with `args.model_init_kwargs`) or a causal LM.
        args: an SFTConfig (or TrainingArguments, converted); default SFTConfig("<model name>-SFT").
        data_collator: default `DataCollatorForLanguageModeling` (padding-free with packing / padding_free).
        train_dataset / eval_dataset: datasets in the formats of `posttrain.data.sft` (an eval dict is allowed).
        processing_class: the tokenizer (default: the model's); a processor's tokenizer is used for text data.
        compute_loss_func: deprecated in TRL; `(outputs with logits, labels, num_items_in_batch) -> loss`.
        quantization_config: for a model given as a string (e.g. bitsandbytes with PEFT).
        peft_config: wrap the model with this PEFT adapter (needs peft).
        formatting_func: `example -> str`, turning each example into language-modeling text.

    Example:
        >>> trainer = SFTTrainer("Qwen/Qwen2-0.5B", args=SFTConfig("out", packing=True), train_dataset=dataset)
        >>> trainer.train()
    """

    config_class = SFTConfig
    trainer_suffix = "SFT"
    resumable_attributes = ("_total_train_tokens",)
    accepts_processor = True

    def __init__(
        self,
        model: str | PreTrainedModel,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict | None = None,
        processing_class: PreTrainedTokenizerBase | ProcessorMixin | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable | None = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple | None = None,
        preprocess_logits_for_metrics: Callable | None = None,
        quantization_config=None,
        peft_config=None,
        formatting_func: Callable[[dict], str] | None = None,
    ):
        args = self.resolve_args(model, args)
        check_train_dataset(train_dataset, args)
        model = self.load_model(model, args, quantization_config)
        processing_class = self.load_processing_class(model, processing_class, args)
        sample = first_example(train_dataset, "train")
        model = self._setup_model(model, args, sample, peft_config)
        self._formatting_func = formatting_func
        data_collator = self._setup_collator(args, sample, data_collator)
        self._vocab_size = model.get_input_embeddings().num_embeddings
        train_dataset, eval_dataset = self._setup_datasets(args, data_collator, train_dataset, eval_dataset)
        _check_loss_options(args, compute_loss_func)
        _check_checkpointing_kwargs(args)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            compute_loss_func=compute_loss_func,
            compute_metrics=compute_metrics,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        self._check_parallelism(args)
        self.finish_setup(args, entropy=True, stats=("is_argmax",))
        eval_packing = args.packing if args.eval_packing is None else args.eval_packing
        if self.padding_free or (eval_packing and args.packing_strategy in _PACKED_STRATEGIES):
            use_padding_free_attention(self.policy_lm)
        self.router_aux_loss_coef, self.aux_loss_enabled = _router_aux_loss_setup(self.policy_lm, args.router_aux_loss_coef)
        self._total_train_tokens = 0

    def _setup_model(self, model, args: SFTConfig, sample: dict, peft_config):
        """Chat template and PEFT adapter, as TRL sets them up before Trainer.__init__."""
        added_tokens = []
        if args.chat_template_path:
            added_tokens = set_chat_template(model, self._tokenizer, args.chat_template_path)
        if "image" in sample or "images" in sample:
            raise NotImplementedError("posttrain's SFTTrainer does not train on vision datasets (image / images) yet")
        if peft_config is not None and added_tokens:
            raise NotImplementedError(
                "chat_template_path added tokens to the vocabulary; training their embeddings through a PEFT adapter "
                "is not supported yet: add the tokens before building the adapter"
            )
        return self.wrap_peft(model, peft_config, args)

    def _setup_collator(self, args: SFTConfig, sample: dict, data_collator):
        """Decide padding_free and completion_only_loss, check the loss masks, and build the default collator."""
        self.padding_free = args.padding_free or (args.packing and args.packing_strategy in _PACKED_STRATEGIES)
        self._check_padding_free(args, data_collator)
        if args.assistant_only_loss:
            check_assistant_only_loss(sample, self._tokenizer, args.dataset_text_field)
        self.completion_only_loss = args.completion_only_loss
        if self.completion_only_loss is None:
            self.completion_only_loss = "prompt" in sample and "completion" in sample
        if data_collator is not None:
            return data_collator
        return DataCollatorForLanguageModeling(
            pad_token_id=self._tokenizer.pad_token_id,
            padding_free=self.padding_free,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )

    def _setup_datasets(self, args: SFTConfig, data_collator, train_dataset, eval_dataset):
        self._skip_prepare_dataset = bool((args.dataset_kwargs or {}).get("skip_prepare_dataset", False))
        eval_sets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset} if eval_dataset else {}
        self._check_skipped_preparation({"train": train_dataset, **eval_sets}, data_collator)
        if self._skip_prepare_dataset:
            checked = {name: check_token_ids(ds, self._vocab_size, name) for name, ds in eval_sets.items()}
            eval_dataset = checked if isinstance(eval_dataset, dict) else checked.get("eval")
            return check_token_ids(train_dataset, self._vocab_size, "train"), eval_dataset
        if self.completion_only_loss and self._formatting_func is not None:
            raise ValueError(
                "formatting_func turns examples into plain text, which has no completion to restrict the loss to, "
                "but completion_only_loss is on (the default for prompt-completion data): apply the formatting "
                "before passing the dataset, or set completion_only_loss=False"
            )
        return self._prepare(train_dataset, args, args.packing, "train"), self._prepare_eval(eval_dataset, args)

    def _check_parallelism(self, args: SFTConfig) -> None:
        config = getattr(self.accelerator, "parallelism_config", None)
        if getattr(config, "cp_enabled", False) and (args.packing or args.eval_packing):
            raise ValueError(
                "packing with context parallelism (cp_size > 1) would let packed sequences attend to each other "
                "(context parallelism drops their block-diagonal mask): set packing=False and eval_packing=False"
            )
        if getattr(config, "sp_enabled", False):
            raise NotImplementedError("posttrain's SFTTrainer does not support sequence parallelism (sp_size > 1) yet")

    def _check_padding_free(self, args: SFTConfig, data_collator) -> None:
        if not self.padding_free:
            return
        if data_collator is not None:
            raise ValueError("a custom data_collator cannot be used with padding_free / bfd packing")
        if args.packing and args.packing_strategy == "wrapped":
            warnings.warn(
                "padding_free=True with packing_strategy='wrapped': each wrapped row is one sequence whose tokens "
                "attend across the original documents' boundaries",
                stacklevel=4,
            )
        if args.per_device_train_batch_size == 1 and not args.packing:
            warnings.warn(
                "padding_free=True with per_device_train_batch_size=1 saves nothing: there is no padding to remove",
                stacklevel=4,
            )
        if not args.packing and args.max_length is not None:
            raise ValueError(
                f"padding_free=True without packing does not truncate to max_length ({args.max_length}): enable "
                "packing, set max_length=None, or pass sequences already truncated with max_length=None"
            )

    def _prepare(self, dataset, args: SFTConfig, packing: bool, name: str):
        prepared = prepare_sft_dataset(
            dataset,
            self._tokenizer,
            dataset_text_field=args.dataset_text_field,
            formatting_func=self._formatting_func,
            completion_only_loss=self.completion_only_loss,
            assistant_only_loss=args.assistant_only_loss,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            packing=packing,
            packing_strategy=args.packing_strategy,
            shuffle=args.shuffle_dataset,
            seed=args.seed,
            num_proc=args.dataset_num_proc,
            name=name,
        )
        return check_token_ids(prepared, self._vocab_size, name)

    def _prepare_eval(self, eval_dataset, args: SFTConfig):
        if eval_dataset is None:
            return None
        packing = args.packing if args.eval_packing is None else args.eval_packing
        if isinstance(eval_dataset, dict):
            return {key: self._prepare(ds, args, packing, key) for key, ds in eval_dataset.items()}
        return self._prepare(eval_dataset, args, packing, "eval")

    def _check_skipped_preparation(self, datasets: dict, data_collator) -> None:
        # With preparation skipped, no labels are built from mask columns: training would silently use every token
        if not (self._skip_prepare_dataset and isinstance(data_collator, DataCollatorForLanguageModeling)):
            return
        for name, dataset in datasets.items():
            columns = first_example(dataset, name).keys()
            if "labels" not in columns and ("completion_mask" in columns or "assistant_masks" in columns):
                raise ValueError(
                    f"The {name} dataset has mask columns but no 'labels', and skip_prepare_dataset=True skips building "
                    "labels from them, so every token would be trained on: add a 'labels' column (-100 outside the "
                    "loss) or drop skip_prepare_dataset"
                )

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["input_ids", "labels", "seq_lengths"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The SFT loss of one micro-batch (see the class docstring); records entropy, accuracy and num_tokens."""
        mode = "train" if self.model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
        if self.aux_loss_enabled:
            model_inputs["output_router_logits"] = True
        weighted_aux_loss = None
        if self.compute_loss_func is not None or (self.label_smoother is not None and self.args.loss_type == "nll"):
            # As TRL, these losses come from the logits alone: the MoE aux loss is logged but not added
            loss = self._loss_from_logits(model, model_inputs, labels, num_items_in_batch)
            with torch.no_grad():
                out = model(**model_inputs, logprob_labels=labels)
        else:
            count = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
            head_loss = HeadLoss(functools.partial(_chunk_loss, num_tokens=count, loss_type=self.args.loss_type))
            out = model(**model_inputs, logprob_labels=labels, head_loss=head_loss)
            loss = out.loss
            if self.aux_loss_enabled:
                weighted_aux_loss = self.router_aux_loss_coef * out.aux_loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens, and DDP averages the gradients over ranks
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if weighted_aux_loss is not None:
            # a per-micro-batch mean: with num_items_in_batch, Trainer leaves the accumulation scaling to the loss
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + weighted_aux_loss / steps
        self._record_metrics(mode, out, inputs)
        if return_outputs:
            with torch.no_grad():
                return loss, model(**model_inputs, use_cache=False)
        return loss

    def _loss_from_logits(self, model, model_inputs, labels, num_items_in_batch):
        outputs = model(**model_inputs, use_cache=False)
        if self.compute_loss_func is not None:
            return self.compute_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        return self.label_smoother(outputs, labels, shift_labels=True, num_items_in_batch=num_items_in_batch)

    def _record_metrics(self, mode: str, out, inputs) -> None:
        gather = self.accelerator.gather
        valid = gather(out.label_mask.sum()).sum()
        entropy = gather(out.entropy.detach().sum()).sum()
        correct = gather(out.is_argmax.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            if "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                tokens = torch.tensor(inputs["position_ids"].shape[1], device=inputs["position_ids"].device)
            else:
                raise ValueError("the batch has neither attention_mask nor position_ids to count its tokens")
            self._total_train_tokens += gather(tokens).sum().item() // self.get_tp_size()
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(out.aux_loss).mean().item())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval step: the loss alone, or also the logits (an extra forward) when compute_metrics needs them."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), outputs.logits, inputs.get("labels")

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Trainer.evaluate; a dataset passed here (not a name) is prepared as the eval datasets given at init."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_sets = eval_dataset if isinstance(eval_dataset, dict) else {"eval": eval_dataset}
            self._check_skipped_preparation(eval_sets, self.data_collator)
            if not self._skip_prepare_dataset:
                eval_dataset = self._prepare_eval(eval_dataset, self.args)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


def _chunk_loss(chunk, num_tokens, loss_type: str) -> torch.Tensor:
    # every token's loss is its own: any chunk of the label tokens sums its share of the batch's
    return sft_loss(chunk.logprobs, num_tokens, loss_type)


def _check_loss_options(args: SFTConfig, compute_loss_func) -> None:
    if args.loss_type == "dft" and compute_loss_func is not None:
        raise ValueError("compute_loss_func cannot be combined with loss_type='dft' (which defines the loss)")
    if compute_loss_func is not None:
        warnings.warn(
            "compute_loss_func is deprecated (as in TRL 1.16) and needs the full logits: each step runs an extra "
            "forward. Subclass SFTTrainer and override compute_loss instead.",
            FutureWarning,
            stacklevel=3,
        )
    if args.label_smoothing_factor > 0 and args.loss_type == "nll":
        warnings.warn(
            "label_smoothing_factor is deprecated in SFT (as in TRL 1.16) and needs the full logits: each step runs an "
            "extra forward",
            FutureWarning,
            stacklevel=3,
        )


def _check_checkpointing_kwargs(args: SFTConfig) -> None:
    kwargs = args.gradient_checkpointing_kwargs or {}
    if kwargs.get("selective"):
        raise NotImplementedError(
            "gradient_checkpointing_kwargs={'selective': True} (TRL's selective activation checkpointing) is not "
            "supported by posttrain; remove 'selective'"
        )
    kwargs.pop("selective", None)  # False means off; torch's checkpoint would reject the key


def _router_aux_loss_setup(model: PreTrainedModel, coef: float | None) -> tuple[float, bool]:
    """router_aux_loss_setup, and (as TRL's SFT) the model config follows it, so that the model's own forward agrees
    and router_aux_loss_coef=0.0 turns the router logits off."""
    effective, enabled = router_aux_loss_setup(model, coef)
    text_config = model.config.get_text_config()
    if hasattr(text_config, "router_aux_loss_coef"):
        text_config.output_router_logits = enabled
        text_config.router_aux_loss_coef = effective
    return effective, enabled
