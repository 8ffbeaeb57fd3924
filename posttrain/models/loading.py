"""Loading models and tokenizers the way TRL's trainers do, and the optional PEFT wrapping."""

import warnings
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM, PreTrainedModel

from posttrain._optional import require

DTYPES = ("auto", "bfloat16", "float16", "float32")


def create_model(model_id: str, model_init_kwargs: dict | None = None, architecture=AutoModelForCausalLM):
    """`architecture.from_pretrained(model_id, **model_init_kwargs)`, with TRL's conventions for the kwargs.

    `dtype` may be a torch.dtype or one of "auto", "bfloat16", "float16", "float32" (default "float32", as TRL);
    `device_map` defaults to None on CPU/MPS and "auto" elsewhere.

    Example:
        >>> model = create_model("Qwen/Qwen2-0.5B-Instruct", {"dtype": "bfloat16"})
    """
    kwargs = dict(model_init_kwargs or {})
    dtype = kwargs.get("dtype", "float32")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"model_init_kwargs['dtype'] {dtype!r} is not one of: {', '.join(DTYPES)}")
        kwargs["dtype"] = dtype if dtype == "auto" else getattr(torch, dtype)
    elif dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"model_init_kwargs['dtype'] must be a torch.dtype or a string, got {dtype!r}")
    if "device_map" not in kwargs:
        kwargs["device_map"] = None if PartialState().device.type in ("cpu", "mps") else "auto"
    check_local_path(model_id, "model")
    if "quantization_config" in kwargs:
        require("bitsandbytes", "model_init_kwargs['quantization_config']")
    try:
        return architecture.from_pretrained(model_id, **kwargs)
    except OSError as err:
        raise OSError(f"could not load a model from {model_id!r}: {err}") from err


def looks_like_path(name: str) -> bool:
    """A hub id is "name" or "owner/name"; anything else was meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_local_path(name: str, field_name: str) -> None:
    """A `name` meant as a local path must be an existing directory (the hub would say "Repo id must be in the form
    ..." instead)."""
    path = Path(name).expanduser()
    if path.is_file():
        raise OSError(f"{field_name} {name!r} is a file, not a directory: from_pretrained loads a saved directory")
    if not path.exists() and looks_like_path(name):
        raise OSError(f"{field_name} {name!r}: no such directory")


def resolve_model(model, model_init_kwargs: dict | None, field_name: str = "model") -> PreTrainedModel:
    """A model given as a hub id / local path is loaded; a PreTrainedModel is returned as is, and model_init_kwargs
    then do nothing, which (as in TRL) is a warning."""
    if isinstance(model, str):
        return create_model(model, model_init_kwargs)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{field_name} must be a model id, a local path or a PreTrainedModel, got {type(model).__name__}")
    if model_init_kwargs:
        warnings.warn(
            f"model_init_kwargs {sorted(model_init_kwargs)} are ignored: they are only used when {field_name} is a "
            f"string (a hub id or a path), and {field_name} is an already-built {type(model).__name__}",
            stacklevel=3,
        )
    return model


def load_processing_class(model: PreTrainedModel | str, **from_pretrained_kwargs):
    """The processing class saved with `model` (its name_or_path), loaded with AutoProcessor as TRL's trainers do: a
    tokenizer for a text model. from_pretrained_kwargs (e.g. revision, trust_remote_code, padding_side) go to
    AutoProcessor.from_pretrained."""
    from transformers import AutoProcessor

    source = model if isinstance(model, str) else model.config._name_or_path
    if not source:
        raise ValueError("processing_class was not given and the model has no name_or_path to load one from")
    return AutoProcessor.from_pretrained(source, **from_pretrained_kwargs)


def apply_peft(model: PreTrainedModel, peft_config, keep_adapter_dtype: bool = False):
    """Wrap `model` with the adapter described by `peft_config` (a peft.PeftConfig; peft must be installed: the `peft`
    extra). keep_adapter_dtype: create the adapter in the model's dtype instead of PEFT's float32 (ZeRO-3 gathers
    parameters into buffers of one dtype)."""
    if peft_config is None:
        return model
    require("peft", "peft_config")
    from peft import PeftConfig, get_peft_model

    if not isinstance(peft_config, PeftConfig):
        raise TypeError(f"peft_config must be a peft.PeftConfig (e.g. peft.LoraConfig), got {type(peft_config).__name__}")
    return get_peft_model(model, peft_config, autocast_adapter_dtype=not keep_adapter_dtype)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability in `model` to 0 (TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def trainer_model_kwargs(args, quantization_config=None) -> dict:
    """from_pretrained kwargs for a trainer's model given as a string: args.model_init_kwargs, plus the trainer's
    quantization_config, args.trust_remote_code, and device_map=None under DDP / DeepSpeed (every process holds the
    whole model; "auto" would spread one process's model over every GPU)."""
    kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ValueError("quantization_config is given both to the trainer and in args.model_init_kwargs")
        kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return kwargs
