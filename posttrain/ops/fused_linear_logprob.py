"""Per-token log-probabilities (and entropy) straight from hidden states and the LM head, without [N, V] logits."""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._common import check_float, check_same_device, check_targets, check_temperature, map_row_chunks, resolve_impl

# Rows per chunk of the torch reference: bounds its [chunk, V] logits in forward and (recomputed) in backward.
REF_CHUNK_ROWS = 2048
# The per-token statistics return_stats can ask for (none of them carries a gradient)
STATS = ("mean_logit", "is_argmax", "log_sum_sq_probs")


class TokenLogprobs(NamedTuple):
    """What `fused_linear_logprob(..., return_stats=True)` returns; every field has the targets' shape.

    logprobs: float32 log p(target). entropy: float32, or None unless return_entropy. mean_logit: float32 mean over the
    vocabulary of the temperature-scaled logits. is_argmax: bool, whether the target is the (first) most likely token.
    log_sum_sq_probs: float32 log sum_v p_v^2 (WPO's normalizer). Rows whose target is ignore_index hold 0 / False.
    A statistic that return_stats did not ask for is None. Only logprobs and entropy carry gradients.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    mean_logit: torch.Tensor | None
    is_argmax: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor | None


def _ref_chunk(hidden, targets, weight, bias, temperature, ignore_index, with_entropy, stats):
    logits = F.linear(hidden, weight, bias)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_p = z.log_softmax(dim=-1)
    valid = targets != ignore_index
    picked = log_p.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
    outs = [torch.where(valid, picked, 0.0)]
    if with_entropy:
        outs.append(torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0))
    if "mean_logit" in stats:
        outs.append(torch.where(valid, z.mean(-1), 0.0))
    if "is_argmax" in stats:
        outs.append((z.argmax(-1) == targets) & valid)
    if "log_sum_sq_probs" in stats:
        outs.append(torch.where(valid, torch.logsumexp(2.0 * log_p, -1), 0.0))
    return tuple(outs)


def fused_linear_logprob_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    stats: tuple[str, ...] = (),
    chunk_rows: int = REF_CHUNK_ROWS,
) -> tuple[torch.Tensor, ...]:
    """Plain-PyTorch reference of `fused_linear_logprob` on 2-D inputs: the test oracle and the CPU fallback.

    Math runs in float32 (float64 for float64 inputs). Rows are processed `chunk_rows` at a time under activation
    checkpointing, so neither pass holds more than [chunk_rows, V] logits.

    Returns a tuple: logprobs, then entropy if return_entropy, then each of `stats` (a subset of STATS) in STATS order.
    """
    args = (weight, bias, temperature, ignore_index, return_entropy, tuple(stats))
    return map_row_chunks(_ref_chunk, (hidden, targets), args, chunk_rows)


class FusedLinearLogprobFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels (posttrain.kernels.fused_linear_logprob) on 2-D inputs.

    forward(hidden, weight, bias, targets, temperature, ignore_index, return_entropy, stats) returns
    (logprobs, entropy or None, mean_logit, is_argmax, log_sum_sq_probs (each None unless named in stats)); gradients
    flow from logprobs and entropy.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, ignore_index, return_entropy, stats):
        from posttrain.kernels.fused_linear_logprob import fused_linear_logprob_fwd

        out = fused_linear_logprob_fwd(hidden, weight, bias, targets, temperature, ignore_index, return_entropy, stats)
        ctx.save_for_backward(hidden, weight, bias, targets, out["lse"], out.get("entropy"))
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        # A gradient that never arrives (e.g. entropy only logged) stays None instead of a tensor of zeros
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(out[name] for name in stats))
        return out["logprob"], out.get("entropy"), *(out.get(name) for name in STATS)

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy, *_):
        from posttrain.kernels.fused_linear_logprob import fused_linear_logprob_bwd

        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if (grad_logprob is None and grad_entropy is None) or not any(needs):
            return (None,) * 8  # one per forward input
        grads = fused_linear_logprob_bwd(
            hidden, weight, bias, targets, lse, entropy,
            grad_logprob.float().contiguous() if grad_logprob is not None else None,
            grad_entropy.float().contiguous() if grad_entropy is not None else None,
            ctx.temperature, ctx.ignore_index, needs,
        )  # fmt: skip
        return (*grads, None, None, None, None, None)


def _check_inputs(hidden, weight, targets, bias, temperature, ignore_index):
    check_float("hidden", hidden)
    check_float("weight", weight, dim=2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension must match weight's second: hidden {tuple(hidden.shape)}, weight "
            f"{tuple(weight.shape)} ([V, H])"
        )
    if bias is not None:
        check_float("bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) to match weight")
    check_same_device(hidden=hidden, weight=weight, targets=targets, bias=bias)
    if not torch.is_autocast_enabled(hidden.device.type):
        dtypes = {"hidden": hidden.dtype, "weight": weight.dtype, **({"bias": bias.dtype} if bias is not None else {})}
        if len(set(dtypes.values())) > 1:
            listed = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
            raise TypeError(f"hidden, weight and bias must share a dtype (or run under autocast), got {listed}")
    check_temperature(temperature)
    check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index)


def requested_stats(return_stats) -> tuple[str, ...]:
    if return_stats is True:
        return STATS
    if not return_stats:
        return ()
    unknown = [name for name in return_stats if name not in STATS]
    if isinstance(return_stats, str) or unknown:
        raise ValueError(f"return_stats {return_stats!r} must be a bool or names among: {', '.join(STATS)}")
    return tuple(name for name in STATS if name in return_stats)


def fused_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    return_stats: bool | tuple[str, ...] = False,
    impl: str = "auto",
):
    """log p(target) under softmax((hidden @ weight.T + bias) / temperature), without materializing the logits.

    Args:
        hidden: [..., H] float32 / bfloat16 / float16, e.g. a model's last hidden states [B, T, H].
        weight: [V, H], the LM head's weight, same dtype as hidden (or both cast by an active autocast).
        targets: [...] int64 token ids in [0, V), or ignore_index for rows to skip.
        bias: optional [V].
        temperature: > 0; logits are divided by it before the softmax.
        ignore_index: target value whose rows get 0 (log-prob, entropy) and no gradient.
        return_entropy: also return the float32 entropy of each row's distribution (differentiable).
        return_stats: return a `TokenLogprobs` with per-token statistics as well: True for all of them, or the names
            wanted among "mean_logit", "is_argmax", "log_sum_sq_probs" (each costs a little in the kernel).
        impl: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton" or "torch".

    Returns:
        float32 logprobs shaped like targets; (logprobs, entropy) with return_entropy; a TokenLogprobs with
        return_stats. Gradients reach hidden, weight and bias in their own dtypes, from logprobs and entropy.

    Example:
        >>> hidden = torch.randn(4, 16, 64)                 # [B, T, H]
        >>> lm_head = torch.nn.Linear(64, 1000, bias=False)
        >>> labels = torch.randint(0, 1000, (4, 16))
        >>> logps = fused_linear_logprob(hidden, lm_head.weight, labels)   # [4, 16] float32
        >>> logps, entropy = fused_linear_logprob(hidden, lm_head.weight, labels, return_entropy=True)
        >>> fused_linear_logprob(hidden, lm_head.weight, labels, return_stats=("is_argmax",)).is_argmax  # accuracy
    """
    _check_inputs(hidden, weight, targets, bias, temperature, ignore_index)
    stats = requested_stats(return_stats)
    lead_shape = hidden.shape[:-1]
    hidden_2d, targets_2d = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    impl = "torch" if hidden.dtype == torch.float64 and impl == "auto" else impl
    impl = resolve_impl(impl, hidden.device)
    if impl == "torch" or hidden_2d.shape[0] == 0:
        outs = list(fused_linear_logprob_ref(
            hidden_2d, weight, targets_2d, bias=bias, temperature=temperature, ignore_index=ignore_index,
            return_entropy=return_entropy, stats=stats,
        ))  # fmt: skip
        logprobs = outs.pop(0)
        entropy = outs.pop(0) if return_entropy else None
        by_name = dict(zip(stats, outs))
    else:
        if hidden.dtype == torch.float64:
            raise TypeError("impl='triton' supports float32, bfloat16 and float16; hidden is float64 (use impl='torch')")
        hidden_2d, weight, bias = _autocast(hidden_2d, weight, bias)
        logprobs, entropy, *values = FusedLinearLogprobFunction.apply(
            hidden_2d, weight, bias, targets_2d, float(temperature), int(ignore_index), return_entropy, stats
        )
        by_name = dict(zip(STATS, values))
    logprobs = logprobs.view(lead_shape)
    entropy = entropy.view(lead_shape) if entropy is not None else None
    if stats:
        return TokenLogprobs(logprobs, entropy, *(_view(by_name.get(name), lead_shape) for name in STATS))
    return (logprobs, entropy) if return_entropy else logprobs


def _view(tensor, shape):
    return tensor.view(shape) if tensor is not None else None


def _autocast(hidden, weight, bias):
    # The kernels take one dtype; under autocast that is autocast's, as F.linear would use
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
