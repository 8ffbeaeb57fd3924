"""TRL's distillation divergence (the generalized Jensen-Shannon divergence of its DistillationTrainer) between a
student's and a teacher's next-token distributions, straight from both models' hidden states and LM heads, without
[N, V] logits. The math, and why the JSD takes a second pass while the KLs do not, are in the module docstring of
posttrain.kernels.fused_linear_divergence."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._common import check_float, check_same_device, check_temperature, map_row_chunks, resolve_impl
from .fused_linear_logprob import REF_CHUNK_ROWS
from .fused_linear_loss import _Grads, _scaled

REDUCTIONS = ("mean", "sum", "none")
# Bound on one chunk's two [n, V] buffers together (the Triton path)
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024


class FusedDivergence(NamedTuple):
    """What `fused_linear_divergence` returns.

    loss: the divergence reduced as asked: a 0-dim tensor for "mean" / "sum", one value per row (the mask's shape,
    0 where the mask is False) for "none"; float32 (float64 for float64 inputs), differentiable w.r.t. the student's
    hidden, weight and bias. entropy: the student's entropy at the temperature per row (0 where the mask is False),
    detached: TRL's "entropy" metric is its mean over the counted rows.
    """

    loss: torch.Tensor
    entropy: torch.Tensor


class _Plan(NamedTuple):
    beta: float
    temperature: float
    reduction: str
    max_chunk_bytes: int
    dtype: torch.dtype  # the kernels' one input dtype: autocast's when active at the call, else the student's


# --- the torch reference ----------------------------------------------------------------------------------------------


def _log_probs(hidden, weight, bias, temperature, wide):
    # logits in the inputs' dtype, as F.linear gives them, then the softmax in `wide`
    return (F.linear(hidden, weight, bias).to(wide) / temperature).log_softmax(dim=-1)


def _divergence(log_p_s: torch.Tensor, log_p_t: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0.0:
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if beta == 1.0:
        return (log_p_s.exp() * (log_p_s - log_p_t)).sum(-1)
    log_m = torch.logaddexp(log_p_s + math.log1p(-beta), log_p_t + math.log(beta))
    return (beta * (log_p_t.exp() * (log_p_t - log_m)).sum(-1)
            + (1.0 - beta) * (log_p_s.exp() * (log_p_s - log_m)).sum(-1))  # fmt: skip


def _ref_chunk(s_hidden, t_hidden, s_weight, s_bias, t_weight, t_bias, beta, temperature):
    wide = torch.promote_types(torch.promote_types(s_hidden.dtype, t_hidden.dtype), torch.float32)
    log_p_s = _log_probs(s_hidden, s_weight, s_bias, temperature, wide)
    log_p_t = _log_probs(t_hidden, t_weight, t_bias, temperature, wide)
    entropy = -(log_p_s.exp() * log_p_s).sum(-1)
    return _divergence(log_p_s, log_p_t, beta), entropy.detach()


def fused_linear_divergence_ref(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_rows: int = REF_CHUNK_ROWS,
) -> FusedDivergence:
    """The plain-PyTorch path of `fused_linear_divergence` (same arguments and result): the test oracle, the CPU
    fallback and the benchmark baseline. Only the counted rows are projected, `chunk_rows` at a time under activation
    checkpointing (so neither pass holds more than [chunk_rows, V] logits per model); logits come from F.linear in the
    inputs' dtype, the softmax and the divergence run in float32 (float64 for float64 inputs), and autograd gives the
    student's gradients. The teacher's inputs are detached."""
    lead_shape, rows = _counted_rows(student_hidden, mask)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, rows)
    t_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, rows)
    teacher = tuple(t.detach() if t is not None else None for t in (teacher_weight, teacher_bias))
    args = (student_weight, student_bias, *teacher, float(beta), float(temperature))
    divergence, entropy = map_row_chunks(_ref_chunk, (s_hidden, t_hidden), args, chunk_rows)
    return _reduced(divergence, entropy, rows, lead_shape, reduction)


def _counted_rows(student_hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Size, torch.Tensor]:
    # int64 indices of the rows the mask counts (one host sync: the count decides the chunks and the mean)
    lead_shape = student_hidden.shape[:-1]
    if mask is None:
        return lead_shape, torch.arange(lead_shape.numel(), device=student_hidden.device)
    return lead_shape, (mask.reshape(-1) != 0).nonzero().squeeze(1)


def _reduced(divergence, entropy, rows, lead_shape, reduction) -> FusedDivergence:
    # divergence and entropy of the counted rows -> the reduction, and the entropy in the mask's shape
    full_entropy = entropy.new_zeros(lead_shape.numel()).index_copy(0, rows, entropy).view(lead_shape)
    if reduction == "none":
        loss = divergence.new_zeros(lead_shape.numel()).index_copy(0, rows, divergence).view(lead_shape)
    else:
        loss = divergence.sum()
        if reduction == "mean":
            loss = loss / max(rows.numel(), 1)
    return FusedDivergence(loss, full_entropy)


# --- the Triton path --------------------------------------------------------------------------------------------------


def _run(inputs: tuple, rows: torch.Tensor, plan: _Plan, row_weights: torch.Tensor | None, needs: tuple):
    """The divergence and entropy (float32) of the counted rows, and (dH, dW, dbias) of sum_i row_weights[i] *
    divergence_i (None where not needed), in the student's dtypes."""
    from posttrain.kernels.fused_linear_divergence import (
        JSD,
        divergence_buffers,
        divergence_mode,
        fused_linear_divergence_dlogits,
        fused_linear_divergence_fwd,
    )

    s_hidden, s_weight, s_bias = inputs[:3]
    dtypes = (s_hidden.dtype, s_weight.dtype, s_bias.dtype if s_bias is not None else None)
    # the plan's dtype, not autocast's state now: backward ("none") runs the forward's math again
    s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias = (t.to(plan.dtype) if t is not None else None
                                                              for t in inputs)  # fmt: skip
    track = any(needs)
    count, vocab = rows.numel(), s_weight.shape[0]
    f32 = {"device": s_hidden.device, "dtype": torch.float32}
    divergence, entropy = torch.empty(count, **f32), torch.empty(count, **f32)
    buffers = None
    chunk = max(count, 1)
    if track or divergence_mode(plan.beta) == JSD:
        chunk = max(1, min(count, plan.max_chunk_bytes // (2 * vocab * s_hidden.element_size())))
        buffers = divergence_buffers(chunk, vocab, s_hidden)
    starts = range(0, count, chunk)
    grads = _Grads(s_hidden, s_weight, dtypes, needs, len(starts)) if track else None
    with torch.autocast(s_hidden.device.type, enabled=False):
        for start in starts:
            span = slice(start, start + chunk)
            h_s, h_t = s_hidden.index_select(0, rows[span]), t_hidden.index_select(0, rows[span])
            out = fused_linear_divergence_fwd(h_s, s_weight, s_bias, h_t, t_weight, t_bias, plan.beta,
                                              plan.temperature, buffers)  # fmt: skip
            divergence[span], entropy[span] = out["divergence"], out["entropy"]
            if track:
                dlogits = fused_linear_divergence_dlogits(buffers, out, row_weights[span].contiguous(), plan.beta,
                                                          plan.temperature)  # fmt: skip
                grads.add(rows[span], dlogits, h_s, s_weight)
    return divergence, entropy, grads.result() if track else (None, None, None)


class FusedLinearDivergenceFunction(torch.autograd.Function):
    """forward(s_hidden [N, Hs], s_weight, s_bias, t_hidden [N, Ht], t_weight, t_bias, rows, plan) -> (loss, entropy
    [N]): rows are the int64 indices of the counted rows; only loss is differentiable, w.r.t. the student's inputs.

    "mean" / "sum": each row's weight in the loss is known, so forward computes dH, dW, dbias for grad_output = 1
    and backward only scales them: 4 GEMMs (both logits, dH, dW) where a recomputing backward takes 6. "none": forward
    computes the values; backward recomputes the logits with grad_output as the rows' weights.
    """

    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, rows, plan):
        inputs = (s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias)
        needs = tuple(ctx.needs_input_grad[:3])
        ctx.plan, ctx.needs = plan, needs
        lead_shape = torch.Size([s_hidden.shape[0]])
        if plan.reduction == "none":
            divergence, entropy, _ = _run(inputs, rows, plan, None, (False,) * 3)
            ctx.save_for_backward(*inputs, rows)
        else:
            scale = 1.0 / max(rows.numel(), 1) if plan.reduction == "mean" else 1.0
            weights = torch.full((rows.numel(),), scale, device=rows.device, dtype=torch.float32)
            divergence, entropy, grads = _run(inputs, rows, plan, weights, needs)
            ctx.save_for_backward(*grads)
        loss, entropy = _reduced(divergence, entropy, rows, lead_shape, plan.reduction)
        ctx.mark_non_differentiable(entropy)
        return loss, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_entropy):
        if ctx.plan.reduction == "none":
            *inputs, rows = ctx.saved_tensors
            weights = grad_loss.index_select(0, rows).float()
            grads = _run(tuple(inputs), rows, ctx.plan, weights, ctx.needs)[2]
        else:
            grads = tuple(_scaled(g, grad_loss) for g in ctx.saved_tensors)
        return (*grads, None, None, None, None, None)


