"""What every posttrain trainer shares on top of transformers.Trainer: one construction path, TRL's metric bookkeeping
and its gradient-accumulation contract.

A trainer's __init__ runs these steps in TRL's order and keeps only what is its own (data, loss, metrics, rollouts):

    args = self.resolve_args(model, args)             # default "<model name>-<SUFFIX>"; TrainingArguments converted
    check_train_dataset(train_dataset, args)
    model = self.load_model(model, args, quantization_config)  # seeded first
    processing_class = self.load_processing_class(model, processing_class, args)
    model = self.wrap_peft(model, peft_config, args)
    ...                                               # its datasets and collator
    super().__init__(...)
    self.finish_setup(args, entropy=True, ...)        # nn.DataParallel check, Liger guard, fused head, dropout
    self.ref_model = self.prepare_reference_model(...)  # the trainers that have one
"""

import contextlib
import copy
import dataclasses
import json
import os
import warnings
from collections import defaultdict
from typing import ClassVar

import torch
from accelerate.utils import is_peft_model, set_seed
from datasets import Dataset, IterableDataset
from transformers import (
    AutoModelForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from posttrain._compat import checkpointing_disabled, declare_loss_scaling
from posttrain._optional import require
from posttrain.models.lm_head import FusedHead, add_fused_logprob_head, fused_head_of
from posttrain.models.loading import (
    apply_peft,
    create_model,
    disable_dropout,
    load_processing_class,
    resolve_model,
    trainer_model_kwargs,
)
from posttrain.models.offloading import ActivationOffloading
from posttrain.models.sharding import (
    full_state_dict,
    full_tensor,
    gathered,
    is_zero3_param,
    load_full_state_dict,
    prepare_for_inference,
)
from posttrain.models.tiled_mlp import apply_tiled_mlp

logger = logging.get_logger(__name__)

REF_MODEL_FILE = "ref_model.safetensors"
TRAINER_STATE_FILE = "posttrain_state.json"


class PosttrainTrainer(Trainer):
    """transformers.Trainer with posttrain's construction path, TRL's metric bookkeeping and accumulation contract.

    Subclasses set `config_class` and `trainer_suffix`, build themselves with the steps in the module docstring, and
    append per-step values to `self._metrics[mode][name]` ("train" or "eval"); `log` averages them since the last log
    and merges them into the logged dict (prefixed "eval_" in evaluation), as TRL's trainers do.

    `loss_is_scaled_for_ga`: True when compute_loss already divides by the gradient-accumulation count (or normalizes
    by num_items_in_batch itself), False when Trainer must scale it, None to let Trainer decide.
    """

    config_class: ClassVar[type]
    trainer_suffix: ClassVar[str]
    # AutoProcessor.from_pretrained keywords for the default processing class (GRPO pads and truncates on the left)
    tokenizer_kwargs: ClassVar[dict] = {}
    # Whether a multimodal processor is accepted (its tokenizer then handles text data)
    accepts_processor: ClassVar[bool] = False
    # The transformers auto class a model given as a string is loaded with, and from_pretrained keywords it always gets
    model_architecture: ClassVar[type] = AutoModelForCausalLM
    model_init_overrides: ClassVar[dict] = {}
    # Whether the policy gets the fused log-prob head (not a reward model: it has no LM head)
    uses_fused_head: ClassVar[bool] = True
    # Attributes (JSON values) a resumed run continues from, saved with every checkpoint
    resumable_attributes: ClassVar[tuple[str, ...]] = ()
    loss_is_scaled_for_ga = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        declare_loss_scaling(self, self.loss_is_scaled_for_ga)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(values) / len(values) for key, values in self._metrics[mode].items() if values}
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()

    # ---- construction, in the order the module docstring gives ----

    @classmethod
    def resolve_args(cls, model, args):
        """`args` as the trainer's config: the default `<model name>-<SUFFIX>` output directory when None, a
        TrainingArguments (a TRL config included) converted field by field."""
        if args is None:
            return cls.config_class(f"{model_name(model)}-{cls.trainer_suffix}")
        if isinstance(args, cls.config_class):
            return args
        if not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a {cls.config_class.__name__} or TrainingArguments, got {type(args).__name__}")
        values = args.to_dict()
        values["hub_token"] = args.hub_token  # to_dict hides it
        # Another trainer's config shares field names with other meanings (loss_type): only TRL's config of the same
        # trainer carries its own fields over; any other carries TrainingArguments' fields
        same_kind = type(args).__name__ == cls.config_class.__name__
        known = _init_fields(cls.config_class if same_kind else TrainingArguments)
        defaults = cls.config_class.__dataclass_fields__
        dropped = sorted(
            key for key in set(values) - known if key not in defaults or values[key] != _default(defaults[key])
        )
        if dropped:
            warnings.warn(
                f"args is a {type(args).__name__}; its fields {dropped} are not carried over to "
                f"{cls.config_class.__name__} and are ignored",
                stacklevel=3,
            )
        return cls.config_class(**{key: value for key, value in values.items() if key in known})

    def load_model(self, model, args, quantization_config=None) -> PreTrainedModel:
        """The model, loaded from a hub id / path with args.model_init_kwargs (and the trainer's quantization_config),
        or the given instance (model_init_kwargs then do nothing, which warns, and a quantization_config is an error:
        it cannot quantize a model that is already built). Seeds with args.seed first: a new head (RewardTrainer's
        score) and, later, PEFT adapters initialize randomly."""
        set_seed(args.seed)
        self._model_revision = None
        if isinstance(model, str):
            kwargs = {**trainer_model_kwargs(args, quantization_config), **self.model_init_overrides}
            self._model_revision = kwargs.get("revision")
            return create_model(model, kwargs, architecture=self.model_architecture)
        if quantization_config is not None:
            raise ValueError(
                "quantization_config only applies when model is a hub id or a path, and this model is already built: "
                "pass the model as a string, or quantize it when you build it"
            )
        return resolve_model(model, args.model_init_kwargs)

    def load_processing_class(self, model, processing_class, args):
        """The processing class (default: the model's own, loaded as TRL does) and its tokenizer as `self._tokenizer`,
        with args.eos_token (where the config has it) and a pad token the model agrees on: args.pad_token, else the
        tokenizer's, else its eos token."""
        if processing_class is None:
            processing_class = load_processing_class(
                model, revision=self._model_revision, trust_remote_code=args.trust_remote_code, **self.tokenizer_kwargs
            )
        self._tokenizer = text_tokenizer(processing_class, type(self).__name__, self.accepts_processor)
        if getattr(args, "eos_token", None) is not None:
            set_eos_token(model, self._tokenizer, args.eos_token)
        set_pad_token(model, self._tokenizer, getattr(args, "pad_token", None))
        return processing_class

    def wrap_peft(self, model, peft_config, args):
        """Wrap `model` with the adapter `peft_config` describes (or keep a PeftModel as it is), then what every PEFT
        model needs: no adapter on the LM head, input gradients under checkpointing, QLoRA adapters in bf16."""
        if peft_config is not None:
            if is_peft_model(model):
                raise ValueError(
                    "model is already a PeftModel and peft_config was given too: merge and unload the adapter first, "
                    "or pass no peft_config"
                )
            model = apply_peft(model, peft_config, keep_adapter_dtype=_zero3(args) and not _is_quantized(model))
        if not is_peft_model(model):
            return model
        _check_peft_head(model)
        if _zero3(args) and args.gradient_checkpointing:
            # PEFT under ZeRO-3 needs reentrant checkpointing (as TRL 1.16 sets it; huggingface/trl#2514)
            kwargs = args.gradient_checkpointing_kwargs or {}
            if kwargs.get("use_reentrant") is False:
                warnings.warn(
                    "gradient_checkpointing_kwargs={'use_reentrant': False} is replaced by True: PEFT under DeepSpeed "
                    "ZeRO-3 needs reentrant checkpointing",
                    stacklevel=3,
                )
            args.gradient_checkpointing_kwargs = {**kwargs, "use_reentrant": True}
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        if _is_quantized(model):
            # QLoRA trains its adapters in bf16; the DoRA magnitude stays fp32 (its updates can underflow in bf16)
            for name, param in model.named_parameters():
                if param.requires_grad and "lora_magnitude_vector" not in name:
                    param.data = param.data.to(torch.bfloat16)
        return model

    def finish_setup(self, args, **head_options) -> None:
        """After Trainer.__init__: refuse nn.DataParallel, keep Liger off the LM head, install the fused log-prob head
        on the policy (`head_options` go to add_fused_logprob_head; none for a trainer without `uses_fused_head`), and
        apply what the config asks: no dropout, tiled MLPs, activation offloading (around every training step)."""
        if args.n_gpu > 1:
            raise ValueError(
                f"{type(self).__name__} does not support nn.DataParallel ({args.n_gpu} GPUs visible to one process): "
                "launch with `accelerate launch` or `torchrun`, or make one GPU visible with CUDA_VISIBLE_DEVICES"
            )
        if self.uses_fused_head:
            keep_liger_off_the_head(args)
        self.fused_head = self.install_fused_head(self.policy_lm, args, **head_options) if self.uses_fused_head else None
        if getattr(args, "disable_dropout", False):
            disable_dropout(self.model)
        if args.tiled_mlp:
            apply_tiled_mlp(self.policy_lm, tile_tokens=args.tiled_mlp_tile_tokens)
        self._offload_context = ActivationOffloading(self.model) if args.activation_offloading else None

    def training_step(self, *args, **kwargs):
        with self._offload_context or contextlib.nullcontext():
            return super().training_step(*args, **kwargs)

    @staticmethod
    def install_fused_head(model, args, **head_options) -> FusedHead:
        """The fused log-prob head on `model` (replacing one another trainer installed)."""
        return add_fused_logprob_head(model, use_fused_kernels=args.use_fused_kernels, replace=True, **head_options)

    @property
    def policy_lm(self) -> PreTrainedModel:
        """The policy's causal LM itself, without accelerate's or PEFT's wrappers (what carries the fused head)."""
        model = self.accelerator.unwrap_model(self.model)
        return model.get_base_model() if is_peft_model(model) else model

    # ---- the reference model (DPO, GRPO, ...) ----

    def create_reference_model(self, source, args, quantization_config=None) -> PreTrainedModel:
        """A frozen copy of the initial policy: loaded again from `source` when it is a hub id or a path (as TRL),
        with the policy's dtype and attention implementation unless model_init_kwargs say otherwise; else a deep copy
        of the policy's causal LM."""
        if isinstance(source, str):
            kwargs = trainer_model_kwargs(args, quantization_config)
            kwargs.setdefault("dtype", self.policy_lm.dtype)
            kwargs.setdefault("attn_implementation", self.policy_lm.config._attn_implementation)
            reference = create_model(source, kwargs)
        elif any(is_zero3_param(param) for param in self.policy_lm.parameters()):
            reference = _zero3_copy(self.policy_lm)
        else:
            reference = copy.deepcopy(self.policy_lm)
            head = fused_head_of(reference)
            if head is not None:
                head.remove()
        reference.eval()
        reference.requires_grad_(False)
        return reference

    def prepare_reference_model(self, reference, args, **head_options):
        """The reference model ready for training: fused head, dropout as configured, placed for inference under the
        accelerator's engine (`prepare_for_inference`: a DeepSpeed engine, partitioned under ZeRO-3; sharded under
        FSDP), and (args.sync_ref_model) mixed towards the policy every ref_model_sync_steps."""
        self.install_fused_head(reference, args, **head_options)
        if getattr(args, "disable_dropout", False):
            disable_dropout(reference)
        reference = prepare_for_inference(reference, self.accelerator)
        if getattr(args, "sync_ref_model", False):
            self.add_callback(SyncRefModelCallback(reference, self.accelerator))
        return reference

    @contextlib.contextmanager
    def reference_pass_model(self):
        """The model to compute reference log-probs with: the reference model, else the policy itself. Before
        training, DeepSpeed has not placed the policy yet (under ZeRO-3 its weights are partitioned with no hooks to
        gather them), so it is lent to an inference engine (`prepare_for_inference`) for the block, whose hooks are
        taken off after."""
        reference = getattr(self, "ref_model", None)
        if reference is not None:
            yield reference
        elif self.is_deepspeed_enabled and self.model_wrapped is self.model:
            engine = prepare_for_inference(self.model, self.accelerator)
            try:
                yield engine
            finally:
                engine.destroy()
        else:
            yield self.model

    # ---- what a checkpoint holds beyond Trainer's: the mixed reference model ----

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.save_extra_state(folder)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.load_extra_state(checkpoint)

    def save_extra_state(self, folder: str) -> None:
        """Write what resuming from `folder` needs beyond Trainer's own files (on every process: per-process state
        goes in files of its own). Subclasses extend it; base: the `resumable_attributes` and the mixed reference."""
        os.makedirs(folder, exist_ok=True)
        reference = getattr(self, "ref_model", None)
        synced = getattr(self.args, "sync_ref_model", False) and reference is not None
        # gathered on every process (ZeRO-3 partitions, FSDP shards), written by the main one
        reference_state = full_state_dict(self.accelerator.unwrap_model(reference)) if synced else None
        if not self.args.should_save:
            return
        with open(os.path.join(folder, TRAINER_STATE_FILE), "w") as f:
            json.dump({name: getattr(self, name) for name in self.resumable_attributes}, f)
        if reference_state is not None:
            from safetensors.torch import save_file

            save_file(reference_state, os.path.join(folder, REF_MODEL_FILE))

    def load_extra_state(self, checkpoint: str) -> None:
        """Read back what save_extra_state wrote. Subclasses extend it."""
        path = os.path.join(checkpoint, TRAINER_STATE_FILE)
        if os.path.exists(path):
            with open(path) as f:
                for name, value in json.load(f).items():
                    setattr(self, name, value)
        path = os.path.join(checkpoint, REF_MODEL_FILE)
        reference = getattr(self, "ref_model", None)
        if reference is not None and os.path.exists(path):
            from safetensors.torch import load_file

            load_full_state_dict(self.accelerator.unwrap_model(reference), load_file(path))


