"""log_softmax(logits / T) picked at the targets, for callers that already hold the logits."""

import torch

from ._common import check_float, check_targets, check_temperature, map_row_chunks, resolve_impl

REF_CHUNK_ROWS = 2048


def _ref_chunk(logits, targets, temperature, ignore_index, with_entropy):
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_p = z.log_softmax(dim=-1)
    valid = targets != ignore_index
    picked = log_p.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
    outs = [torch.where(valid, picked, 0.0)]
    if with_entropy:
        outs.append(torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0))
    return tuple(outs)


def selective_log_softmax_ref(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_rows: int = REF_CHUNK_ROWS,
) -> tuple[torch.Tensor, ...]:
    """Plain-PyTorch reference of `selective_log_softmax` on logits [N, V], targets [N].

    float32 math (float64 for float64 logits), `chunk_rows` rows at a time under activation checkpointing.
    Returns (logprobs,) or (logprobs, entropy).
    """
    return map_row_chunks(_ref_chunk, (logits, targets), (temperature, ignore_index, return_entropy), chunk_rows)


class SelectiveLogSoftmaxFunction(torch.autograd.Function):
    """Autograd wrapper of posttrain.kernels.selective_log_softmax on logits [N, V] (last stride 1), targets [N].

    forward(logits, targets, temperature, ignore_index, return_entropy) -> (logprobs, entropy or None).
    """

    @staticmethod
    def forward(ctx, logits, targets, temperature, ignore_index, return_entropy):
        from posttrain.kernels.selective_log_softmax import selective_log_softmax_fwd

        out = selective_log_softmax_fwd(logits, targets, temperature, ignore_index, return_entropy)
        ctx.save_for_backward(logits, targets, out["lse"], out.get("entropy"))
        ctx.temperature = temperature
        ctx.ignore_index = ignore_index
        ctx.set_materialize_grads(False)
        return out["logprob"], out.get("entropy")

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        from posttrain.kernels.selective_log_softmax import selective_log_softmax_bwd

        logits, targets, lse, entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logprob is None and grad_entropy is None):
            return None, None, None, None, None
        grad_logits = selective_log_softmax_bwd(
            logits, targets, lse, entropy,
            grad_logprob.float().contiguous() if grad_logprob is not None else None,
            grad_entropy.float().contiguous() if grad_entropy is not None else None,
            ctx.temperature, ctx.ignore_index,
        )  # fmt: skip
        return grad_logits, None, None, None, None


def selective_log_softmax(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    impl: str = "auto",
):
    """log softmax(logits / temperature) at the targets, reading the logits once.

    Args:
        logits: [..., V] float32 / bfloat16 / float16.
        targets: [...] int64 in [0, V), or ignore_index (those rows get 0 and no gradient).
        temperature: > 0.
        return_entropy: also return the float32 entropy of each row (differentiable).
        impl: "auto" (the fastest available: Triton or the CUDA extension on CUDA, Triton under TRITON_INTERPRET=1,
            else torch), "triton", "cuda" (csrc/, when built) or "torch".

    Returns:
        float32 log-probs shaped like targets, or (logprobs, entropy). The logits' gradient comes back in their dtype.

    Example:
        >>> logits = torch.randn(2, 5, 1000)
        >>> targets = torch.randint(0, 1000, (2, 5))
        >>> selective_log_softmax(logits, targets).shape
        torch.Size([2, 5])
    """
    check_float("logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(logits.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"logits and targets must be on one device, got {logits.device} and {targets.device}")
    check_temperature(temperature)
    check_targets(targets, logits.shape[:-1], logits.shape[-1], ignore_index)
    lead_shape = logits.shape[:-1]
    logits_2d = logits.reshape(-1, logits.shape[-1])
    if logits_2d.stride(-1) != 1:
        logits_2d = logits_2d.contiguous()
    targets_1d = targets.reshape(-1)
    impl = "torch" if logits.dtype == torch.float64 and impl == "auto" else impl
    impl = resolve_impl(impl, logits.device, ("auto", "triton", "cuda", "torch"), op="selective_log_softmax")
    if impl == "torch" or logits_2d.shape[0] == 0:
        outs = selective_log_softmax_ref(
            logits_2d, targets_1d, temperature=temperature, ignore_index=ignore_index, return_entropy=return_entropy
        )
        logprobs, entropy = outs[0], outs[1] if return_entropy else None
    else:
        if logits.dtype == torch.float64:
            raise TypeError(f"impl={impl!r} supports float32, bfloat16 and float16; logits are float64 (use impl='torch')")
        if impl == "cuda":
            logprobs, entropy, _ = torch.ops.posttrain.selective_log_softmax_fwd(
                logits_2d, targets_1d.long().contiguous(), float(temperature), int(ignore_index), return_entropy
            )
            entropy = entropy if return_entropy else None
        else:
            logprobs, entropy = SelectiveLogSoftmaxFunction.apply(
                logits_2d, targets_1d, float(temperature), int(ignore_index), return_entropy
            )
    logprobs = logprobs.view(lead_shape)
    return (logprobs, entropy.view(lead_shape)) if return_entropy else logprobs