# --- the public op ----------------------------------------------------------------------------------------------------


def _check_head(prefix: str, hidden, weight, bias) -> None:
    check_float(f"{prefix}_hidden", hidden)
    check_float(f"{prefix}_weight", weight, dim=2)
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}_hidden's last dimension must match {prefix}_weight's second: {prefix}_hidden "
            f"{tuple(hidden.shape)}, {prefix}_weight {tuple(weight.shape)} ([V, H])"
        )
    if bias is not None:
        check_float(f"{prefix}_bias", bias, dim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}_bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},) to match "
                             f"{prefix}_weight {tuple(weight.shape)}")  # fmt: skip
    if not torch.is_autocast_enabled(hidden.device.type):
        dtypes = {f"{prefix}_{name}": t.dtype for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))
                  if t is not None}  # fmt: skip
        if len(set(dtypes.values())) > 1:
            listed = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
            raise TypeError(
                f"{prefix}'s hidden, weight and bias must share a dtype (or run under autocast), got {listed}"
            )


def _check_arguments(s_hidden, s_weight, t_hidden, t_weight, mask, s_bias, t_bias, beta, temperature, reduction,
                     max_chunk_bytes) -> None:  # fmt: skip
    _check_head("student", s_hidden, s_weight, s_bias)
    _check_head("teacher", t_hidden, t_weight, t_bias)
    if s_weight.shape[0] != t_weight.shape[0]:
        raise ValueError(
            f"student and teacher must share a vocabulary: student_weight {tuple(s_weight.shape)} and teacher_weight "
            f"{tuple(t_weight.shape)} ([V, H]) have V = {s_weight.shape[0]} and {t_weight.shape[0]}"
        )
    if s_hidden.shape[:-1] != t_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(s_hidden.shape)} and teacher_hidden {tuple(t_hidden.shape)} must "
                         f"have the same leading (row) dimensions")  # fmt: skip
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.is_floating_point() or mask.is_complex():
            described = f"a {mask.dtype} tensor" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool (or integer 0/1) tensor, got {described}")
        if mask.shape != s_hidden.shape[:-1]:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(s_hidden.shape[:-1])} (the rows of "
                             f"student_hidden {tuple(s_hidden.shape)})")  # fmt: skip
    check_same_device(student_hidden=s_hidden, student_weight=s_weight, student_bias=s_bias, teacher_hidden=t_hidden,
                      teacher_weight=t_weight, teacher_bias=t_bias, mask=mask)  # fmt: skip
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1] (0: forward KL, 1: reverse KL, between: JSD), got {beta!r}")
    check_temperature(temperature)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of: {', '.join(REDUCTIONS)}")
    if isinstance(max_chunk_bytes, bool) or not isinstance(max_chunk_bytes, int) or max_chunk_bytes < 1:
        raise ValueError(f"max_chunk_bytes must be a positive int, got {max_chunk_bytes!r}")


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    reduction: str = "mean",
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    impl: str = "auto",
) -> FusedDivergence:
    """TRL 1.16 DistillationTrainer's divergence between the student's and the teacher's next-token distributions,
    softmax((hidden @ weight.T + bias) / temperature) for each model, over the full vocabulary, without materializing
    either model's [N, V] logits.

    beta = 0: forward KL(teacher || student); beta = 1: reverse KL(student || teacher); in between, the generalized
    JSD beta KL(teacher || m) + (1 - beta) KL(student || m) with m = (1 - beta) p_student + beta p_teacher. The
    temperature divides both models' logits (no T^2 factor, as TRL). Gradients reach the student's hidden, weight and
    bias only (in their own dtypes); the teacher's inputs are detached. Only the rows the mask counts are projected.

    Args:
        student_hidden: [..., Hs] float32 / bfloat16 / float16 (float64 with impl="torch"), e.g. [B, T, Hs].
        student_weight: [V, Hs], the student's LM head weight, in student_hidden's dtype (or under autocast).
        teacher_hidden: [..., Ht], the same rows (Ht may differ from Hs).
        teacher_weight: [V, Ht]; V must be the student's. Without autocast the Triton path casts the teacher's
            inputs to the student's dtype (cast a large teacher head once, beforehand, to skip that copy per call).
        mask: bool (or integer 0/1) tensor of the rows' shape [...]: the rows that count; None counts every row.
        beta: in [0, 1] (TRL's DistillationConfig defaults it to 1).
        temperature: > 0.
        student_bias, teacher_bias: optional [V].
        reduction: "mean" (sum over the counted rows / their number, 0 when there are none: TRL without
            num_items_in_batch), "sum" (divide it by num_items_in_batch for TRL's gradient-accumulation-correct
            loss) or "none" (per row).
        max_chunk_bytes: bound on the Triton path's two [n, V] buffers of one chunk of rows.
        impl: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton" or "torch".

    Returns:
        FusedDivergence(loss, entropy): see its docstring. "mean" / "sum" on the Triton path compute the gradients
        during the forward and hold dH [N, Hs], dW [V, Hs] (and dbias) until backward; "none" recomputes in backward.

    Example:
        >>> student, teacher = torch.nn.Linear(64, 1000, bias=False), torch.nn.Linear(96, 1000, bias=False)
        >>> h_s = torch.randn(4, 16, 64, requires_grad=True)      # [B, T, Hs]
        >>> h_t = torch.randn(4, 16, 96)                          # [B, T, Ht]
        >>> completion_mask = torch.rand(4, 16) > 0.2
        >>> out = fused_linear_divergence(h_s, student.weight, h_t, teacher.weight, completion_mask, beta=1.0)
        >>> out.loss.backward()                                   # h_s.grad, student.weight.grad
        >>> entropy = out.entropy[completion_mask].mean()         # TRL's "entropy" metric
    """
    _check_arguments(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, student_bias, teacher_bias,
                     beta, temperature, reduction, max_chunk_bytes)  # fmt: skip
    kwargs = {"beta": float(beta), "temperature": float(temperature), "student_bias": student_bias,
              "teacher_bias": teacher_bias, "reduction": reduction}  # fmt: skip
    float64 = torch.float64 in (student_hidden.dtype, teacher_hidden.dtype)
    impl = resolve_impl("torch" if float64 and impl == "auto" else impl, student_hidden.device)
    if impl == "torch":
        return fused_linear_divergence_ref(student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                                           **kwargs)  # fmt: skip
    if float64:
        raise TypeError("impl='triton' supports float32, bfloat16 and float16, not float64 inputs (use impl='torch')")
    lead_shape, rows = _counted_rows(student_hidden, mask)
    device_type = student_hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else student_hidden.dtype
    plan = _Plan(float(beta), float(temperature), reduction, max_chunk_bytes, dtype)
    s_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = (teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]), teacher_weight.detach(),
               teacher_bias.detach() if teacher_bias is not None else None)  # fmt: skip
    student = (s_hidden, student_weight, student_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in student):
        loss, entropy = FusedLinearDivergenceFunction.apply(*student, *teacher, rows, plan)
    else:
        divergence, entropy, _ = _run((*student, *teacher), rows, plan, None, (False,) * 3)
        loss, entropy = _reduced(divergence, entropy, rows, torch.Size([s_hidden.shape[0]]), reduction)
    return FusedDivergence(loss.view(lead_shape) if reduction == "none" else loss, entropy.view(lead_shape))
