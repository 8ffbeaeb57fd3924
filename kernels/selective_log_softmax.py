"""Log-softmax of materialized logits, picked at the targets (and the entropy): one read of the logits forward, one
read and one write backward. Memory-bound: each program streams whole rows with wide loads and keeps fp32 statistics.
"""

import torch
import triton
import triton.language as tl

from ._common import divide_by_temperature, interpreting


def _fwd_block(V: int) -> int:
    # 16-byte loads for every lane at bf16 need 8 elements per thread: 4096 columns over 8 warps
    return min(triton.next_power_of_2(V), 1024 if interpreting() else 4096)


@triton.jit
def _selective_log_softmax_fwd_kernel(
    logits_ptr,
    tgt_ptr,
    logprob_ptr,
    entropy_ptr,
    max_ptr,
    log_sum_ptr,
    V,
    stride_row,
    temperature,
    ignore_index,
    SCALED: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)  # per-lane statistics, reduced once at the end
    s = tl.zeros((BLOCK_V,), tl.float32)
    ent = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        z = divide_by_temperature(x, temperature, SCALED)
        m_new = tl.maximum(m, z)
        # lanes that have only seen padding keep m = -inf; exp(-inf - -inf) would be NaN
        alpha = tl.where(m_new == float("-inf"), 0.0, tl.exp(m - m_new))
        e = tl.where(m_new == float("-inf"), 0.0, tl.exp(z - m_new))
        if HAS_ENTROPY:
            rebased = ent + tl.where(s > 0, (m - m_new) * s, 0.0)
            ent = alpha * rebased + tl.where(e > 0, e * (z - m_new), 0.0)
        s = alpha * s + e
        m = m_new
    row_max = tl.max(m, axis=0)
    scale = tl.where(s > 0, tl.exp(m - row_max), 0.0)
    total = tl.sum(s * scale, axis=0)
    log_total = tl.log(total)
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    tgt_z = divide_by_temperature(tl.load(row_ptr + tl.where(valid, tgt, 0)).to(tl.float32), temperature, SCALED)
    # logsumexp = row_max + log_total, kept as two numbers: at |z| ~ 1e3 their fp32 sum would lose the digits that
    # the backward's z - logsumexp needs
    tl.store(max_ptr + row, row_max)
    tl.store(log_sum_ptr + row, log_total)
    tl.store(logprob_ptr + row, tl.where(valid, tgt_z - row_max - log_total, 0.0))
    if HAS_ENTROPY:
        # sum_v p_v (z_v - row_max), rebasing every lane's statistics from its own max to the row's
        shifted = tl.sum(scale * (ent + tl.where(s > 0, (m - row_max) * s, 0.0)), axis=0) / total
        tl.store(entropy_ptr + row, tl.where(valid, log_total - shifted, 0.0))


@triton.jit
def _selective_log_softmax_bwd_kernel(
    logits_ptr,
    tgt_ptr,
    max_ptr,
    log_sum_ptr,
    ent_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    grad_logits_ptr,
    V,
    stride_row,
    stride_grad_row,
    temperature,
    ignore_index,
    SCALED: tl.constexpr,
    HAS_GRAD_LOGPROB: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=0.0).to(tl.float32)
    z = divide_by_temperature(x, temperature, SCALED)
    tgt = tl.load(tgt_ptr + row)
    valid = tgt != ignore_index
    log_p = (z - tl.load(max_ptr + row)) - tl.load(log_sum_ptr + row)
    p = tl.exp(log_p)
    grad = tl.zeros((BLOCK_V,), tl.float32)
    if HAS_GRAD_LOGPROB:
        g = tl.where(valid, tl.load(grad_logprob_ptr + row), 0.0)
        grad += g * ((offs == tgt).to(tl.float32) - p)
    if HAS_GRAD_ENTROPY:
        g = tl.where(valid, tl.load(grad_entropy_ptr + row), 0.0)
        grad -= g * p * (log_p + tl.load(ent_ptr + row))
    grad = divide_by_temperature(grad, temperature, SCALED)
    tl.store(grad_logits_ptr + row * stride_grad_row + offs, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def selective_log_softmax_fwd(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, with_entropy: bool
) -> dict[str, torch.Tensor]:
    """logits [N, V] (last stride 1), targets [N] int.

    Returns float32 [N] "logprob", maybe "entropy", and "lse": [2, N], each row's logsumexp as (max, log-sum), which
    the backward takes.
    """
    N, V = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    out = {"logprob": torch.empty(N, **f32), "lse": torch.empty((2, N), **f32)}
    if with_entropy:
        out["entropy"] = torch.empty(N, **f32)
    _selective_log_softmax_fwd_kernel[(N,)](
        logits, targets, out["logprob"], out.get("entropy", out["logprob"]), out["lse"][0], out["lse"][1],
        V, logits.stride(0), temperature, ignore_index,
        SCALED=temperature != 1.0, HAS_ENTROPY=with_entropy, BLOCK_V=_fwd_block(V), num_warps=8,
    )  # fmt: skip
    return out


def selective_log_softmax_bwd(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Gradient of the logits [N, V] in their dtype; grad_* are contiguous float32 [N] or None."""
    N, V = logits.shape
    grad_logits = torch.empty((N, V), device=logits.device, dtype=logits.dtype)
    block = min(triton.next_power_of_2(V), 4096 if interpreting() else 2048)
    _selective_log_softmax_bwd_kernel[(N, triton.cdiv(V, block))](
        logits, targets, lse[0], lse[1], entropy if entropy is not None else lse,
        grad_logprob if grad_logprob is not None else lse, grad_entropy if grad_entropy is not None else lse,
        grad_logits, V, logits.stride(0), grad_logits.stride(0), temperature, ignore_index,
        SCALED=temperature != 1.0, HAS_GRAD_LOGPROB=grad_logprob is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_V=block, num_warps=8,
    )  # fmt: skip
    return grad_logits
