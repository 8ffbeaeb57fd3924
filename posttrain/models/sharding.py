"""Models under a distributed engine: parameters read outside their module's forward, and models used for inference.

DeepSpeed ZeRO-3 partitions every parameter and gathers it only inside its module's forward and backward hooks; the
fused head reads lm_head.weight without calling lm_head, so it gathers the weight itself (`gathered`). FSDP2 keeps
parameters as DTensors, gathered with `full_tensor()` (`full_tensor`). A reference model (no optimizer) is placed
by `prepare_for_inference` as TRL places it.
"""

import contextlib
import copy

import torch


def is_zero3_param(param) -> bool:
    """Whether `param` is a DeepSpeed ZeRO-3 parameter (partitioned across ranks, gathered on demand)."""
    return hasattr(param, "ds_id")


def zero3_partitioned(params) -> list[torch.nn.Parameter]:
    """The ZeRO-3 parameters among `params` that are not gathered now (None entries and repeats skipped, in order).

    A parameter already available is left alone: with tied embeddings the embedding's module may hold it gathered, and
    gathering and releasing it again would release it under that module.
    """
    zero3 = list({id(p): p for p in params if p is not None and is_zero3_param(p)}.values())
    if not zero3:
        return []
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return [param for param in zero3 if param.ds_status != ZeroParamStatus.AVAILABLE]


@contextlib.contextmanager
def gathered(*params, modifier_rank: int | None = None):
    """Inside the block, every ZeRO-3 parameter among `params` is whole on every rank; nothing happens for others.

    modifier_rank: the rank whose values every rank gets when the block ends (for writing into the parameters, as
    `deepspeed.zero.GatheredParameters`); None for reading only.

    Example:
        >>> with gathered(lm_head.weight, lm_head.bias):
        ...     logits = hidden @ lm_head.weight.T
    """
    partitioned = zero3_partitioned(params)
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def full_tensor(param):
    """An FSDP2 (DTensor) parameter gathered whole with `full_tensor()` (differentiable: its gradient is
    reduce-scattered back to the shards); any other tensor, or None, as it is."""
    return param.full_tensor() if param is not None and hasattr(param, "full_tensor") else param


def prepare_for_inference(model: torch.nn.Module, accelerator) -> torch.nn.Module:
    """`model` (without an optimizer: a reference model, or the policy before training) placed for no-grad forwards
    under the accelerator's engine, as TRL 1.16 places its reference model:

    - DeepSpeed: an engine without optimizer. ZeRO-3 keeps the model partitioned (gathered layer by layer in the
      forward, so it must run on every rank together); other stages hold it whole on each rank (stage 0).
    - FSDP2: `fully_shard` at the root (gathered whole for the forward); FSDP1: wrapped in FullyShardedDataParallel.
    - otherwise: `accelerator.prepare_model(model, evaluation_mode=True)` (device and mixed precision).

    Returns the model to call (a DeepSpeed engine, or `model` itself), in eval mode.
    """
    if accelerator.state.deepspeed_plugin is not None:
        import deepspeed

        engine, *_ = deepspeed.initialize(model=model, config=_inference_config(model, accelerator))
        engine.eval()
        return engine
    fsdp_plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp_plugin is not None and accelerator.is_fsdp2:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        fully_shard(
            model, reshard_after_forward=fsdp_plugin.reshard_after_forward, offload_policy=fsdp_plugin.cpu_offload,
            mp_policy=fsdp_plugin.mixed_precision_policy or MixedPrecisionPolicy(), mesh=_fsdp_mesh(accelerator),
        )  # fmt: skip
    elif fsdp_plugin is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp_plugin.set_auto_wrap_policy(model)
        model = FullyShardedDataParallel(
            model, sharding_strategy=fsdp_plugin.sharding_strategy, cpu_offload=fsdp_plugin.cpu_offload,
            auto_wrap_policy=fsdp_plugin.auto_wrap_policy, mixed_precision=fsdp_plugin.mixed_precision_policy,
            use_orig_params=fsdp_plugin.use_orig_params, device_id=accelerator.device,
        )  # fmt: skip
    else:
        model = accelerator.prepare_model(model, evaluation_mode=True)
    model.eval()
    return model


def _fsdp_mesh(accelerator):
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is None or accelerator.parallelism_config is None:
        return None
    return mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]


def _inference_config(model, accelerator) -> dict:
    """The training DeepSpeed config without what needs an optimizer; stages 1-2 become 0 (they only split optimizer
    states and gradients), and the sizes left "auto" get the values transformers gives them from the hidden size."""
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    hidden = _hidden_size(model)
    sizes = {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    return config


def _hidden_size(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None) or max(getattr(config, "hidden_sizes", [0]))
    if not hidden:
        raise ValueError(
            f"{type(model).__name__}'s config has no hidden_size: set reduce_bucket_size, stage3_prefetch_bucket_size "
            "and stage3_param_persistence_threshold in the DeepSpeed config instead of 'auto'"
        )
    return hidden


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s parameters and persistent buffers, each whole and on the CPU, on every rank: ZeRO-3 parameters are
    gathered one at a time (a collective: call it on every rank), FSDP2 DTensors through full_tensor()."""
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        with gathered(tensor):
            state[name] = full_tensor(tensor.detach()).cpu().clone()
    return state


@torch.no_grad()
def load_full_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors (as `full_state_dict` returns them, the same on every rank) into `model`'s parameters and
    buffers, ZeRO-3 partitions and FSDP2 shards included (a collective under ZeRO-3: call it on every rank)."""
    names = {}  # tied tensors (an LM head sharing the embedding) need one of their names only
    for name, tensor in model.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), (tensor, []))[1].append(name)
    missing = [aliases[0] for _, aliases in names.values() if not any(name in state for name in aliases)]
    if missing:
        raise KeyError(f"the state dict has no entry for {missing[:5]} ({len(missing)} tensors missing)")
    for tensor, aliases in names.values():
        with gathered(tensor, modifier_rank=0):
            _copy_whole(tensor, state[next(name for name in aliases if name in state)])


def _copy_whole(tensor: torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(tensor, torch.distributed.tensor.DTensor):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value.to(tensor.device, tensor.dtype), tensor.device_mesh, tensor.placements)
    tensor.copy_(value)
