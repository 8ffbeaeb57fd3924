"""Attention for padding-free (packed) batches.

Several sequences packed into one row, with position_ids restarting at 0 for each and no attention_mask, must never
attend across their boundaries. Every backend here isolates them:

- flash-attn installed, CUDA: transformers' "flash_attention_2" runs its varlen kernel from the position_ids.
- CUDA without flash-attn: torch's own varlen kernel (torch.nn.attention.varlen), registered with transformers as
  "posttrain_varlen".
- Elsewhere (CPU): "sdpa"; transformers detects the packed sequences from position_ids and builds a block-diagonal
  causal mask.
"""

import functools
import inspect
import math

import torch

from posttrain._optional import is_available

VARLEN_ATTENTION = "posttrain_varlen"
# Implementations that isolate packed sequences when given position_ids and no attention_mask
PACKING_SAFE = {"flash_attention_2", "flash_attention_3", "sdpa", "eager", "flex_attention", VARLEN_ATTENTION}


def padding_free_attn_implementation(device_type: str) -> str:
    """The attn_implementation that isolates packed sequences on `device_type` ("cuda", "cpu", ...).

    Example:
        >>> padding_free_attn_implementation("cpu")
        'sdpa'
    """
    if device_type != "cuda":
        return "sdpa"
    if is_available("flash_attn"):
        return "flash_attention_2"
    if _torch_varlen() is not None:
        register_varlen_attention()
        return VARLEN_ATTENTION
    return "sdpa"


def use_padding_free_attention(model: torch.nn.Module) -> str:
    """Switch `model` to the packing-safe attention for its device, if its current one is not; returns the name.

    A model already on flash attention keeps it. Raises if the model's attention cannot isolate packed sequences.
    """
    current = model.config._attn_implementation
    wanted = padding_free_attn_implementation(next(model.parameters()).device.type)
    if current in ("sdpa", "eager") and wanted != current:
        model.set_attn_implementation(wanted)
        return wanted
    if current not in PACKING_SAFE:
        raise ValueError(
            f"attn_implementation {current!r} is not known to isolate packed sequences; padding_free / packing need "
            f"one of: {', '.join(sorted(PACKING_SAFE))}"
        )
    return current


@functools.cache
def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _sequence_bounds(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    # A new sequence starts wherever the position does not continue the previous one (as transformers decides)
    pos = position_ids.reshape(-1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    cu = torch.cat([starts.nonzero().flatten(), pos.new_tensor([pos.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def varlen_attention_forward(
    module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs
):
    """transformers attention function over torch's varlen kernel, for one packed row (batch 1, no attention_mask).

    query [1, Hq, T, D], key/value [1, Hkv, T, D]; returns ([1, T, Hq, D], None). Other batches (generation with a
    padding mask) go to sdpa.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout:
        raise ValueError(f"{VARLEN_ATTENTION} attention does not support attention dropout (got {dropout})")
    varlen_attn = _torch_varlen()
    params = inspect.signature(varlen_attn).parameters
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    extra = {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    if "window_size" in params:
        extra["window_size"] = (sliding_window - 1, 0) if sliding_window else (-1, 0)
    else:
        if sliding_window:
            raise ValueError("this torch's varlen attention has no sliding window; install flash-attn or newer torch")
        extra["is_causal"] = True
    if scaling is not None and "scale" in params:
        extra["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling, q.shape[-1] ** -0.5):
        raise ValueError(f"this torch's varlen attention cannot scale by {scaling}; install flash-attn or newer torch")
    cu, max_len = _sequence_bounds(position_ids)
    out = varlen_attn(q, k, v, cu, cu, max_len, max_len, **extra)
    return out.unsqueeze(0), None


def _varlen_mask(*args, **kwargs):
    # Packed rows need no mask (the kernel takes sequence bounds); padded batches get sdpa's
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


@functools.cache
def register_varlen_attention() -> None:
    """Register torch's varlen attention with transformers under the name "posttrain_varlen" (once)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
