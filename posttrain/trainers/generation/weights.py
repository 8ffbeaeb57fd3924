"""The policy's weights as generation needs them under DeepSpeed ZeRO-3, FSDP and PEFT: gathered whole around
transformers' generate, or streamed one full parameter at a time, under the base checkpoint's names, into an engine
that holds its own copy (vLLM)."""

import contextlib
from collections.abc import Iterator

import torch
from accelerate.utils import is_peft_model

from posttrain._compat import checkpointing_disabled
from posttrain.models.sharding import full_tensor, gathered, is_zero3_param


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage accelerate runs (0 without DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else 0


def fsdp_version(accelerator) -> int | None:
    """1 or 2 under FSDP, else None."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return getattr(plugin, "fsdp_version", None) if plugin is not None else None


@contextlib.contextmanager
def model_for_generation(model, accelerator, *, gather_zero3: bool = True, checkpointing_kwargs: dict | None = None):
    """The unwrapped policy, ready for `generate`, under no_grad and without gradient checkpointing (TRL's
    unwrap_model_for_generation and summon_full_params around generation).

    `model` is the trainer's wrapped model (DeepSpeedEngine, FSDP, DDP or the model itself). Under ZeRO-3 with
    `gather_zero3` (TRL's ds3_gather_for_generation) every parameter is gathered for the whole generation, with
    DeepSpeed's module hooks off so that they do not release them layer by layer; without it the model generates
    sharded, fetching each layer's parameters at every step (slow, little memory). FSDP1 summons the root's full
    parameters; FSDP2 generates sharded (each layer unshards in its own forward).
    """
    unwrapped = accelerator.unwrap_model(model)
    with checkpointing_disabled(unwrapped, checkpointing_kwargs), torch.no_grad():
        if zero_stage(accelerator) == 3 and gather_zero3:
            with _zero3_gathered(model):
                yield unwrapped
        elif fsdp_version(accelerator) == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            with FullyShardedDataParallel.summon_full_params(model, recurse=False, writeback=False):
                yield unwrapped
        else:
            yield unwrapped


@contextlib.contextmanager
def _zero3_gathered(model):
    import deepspeed

    if getattr(model, "optimizer", None) is not None:
        # DeepSpeed's own helper: gathers every parameter and takes the engine's module hooks off meanwhile
        with deepspeed.runtime.zero.unwrap_model_for_generation(model):
            yield
    else:  # no engine yet (evaluation before training): no hooks to take off
        with gathered(*model.parameters()):
            yield


def engine_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for each weight of `model` (the trainer's model after accelerate's prepare), one at a time
    and under the name the base checkpoint gives it (the names vLLM's load_weights expects).

    Gathering is a collective: every process must run through the whole iterator, even those that send nothing. A
    PEFT model is merged for the walk (its adapters folded into the base weights, which are what the engine holds)
    and unmerged after; its adapter weights are not yielded. Under ZeRO-3 and FSDP each parameter is gathered alone,
    so the peak memory is one full parameter (FSDP1 also keeps the root unit's own), except with PEFT under ZeRO-3 or
    FSDP1, which gathers the whole model for the merge.

    Example:
        >>> engine.load_weights(engine_weights(model))
    """
    if is_peft_model(model):
        yield from _merged_peft_weights(model)
        return
    fsdp1_root = _fsdp1_root(model)
    if fsdp1_root is not None:
        yield from _fsdp1_weights(fsdp1_root)
        return
    for name, param in model.named_parameters():
        with _full(param) as tensor:
            yield _engine_name(name), tensor


def _merged_peft_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    with _whole(model):
        model.merge_adapter()
        try:
            for name, param in model.named_parameters():
                name = _peft_base_name(model, name)
                if name is not None:
                    with _full(param) as tensor:
                        yield name, tensor
        finally:
            model.unmerge_adapter()


def _whole(model):
    """The whole model gathered (merging an adapter needs the full base weights): ZeRO-3's GatheredParameters, or
    FSDP1's summon_full_params without writeback (the merge need not reach the shards); FSDP2 DTensors merge as
    they are."""
    if any(is_zero3_param(p) for p in model.parameters()):
        return gathered(*model.parameters())
    root = _fsdp1_root(model)
    if root is not None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(root, recurse=True, writeback=False)
    return contextlib.nullcontext()


def _peft_base_name(model, name: str) -> str | None:
    """A PEFT parameter's name in the base checkpoint, or None for the adapters themselves and the frozen originals
    of modules_to_save (the trained copy is what the engine gets)."""
    name = _engine_name(name).removeprefix("base_model.model.").replace(".base_layer", "")
    if model.prefix in name or "original_module" in name:
        return None
    return name.replace("modules_to_save.default.", "")


def _engine_name(name: str) -> str:
    # activation checkpointing and FSDP1 wrap modules under these attribute names
    return name.replace("_checkpoint_wrapped_module.", "").replace("_fsdp_wrapped_module.", "")


@contextlib.contextmanager
def _full(param):
    """The whole of `param`, without gradient: gathered under ZeRO-3 (inside an outer gather it is whole already),
    full_tensor() of an FSDP2 DTensor."""
    with gathered(param), torch.no_grad():
        yield full_tensor(param).detach()


def _fsdp1_root(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model if isinstance(model, FullyShardedDataParallel) else None


def _fsdp1_weights(root) -> Iterator[tuple[str, torch.Tensor]]:
    """FSDP1: children first, then each FSDP unit's own parameters with only that unit summoned (post-order keeps one
    unit whole at a time). The root stays summoned throughout: summoning it first also initializes FSDP, which a
    child unit cannot be summoned before (a sync precedes the first forward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(root, recurse=False, writeback=False):
        yield from _fsdp1_units(root, "", set(), is_root=True)


def _fsdp1_units(module, prefix: str, seen: set, *, is_root: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    for child_name, child in module.named_children():
        yield from _fsdp1_units(child, f"{prefix}{child_name}.", seen)
    if not isinstance(module, FullyShardedDataParallel):
        return
    summoned = (
        contextlib.nullcontext()
        if is_root
        else FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False)
    )
    with summoned:
        for name, param in module.named_parameters():
            name = _engine_name(prefix + name)
            if name not in seen:
                seen.add(name)
                yield name, param.data
