"""What the offline trainers with a reference policy share (DPO, KTO): the reference model (or a PEFT policy's own
reference adapter), reference log-probs computed before training (precompute_ref_log_probs), and evaluation on
datasets passed later."""

import contextlib

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset
from torch.utils.data import DataLoader

from posttrain._compat import checkpointing_disabled

from .base import PosttrainTrainer, router_aux_loss_setup


class ReferenceTrainer(PosttrainTrainer):
    """A PosttrainTrainer whose loss compares the policy with a frozen reference.

    Subclasses give `reference_columns` (the dataset columns precompute_ref_log_probs adds), `compute_ref_log_probs`
    (one [B] tensor per column, or None for a column the configuration does not use) and `prepare_dataset`; they set
    `self.precompute_ref_logps` before calling `build_reference_model` after Trainer.__init__.
    """

    reference_columns: tuple[str, ...] = ()

    def compute_ref_log_probs(self, model, inputs: dict) -> tuple[torch.Tensor | None, ...]:
        raise NotImplementedError

    def prepare_dataset(self, dataset, processing_class, args, name: str):
        raise NotImplementedError

    def prepare_eval_datasets(self, eval_dataset, processing_class, args):
        """prepare_dataset on eval_dataset, or on each dataset of a dict of them."""
        if eval_dataset is None:
            return None
        if isinstance(eval_dataset, dict):
            return {name: self.prepare_dataset(ds, processing_class, args, name) for name, ds in eval_dataset.items()}
        return self.prepare_dataset(eval_dataset, processing_class, args, "eval")

    def load_policy(self, model, ref_model, args, processing_class, peft_config, quantization_config):
        """The policy, loaded and PEFT-wrapped, and its processing class. A PEFT policy given without a reference gets a reference adapter: a copy of its adapter as
        loaded (TRL's "ref" adapter). Returns (model, processing_class)."""
        loaded = self.load_model(model, args, quantization_config)
        if ref_model is loaded:
            raise ValueError(
                "model and ref_model are the same object; leave ref_model=None to train against a copy of the model"
            )
        processing_class = self.load_processing_class(loaded, processing_class, args)
        if peft_config is None and is_peft_model(loaded) and ref_model is None:
            add_reference_adapter(loaded)
        return self.wrap_peft(loaded, peft_config, args), processing_class

    def finish_reference_setup(self, model, ref_model, model_source, args, quantization_config, **head_options):
        """After Trainer.__init__: the fused head (`head_options`), the router's auxiliary loss, the token counter,
        the reference model and, with precompute_ref_log_probs, the reference columns."""
        self.finish_setup(args, **head_options)
        self.router_aux_loss_coef, self.aux_loss_enabled = router_aux_loss_setup(model, args.router_aux_loss_coef)
        self._total_train_tokens = 0
        parallelism = self.accelerator.parallelism_config
        # Tensor-parallel ranks see the same batch: a token count gathered over all ranks repeats each tp_size times
        self._tp_size = parallelism.tp_size if parallelism is not None else 1
        self.ref_model = self.build_reference_model(ref_model, model_source, args, quantization_config)
        if self.precompute_ref_logps:
            self.precompute_reference()
            if ref_model is None:
                self.ref_model = None  # under FSDP one was built for the precomputation only

    def configure_reference(self, reference) -> None:
        """Adapt a reference model to the batches it will see (DPO: packing-safe attention). Default: nothing."""

    def build_reference_model(self, ref_model, model_source, args, quantization_config):
        """The given reference, or a frozen copy of the initial policy, ready for training; None when the reference
        log-probs come from the policy itself (its adapter disabled, for PEFT) or are precomputed (except under FSDP,
        whose sharded policy cannot run the precomputation outside training: a copy is built for it)."""
        if args.sync_ref_model and is_peft_model(self.model):
            raise NotImplementedError(
                "sync_ref_model=True with a PEFT model is not supported: the reference is the model with its adapter "
                "disabled, so there is no separate reference model to mix into"
            )
        if ref_model is None:
            if is_peft_model(self.model) or (self.precompute_ref_logps and not self.is_fsdp_enabled):
                return None
            ref_model = self.create_reference_model(model_source, args, quantization_config)
        self.configure_reference(ref_model)
        return self.prepare_reference_model(ref_model, args)

    # ---- reference log-probs ----

    def reference_logps(self, inputs: dict) -> tuple[torch.Tensor | None, ...]:
        """The batch's reference log-probs: its precomputed columns, or a pass through the reference (the policy with
        its reference adapter, or adapters off, when there is no reference model)."""
        if self.precompute_ref_logps:
            return tuple(inputs.get(column) for column in self.reference_columns)
        return self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else self.model, inputs)

    @contextlib.contextmanager
    def reference_context(self, model):
        """For a no-grad pass through the policy itself: no gradient checkpointing, and for a PEFT policy without a
        separate reference, its reference adapter (or no adapter)."""
        if model is not self.model and self.accelerator.unwrap_model(model) is not self.model:
            yield
            return
        with checkpointing_disabled(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model):
                with reference_adapter(self.accelerator.unwrap_model(self.model)):
                    yield
            else:
                yield

    def precompute_reference(self) -> None:
        """precompute_ref_log_probs: the train and eval datasets get their reference columns before training."""
        args = self.args
        batch_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
        self.train_dataset = self._with_reference_columns(self.train_dataset, "train", batch_size)
        if self.eval_dataset is not None:
            self.eval_dataset = self._precompute_eval(self.eval_dataset)

    def _precompute_eval(self, eval_dataset):
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
        if isinstance(eval_dataset, dict):
            return {name: self._with_reference_columns(ds, name, batch_size) for name, ds in eval_dataset.items()}
        return self._with_reference_columns(eval_dataset, "eval", batch_size)

    def _with_reference_columns(self, dataset, name: str, batch_size: int):
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"precompute_ref_log_probs=True needs a map-style Dataset, but the {name} dataset is "
                f"{type(dataset).__name__}; use a Dataset or set precompute_ref_log_probs=False"
            )
        if all(column in dataset.column_names for column in self.reference_columns):
            return dataset
        loader = DataLoader(
            dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False,
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
        )  # fmt: skip
        columns = {column: [] for column in self.reference_columns}
        with self.reference_pass_model() as model:
            for batch in self.accelerator.prepare(loader):
                values = [v for v in self.compute_ref_log_probs(model, batch) if v is not None]
                for column, value in zip(columns, self.accelerator.gather_for_metrics(values)):
                    columns[column].append(value.float().cpu())
        for column, values in columns.items():
            if values:
                dataset = dataset.remove_columns(column) if column in dataset.column_names else dataset
                dataset = dataset.add_column(column, torch.cat(values).tolist())
        return dataset

    # ---- evaluation ----

    def _sum_over_processes(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather_for_metrics(tensor).sum()

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss (and metrics) of the batch; logits only when compute_metrics needs them."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            if prediction_loss_only:
                return self.compute_loss(model, inputs), None, None
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        return loss, outputs.logits, inputs["input_ids"]

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """transformers.Trainer.evaluate, preparing (and, with precompute_ref_log_probs, scoring under the reference)
        a dataset passed here as __init__ does for eval_dataset."""
        if eval_dataset is None or isinstance(eval_dataset, str):
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        reference_gone = self.ref_model is None and not is_peft_model(self.model) and self.state.global_step > 0
        if self.precompute_ref_logps and reference_gone:
            raise ValueError(
                "evaluate() got a new dataset after training started, with precompute_ref_log_probs=True and no "
                "ref_model: the reference (the initial model) is gone. Pass it as eval_dataset at initialization, "
                "give a ref_model, or set precompute_ref_log_probs=False"
            )
        eval_dataset = self.prepare_eval_datasets(eval_dataset, self.processing_class, self.args)
        if self.precompute_ref_logps:
            eval_dataset = self._precompute_eval(eval_dataset)
        if not isinstance(eval_dataset, dict):
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        metrics = {}
        for name, dataset in eval_dataset.items():
            metrics.update(
                super().evaluate(dataset, ignore_keys=ignore_keys, metric_key_prefix=f"{metric_key_prefix}_{name}")
            )
        return metrics


def add_reference_adapter(model) -> None:
    """A PEFT model with a trained adapter: its frozen copy "ref" becomes the reference policy (as TRL does)."""
    config = model.peft_config["default"]
    model.add_adapter("ref", config)
    for name, param in model.named_parameters():
        if ".default." in name:
            model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)


@contextlib.contextmanager
def reference_adapter(peft_model):
    """The PEFT model as its reference inside the block: its "ref" adapter, or no adapter at all."""
    if "ref" not in peft_model.peft_config:
        with peft_model.disable_adapter():
            yield
        return
    previous = peft_model.active_adapter
    peft_model.set_adapter("ref")
    try:
        yield
    finally:
        peft_model.set_adapter(previous)
