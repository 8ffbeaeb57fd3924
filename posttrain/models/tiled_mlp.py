"""Tiled MLP: each decoder layer's MLP runs over tiles of tokens, and backward recomputes it tile by tile.

At long sequence lengths the MLP's [T, intermediate] activations (gate, up, act(gate), their product: each
intermediate / hidden = 3-6x the size of the layer's input) dominate a layer's memory. Tiled (the ALST paper's
TiledMLP, also in DeepSpeed and Liger), a layer saves only its MLP input for backward, and no more than one tile of
intermediates exists at a time, in forward or backward; the price is one more MLP forward per step than untiled,
with gradient checkpointing or without. The MLP is per-token, so tiling the flattened tokens (batch rows and packed sequences alike) changes
nothing but the order of the parameter gradients' sums, which are accumulated in float32.

Unlike DeepSpeed's and Liger's Functions, the parameters are inputs of the autograd Function and their gradients
its outputs: `torch.autograd.grad`, DDP's once-per-step gradient hooks and PEFT's adapters see an ordinary graph.
"""

import contextlib
import types

import torch
from transformers.models.llama.modeling_llama import LlamaMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

from .offloading import no_activation_offloading

# MLPs whose forward is per-token down(act(gate(x)) * up(x)); a PEFT LoRA on their projections is fine (the tile
# forward calls the projections as modules), a Mixture of Experts is not (its routing sees the whole batch)
SUPPORTED_MLPS = (LlamaMLP, Qwen2MLP, Qwen3MLP)

_TILE = "_posttrain_tile_tokens"
_UNTILED = "_posttrain_untiled_forward"  # an instance-level forward in place before tiling (accelerate's hooks)


class TiledMLPFunction(torch.autograd.Function):
    """`mlp_forward` over `x`'s tokens, `tile_tokens` at a time; backward recomputes each tile and differentiates it.

    x: [..., hidden], any float dtype (the leading dimensions are flattened into tokens). mlp_forward maps
    [tokens, hidden] to [tokens, out] token by token (module's own forward, or the one before tiling). params: the
    module's parameters that require grad, in `module.parameters()` order; their gradients are summed over tiles in
    float32 (at least) and returned in their dtype. Returns [..., out].

    Example:
        >>> mlp = model.model.layers[0].mlp
        >>> out = TiledMLPFunction.apply(x, mlp, mlp.forward, 1024, *[p for p in mlp.parameters() if p.requires_grad])
    """

    @staticmethod
    def forward(ctx, x, module, mlp_forward, tile_tokens, *params):
        ctx.module, ctx.mlp_forward, ctx.tile_tokens = module, mlp_forward, tile_tokens
        ctx.rng = _RngState(x.device)
        ctx.autocast = _AutocastState(x.device)
        ctx.save_for_backward(x)
        # Not saved tensors: backward recomputes with the module's parameters themselves (checkpointing's recompute
        # would hand back detached copies), and these references only check that they are still the same
        ctx.params = params
        rows = x.reshape(-1, x.shape[-1])
        first = mlp_forward(rows[:tile_tokens])
        out = first.new_empty((rows.shape[0], first.shape[-1]))
        out[: first.shape[0]] = first
        for start in range(tile_tokens, rows.shape[0], tile_tokens):
            out[start : start + tile_tokens] = mlp_forward(rows[start : start + tile_tokens])
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        (x,), params = ctx.saved_tensors, ctx.params
        _check_same_parameters(ctx.module, params)
        need_x = ctx.needs_input_grad[0]
        wanted = [i for i, need in enumerate(ctx.needs_input_grad[4:]) if need]
        rows = x.detach().reshape(-1, x.shape[-1])
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = torch.empty_like(rows) if need_x else None
        grad_params = [None] * len(params)
        # Replaying the forward's random state makes dropout (a LoRA's) draw the same masks, tile after tile. A tile's
        # intermediates are used at once: never offloaded, even when backward runs under activation offloading
        with ctx.rng.replayed(), ctx.autocast.restored(), torch.enable_grad(), no_activation_offloading():
            for start in range(0, rows.shape[0], ctx.tile_tokens):
                stop = min(start + ctx.tile_tokens, rows.shape[0])
                tile = rows[start:stop].requires_grad_(need_x)
                inputs = [params[i] for i in wanted] + ([tile] if need_x else [])
                grads = torch.autograd.grad(ctx.mlp_forward(tile), inputs, grad_rows[start:stop], allow_unused=True)
                for i, grad in zip(wanted, grads):
                    grad_params[i] = _add_fp32(grad_params[i], grad)
                if need_x:
                    grad_x[start:stop] = grads[-1]
        grad_params = [g if g is None else g.to(p.dtype) for g, p in zip(grad_params, params)]
        return grad_x.view_as(x) if need_x else None, None, None, None, *grad_params