class SyncRefModelCallback(TrainerCallback):
    """TR-DPO's reference update: every `ref_model_sync_steps` optimizer steps, ref <- alpha * policy + (1 - alpha) *
    ref with alpha `ref_model_mixup_alpha` (parameters paired in order: the two must share their architecture)."""

    def __init__(self, ref_model: torch.nn.Module, accelerator):
        self.ref_model = ref_model
        self.accelerator = accelerator

    @staticmethod
    @torch.no_grad()
    def mix(policy: torch.nn.Module, ref_model: torch.nn.Module, alpha: float) -> None:
        """ref_model's parameters <- alpha * policy's + (1 - alpha) * ref_model's, in place, in ref_model's dtype.

        Under ZeRO-3 each pair is gathered in turn and every rank computes the same mix (rank 0's is kept); FSDP2
        shards mix shard by shard (a policy shard whose reference is whole is gathered first)."""
        for ref_param, param in zip(ref_model.parameters(), policy.parameters(), strict=True):
            with gathered(param), gathered(ref_param, modifier_rank=0):
                source = param if hasattr(ref_param, "full_tensor") else full_tensor(param)
                ref_param.mul_(1.0 - alpha).add_(source.to(ref_param.dtype), alpha=alpha)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % args.ref_model_sync_steps == 0:
            unwrap = self.accelerator.unwrap_model
            self.mix(unwrap(model), unwrap(self.ref_model), args.ref_model_mixup_alpha)


@contextlib.contextmanager
def no_grad_without_checkpointing(model, checkpointing_kwargs: dict | None = None):
    """torch.no_grad() with `model`'s gradient checkpointing switched off inside (and back on after).

    In train mode, checkpointing turns generate's KV cache off, and with reentrant checkpointing a no-grad forward
    warns that no input requires grad; inference needs neither.
    """
    with checkpointing_disabled(model, checkpointing_kwargs), torch.no_grad():
        yield


def model_name(model) -> str:
    """The last part of a model's hub id or path ("Qwen2-0.5B" for "Qwen/Qwen2-0.5B/"), "model" if it has none."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
    return name.rstrip("/").split("/")[-1] or "model"


def _init_fields(config_class) -> set[str]:
    return {field.name for field in dataclasses.fields(config_class) if field.init}


def _default(field):
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def check_train_dataset(train_dataset, args) -> None:
    """A train dataset is required and is a datasets Dataset or IterableDataset; for an IterableDataset accelerate's
    dispatch_batches is turned off (it would concatenate batches of different processes), as TRL does."""
    if train_dataset is None:
        raise ValueError("train_dataset is required")
    if isinstance(train_dataset, IterableDataset):
        if args.accelerator_config.dispatch_batches is True:
            logger.warning("dispatch_batches=True is turned off: an IterableDataset is read by every process itself")
        args.accelerator_config.dispatch_batches = False
    elif not isinstance(train_dataset, Dataset):
        raise TypeError(
            f"train_dataset must be a datasets.Dataset or IterableDataset, got {type(train_dataset).__name__}"
        )


def text_tokenizer(processing_class, trainer_name: str, accept_processor: bool) -> PreTrainedTokenizerBase:
    """The tokenizer of `processing_class`: itself, or a processor's own when the trainer accepts processors."""
    if isinstance(processing_class, ProcessorMixin):
        if accept_processor:
            return processing_class.tokenizer
        raise NotImplementedError(
            f"processing_class is a {type(processing_class).__name__} (a multimodal processor): posttrain's "
            f"{trainer_name} trains text-only models; pass the tokenizer"
        )
    if not isinstance(processing_class, PreTrainedTokenizerBase):
        raise TypeError(f"processing_class must be a tokenizer, got {type(processing_class).__name__}")
    return processing_class