def _add_fp32(total, grad):
    """total + grad, summed in float32 at least (float64 stays float64)."""
    if grad is None:
        return total
    if total is None:
        return grad.to(torch.promote_types(grad.dtype, torch.float32))
    return total.add_(grad)


def _check_same_parameters(module, saved):
    current = [p for p in module.parameters() if p.requires_grad]
    if len(current) != len(saved) or any(a is not b for a, b in zip(current, saved)):
        raise RuntimeError(
            f"{type(module).__name__}'s trainable parameters changed between forward and backward: the tiled MLP "
            "recomputes with the current ones and would return gradients for the old"
        )


class _RngState:
    """The CPU's and (for a CUDA input) the device's generator state, to replay in backward."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replayed(self):
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


class _AutocastState:
    """Autocast as the forward ran (backward runs outside it), for the input's device and for the CPU."""

    def __init__(self, device: torch.device):
        self.states = {
            kind: (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in {device.type, "cpu"}
        }

    @contextlib.contextmanager
    def restored(self):
        with contextlib.ExitStack() as stack:
            for kind, (enabled, dtype) in self.states.items():
                stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))
            yield


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    untiled = self.__dict__[_UNTILED] or types.MethodType(type(self).forward, self)
    if x.numel() == 0:
        return untiled(x)
    params = [p for p in self.parameters() if p.requires_grad]
    return TiledMLPFunction.apply(x, self, untiled, getattr(self, _TILE), *params)


def _check_not_zero3():
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        # The Function's parameter inputs would be ZeRO-3's empty partitions, and its gradients full-sized
        raise NotImplementedError("tiled_mlp does not support DeepSpeed ZeRO-3 yet; use ZeRO-2 or FSDP2")


def _decoder_mlps(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, mlp) of every decoder layer: a module with both `self_attn` and `mlp` (transformers' convention)."""
    return [
        (f"{name}.mlp", layer.mlp)
        for name, layer in model.named_modules()
        if isinstance(getattr(layer, "mlp", None), torch.nn.Module) and hasattr(layer, "self_attn")
    ]


def apply_tiled_mlp(model: torch.nn.Module, tile_tokens: int | None = None) -> int:
    """Run every decoder layer's MLP over tiles of `tile_tokens` tokens, recomputed tile by tile in backward.

    Outputs and gradients are those of the untiled model (up to float rounding in the parameter gradients' sums).
    Works before or after PEFT wrapping (LoRA on the MLP projections included) and with gradient checkpointing;
    the state dict does not change. Calling it again changes the tile size; `remove_tiled_mlp` undoes it.

    Args:
        model: a transformers causal LM (or its PEFT wrapper) whose decoder layers' MLPs are LlamaMLP, Qwen2MLP or
            Qwen3MLP.
        tile_tokens: tokens per tile (batch rows and packed sequences are flattened first). Default: the hidden size
            (ALST's choice: a tile's [tile, intermediate] activations are then about the size of one MLP weight).

    Returns:
        The number of MLPs tiled.

    Raises:
        ValueError: no decoder layer found, or tile_tokens < 1.
        TypeError: a decoder layer's MLP is of another class.
        NotImplementedError: under DeepSpeed ZeRO-3.

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")
        >>> apply_tiled_mlp(model, tile_tokens=4096)
        24
    """
    if tile_tokens is not None and (not isinstance(tile_tokens, int) or tile_tokens < 1):
        raise ValueError(f"tile_tokens must be a positive integer, got {tile_tokens!r}")
    _check_not_zero3()
    mlps = _decoder_mlps(model)
    if not mlps:
        raise ValueError(
            f"tiled_mlp found no decoder layer (a module with `self_attn` and `mlp`) in {type(model).__name__}"
        )
    for name, mlp in mlps:
        if not isinstance(mlp, SUPPORTED_MLPS):
            supported = ", ".join(cls.__name__ for cls in SUPPORTED_MLPS)
            raise TypeError(f"tiled_mlp supports the MLPs {supported}; {name} is a {type(mlp).__name__}")
    remove_tiled_mlp(model)
    for _, mlp in mlps:
        setattr(mlp, _TILE, tile_tokens or mlp.hidden_size)
        setattr(mlp, _UNTILED, mlp.__dict__.get("forward"))
        # Bound to the module, so a deepcopy of the model (a reference model) runs its own copy
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)


def remove_tiled_mlp(model: torch.nn.Module) -> int:
    """Undo `apply_tiled_mlp`: every MLP runs its forward as before. Returns how many were tiled.

    Example:
        >>> remove_tiled_mlp(model)
        24
    """
    tiled = [mlp for _, mlp in _decoder_mlps(model) if _UNTILED in mlp.__dict__]
    for mlp in tiled:
        untiled = mlp.__dict__.pop(_UNTILED)
        del mlp.__dict__[_TILE]
        if untiled is None:
            del mlp.forward
        else:
            mlp.forward = untiled
    return len(tiled)