def _check_in_vocab(tokenizer, field: str, token: str) -> None:
    if token not in tokenizer.get_vocab():
        raise ValueError(
            f"{field} {token!r} is not in the vocabulary of the processing class ({type(tokenizer).__name__}): "
            f"set {field} to one of its tokens"
        )


def set_eos_token(model, tokenizer, eos_token: str) -> None:
    """tokenizer.eos_token <- eos_token; the model's config gets its id and its generation config stops at it too
    (added to the eos ids it has, any of which ends generation)."""
    _check_in_vocab(tokenizer, "eos_token", eos_token)
    tokenizer.eos_token = eos_token
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    generation_config = getattr(model, "generation_config", None)  # a sequence classifier has none
    if generation_config is None:
        return
    current = generation_config.eos_token_id
    current = [] if current is None else [current] if isinstance(current, int) else list(current)
    if tokenizer.eos_token_id not in current:
        generation_config.eos_token_id = [tokenizer.eos_token_id, *current]


def set_pad_token(model, tokenizer, pad_token: str | None) -> None:
    """tokenizer.pad_token <- pad_token, else the tokenizer's own, else its eos token; the model's config and
    generation config get its id."""
    pad_token = pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad_token is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has neither a pad token nor an eos token: set pad_token in "
            "the config (where the trainer has it) or tokenizer.pad_token"
        )
    _check_in_vocab(tokenizer, "pad_token", pad_token)
    tokenizer.pad_token = pad_token
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def keep_liger_off_the_head(args) -> None:
    """TRL 1.16's deprecated use_liger_kernel: Liger's layer kernels may apply, but its fused linear cross entropy
    would replace the model's forward, which posttrain patches with the fused log-prob head."""
    if not args.use_liger_kernel:
        return
    warnings.warn(
        "use_liger_kernel=True is deprecated (as in TRL 1.16, removed in 2.0): use model_init_kwargs={'use_kernels': "
        "True}",
        FutureWarning,
        stacklevel=3,
    )
    require("liger_kernel", "use_liger_kernel=True")
    liger_config = args.liger_kernel_config or {}
    if liger_config.get("fused_linear_cross_entropy"):
        raise ValueError(
            "liger_kernel_config={'fused_linear_cross_entropy': True} would replace the model's forward, which "
            "posttrain patches with its fused log-prob head"
        )
    args.liger_kernel_config = {**liger_config, "fused_linear_cross_entropy": False}


def _check_peft_head(model) -> None:
    # The fused head reads lm_head.weight directly: an adapter there would never be trained
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise ValueError(
            "a PEFT adapter on lm_head is not supported: the log-probs are computed from lm_head.weight directly, so "
            "the adapter would never be trained; remove 'lm_head' from target_modules"
        )


def _is_quantized(model) -> bool:
    return getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)


def _zero3_copy(policy: PreTrainedModel) -> PreTrainedModel:
    """A copy of a causal LM whose parameters ZeRO-3 partitions (a deep copy would carry DeepSpeed's per-parameter
    state along): built again from its config, partitioned as it is built (its random initialization leaves the
    generators' states as they were), then filled from the policy one parameter at a time."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        reference = AutoModelForCausalLM.from_config(
            policy.config, dtype=policy.dtype, attn_implementation=policy.config._attn_implementation
        )
    SyncRefModelCallback.mix(policy, reference, alpha=1.0)
    return reference


def _zero3(args) -> bool:
    plugin = args.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


def router_aux_loss_setup(model, coef: float | None) -> tuple[float, bool]:
    """(the Mixture-of-Experts load-balancing loss weight, whether it is added to the loss), as TRL 1.16 decides:
    `coef`, or the architecture's own router_aux_loss_coef when None; a nonzero coef on a dense model is an error."""
    text_config = model.config.get_text_config()
    is_moe = hasattr(text_config, "output_router_logits")
    if coef and not is_moe:
        raise ValueError(
            f"router_aux_loss_coef={coef}, but {type(model).__name__} is not a Mixture-of-Experts model that returns "
            "router logits: there is no auxiliary loss to weight"
        )
    effective = getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef
    return effective, is_moe and effective != 0.0
