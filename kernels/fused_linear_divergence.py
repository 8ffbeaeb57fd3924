"""Fused linear divergence: TRL's generalized Jensen-Shannon divergence between a student's and a teacher's next-token
distributions, straight from both models' hidden states and LM heads, one row chunk at a time.

Per row, with z_s = (h_s @ W_s.T + b_s) / T, z_t = (h_t @ W_t.T + b_t) / T, p = softmax(z), L = logsumexp(z):

    beta = 0:  KL(p_t || p_s) = sum_v p_t (z_t - z_s) - L_t + L_s
    beta = 1:  KL(p_s || p_t) = sum_v p_s (z_s - z_t) - L_s + L_t
    else:      beta KL(p_t || m) + (1 - beta) KL(p_s || m),  m = (1 - beta) p_s + beta p_t

Forward and reverse KL decompose: log p_t,v - log p_s,v = (z_t,v - z_s,v) - (L_t - L_s), averaged under p_t, and
    sum_v p_t (z_t - z_s) = exp(M_t - L_t) sum_v exp(z_t - M_t) (z_t - z_s)
is an online sum rebased on the teacher's running max M_t exactly as its normalizer is. So ONE pass over the vocabulary
gives both logsumexps and the divergence, from fp32 logits (reverse KL: the roles swapped). The mixture's
    log m_v = log((1 - beta) exp(z_s,v - L_s) + beta exp(z_t,v - L_t))
puts both final normalizers inside a nonlinearity: no such decomposition exists, and the JSD takes a SECOND pass, over
the chunk's buffers below (element-wise, no GEMM recomputed; its value then carries the buffers' rounding, one unit of
the inputs' dtype, where the KLs' carry fp32's).

Gradients w.r.t. z_s (student only; then / T for the raw logits), each subtracted KL the softmax's per-row centering:

    beta = 0:  p_s - p_t
    beta = 1:  p_s (log p_s - log p_t - KL(p_s || p_t))
    else:      (1 - beta) p_s (log p_s - log m - KL(p_s || m))      (the beta KL(p_t || m) term's share cancels)

1. `fused_linear_divergence_fwd`: a persistent flat loop (fused_linear_logprob's: items of BLOCK_N rows x one
   vocabulary split, all tiles' K steps in one loop so the next tile's loads overlap this tile's epilogue) in which a
   tile runs the student's K steps, then the teacher's, into one accumulator; the student's result moves to a second
   register tile when its steps end. The epilogue folds both into online statistics (both logsumexps, the student's
   entropy, the decomposed KL) and, when a gradient or the JSD is wanted, writes the chunk's two [n, V] buffers.
   A merge kernel combines the vocabulary splits; for the JSD a reduction kernel then reads the buffers.
2. `fused_linear_divergence_dlogits`: rewrites the student buffer in place as d(weighted divergence)/d(logits).
3. The caller multiplies it into dH and dW with cuBLAS (fp32 accumulation).

The buffers, in the inputs' dtype: the student's holds exp(z_s - t_s), t_s the tile's per-row max (fused_linear_loss's
choice: p_s keeps a relative error of one rounding, whatever the logit scale). The teacher's holds z_t - t_t, its log
relative to the tile max: reverse KL needs log p_t wherever p_s > 0, and exp(z_t - t_t) underflows there (fp16 below
e^-17). A rounding of x = t_t - z_t >= 0 is a relative error of x * eps in p_t, an absolute error of at most
x exp(-x) eps <= eps / e: no worse than the exponential's eps.
"""

import math

import torch
import triton
import triton.language as tl

from ._common import TiledKernel, divide_by_temperature, dot_precision, interpreting, persistent_programs
from .fused_linear_logprob import (
    INTERPRETER_TILE,
    _default_split_v,
    _item_span,
    _n_bucket,
    _persistent_grid,
    _scaled_logits,
    _tile,
    _tile_pointers,
)
from .fused_linear_loss import exp_buffer

# Divergences, as the kernels' MODE
FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
# Statistics per row and vocabulary split: student max, sum, entropy numerator; teacher max, sum; decomposed KL sum
_NUM_STATS = 6
# Elements per program of the element-wise kernels, and forward tiles per program of the JSD reduction
_ELEMENTS = 8192
_REDUCE_TILES = 16

# Two [BLOCK_N, BLOCK_V] fp32 tiles live through the epilogue (the student's and the teacher's logits), so the tiles are
# half fused_linear_logprob's 128x128 (which spills here). From the sm_90 compile report
# (tests/kernels/test_fused_linear_divergence_sm90.py), 0 spill bytes under every MODE with the buffers: bf16/fp16 (and
# tf32) on wgmma, two warpgroups; fp32 with IEEE dots on an FMA tile. BLOCK_N = 128 rather than 64 halves the
# re-reads of both weights. Under Triton 3.6 (the GPU image's) the forward KL with buffers spills 128 bytes a thread;
# the 64 x 64 candidate does not (under either), at a narrower MMA: for a timed sweep (POSTTRAIN_AUTOTUNE=1) to decide.
PINNED_16BIT = _tile(128, 64, 64, 8, 3)
PINNED_FP32 = _tile(64, 64, 32, 8, 3)
CANDIDATE_TILES = {
    "16bit": (PINNED_16BIT, _tile(64, 128, 64, 8, 3), _tile(128, 64, 64, 8, 4), _tile(64, 64, 64, 8, 3)),
    "fp32": (PINNED_FP32, _tile(32, 64, 32, 4, 3)),
}


def pinned_tile(dtype: torch.dtype) -> triton.Config:
    """The forward's tile for `dtype` inputs unless POSTTRAIN_AUTOTUNE=1 or the launcher is given `config`."""
    if interpreting():
        return INTERPRETER_TILE
    return PINNED_FP32 if dtype == torch.float32 else PINNED_16BIT


def divergence_mode(beta: float) -> int:
    """The kernels' MODE for `beta`: FORWARD_KL at 0, REVERSE_KL at 1, JSD between."""
    return FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else JSD


def _candidates(args: dict) -> tuple[triton.Config, ...]:
    if interpreting():
        return (INTERPRETER_TILE,)
    return CANDIDATE_TILES["fp32" if args["hs_ptr"].dtype == torch.float32 else "16bit"]


@triton.jit
def _fresh_stats(BLOCK_N: tl.constexpr):
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # student: running max of z_s
    s_s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z_s - m_s)
    ent = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z_s - m_s) (z_s - m_s)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # teacher: running max of z_t
    s_t = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z_t - m_t)
    cross = tl.zeros((BLOCK_N,), tl.float32)  # forward KL: sum exp(z_t - m_t) (z_t - z_s); reverse: roles swapped
    return m_s, s_s, ent, m_t, s_t, cross


@triton.jit
def _fold_pair(acc_s, acc_t, bs_ptr, bt_ptr, s_buf_ptr, t_buf_ptr, s_tile_max_ptr, t_tile_max_ptr, offs_n, v0, v_stop,
               N, V, stride_sb, stride_tb, m_s, s_s, ent, m_t, s_t, cross, temperature, HAS_S_BIAS: tl.constexpr,
               HAS_T_BIAS: tl.constexpr, SCALED: tl.constexpr, MODE: tl.constexpr, WRITE_BUFFERS: tl.constexpr,
               BLOCK_V: tl.constexpr):  # fmt: skip
    # Both heads' logits of columns [v0, v0 + BLOCK_V) (those < v_stop) folded into the running statistics. Each tile's
    # sums are taken relative to its own max t (one exponential per logit serves the buffer and the sums) and rebased
    # onto the new running max with exp(t - m_new).
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < v_stop
    cols = offs_v % V
    rows = offs_n.to(tl.int64)
    n_mask = offs_n < N
    tile = rows * tl.cdiv(V, BLOCK_V) + v0 // BLOCK_V
    # the student's tile first and the teacher's after: few [BLOCK_N, BLOCK_V] temporaries live at once (registers)
    z_s = tl.where(v_mask[None, :], _scaled_logits(acc_s, bs_ptr, cols, temperature, HAS_S_BIAS, SCALED), float("-inf"))
    t_s = tl.max(z_s, axis=1)
    e_s = tl.exp(z_s - t_s[:, None])  # 0 on masked columns
    if WRITE_BUFFERS:
        tl.store(s_buf_ptr + rows[:, None] * stride_sb + offs_v[None, :], e_s.to(s_buf_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & v_mask[None, :])  # fmt: skip
        tl.store(s_tile_max_ptr + tile, t_s, mask=n_mask)
    m_s_new = tl.maximum(m_s, t_s)
    alpha_s = tl.exp(m_s - m_s_new)
    beta_s = tl.exp(t_s - m_s_new)
    sum_s = tl.sum(e_s, axis=1)
    # moving the reference point from m_s to m_s_new shifts every (z_s - m_s) by (m_s - m_s_new); s_s = 0 at first
    rebased = ent + tl.where(s_s > 0, (m_s - m_s_new) * s_s, 0.0)
    tile_ent = tl.sum(tl.where(v_mask[None, :], e_s * (z_s - t_s[:, None]), 0.0), axis=1)
    ent = alpha_s * rebased + beta_s * (tile_ent + (t_s - m_s_new) * sum_s)
    s_s = alpha_s * s_s + beta_s * sum_s

    z_t = tl.where(v_mask[None, :], _scaled_logits(acc_t, bt_ptr, cols, temperature, HAS_T_BIAS, SCALED), float("-inf"))
    t_t = tl.max(z_t, axis=1)
    shifted_t = z_t - t_t[:, None]
    if WRITE_BUFFERS:
        tl.store(t_buf_ptr + rows[:, None] * stride_tb + offs_v[None, :], shifted_t.to(t_buf_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & v_mask[None, :])  # fmt: skip
        tl.store(t_tile_max_ptr + tile, t_t, mask=n_mask)
    e_t = tl.exp(shifted_t)
    m_t_new = tl.maximum(m_t, t_t)
    alpha_t = tl.exp(m_t - m_t_new)
    beta_t = tl.exp(t_t - m_t_new)
    s_t = alpha_t * s_t + beta_t * tl.sum(e_t, axis=1)
    if MODE == 0:
        cross = alpha_t * cross + beta_t * tl.sum(tl.where(v_mask[None, :], e_t * (z_t - z_s), 0.0), axis=1)
    if MODE == 1:
        cross = alpha_s * cross + beta_s * tl.sum(tl.where(v_mask[None, :], e_s * (z_s - z_t), 0.0), axis=1)
    return m_s_new, s_s, ent, m_t_new, s_t, cross


@triton.jit
def _store_stats(part_ptr, split, num_splits, offs_n, N, m_s, s_s, ent, m_t, s_t, cross):
    n_mask = offs_n < N
    stride = num_splits * N  # part is [_NUM_STATS, num_splits, N]
    ptrs = part_ptr + split * N + offs_n
    tl.store(ptrs, m_s, mask=n_mask)
    tl.store(ptrs + stride, s_s, mask=n_mask)
    tl.store(ptrs + 2 * stride, ent, mask=n_mask)
    tl.store(ptrs + 3 * stride, m_t, mask=n_mask)
    tl.store(ptrs + 4 * stride, s_t, mask=n_mask)
    tl.store(ptrs + 5 * stride, cross, mask=n_mask)


@triton.jit(do_not_specialize=["N", "N_BUCKET", "num_splits"])
def _fused_linear_divergence_fwd_kernel(
    hs_ptr,
    ws_ptr,
    bs_ptr,
    ht_ptr,
    wt_ptr,
    bt_ptr,
    s_buf_ptr,
    t_buf_ptr,
    s_tile_max_ptr,
    t_tile_max_ptr,
    part_ptr,
    N,
    V,
    KS,
    KT,
    N_BUCKET,
    num_splits,
    split_v,
    stride_hs_n,
    stride_hs_k,
    stride_ws_v,
    stride_ws_k,
    stride_ht_n,
    stride_ht_k,
    stride_wt_v,
    stride_wt_k,
    stride_sb,
    stride_tb,
    temperature,
    HAS_S_BIAS: tl.constexpr,
    HAS_T_BIAS: tl.constexpr,
    SCALED: tl.constexpr,
    MODE: tl.constexpr,
    WRITE_BUFFERS: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # A tile's steps: ks_steps of the student (hs @ ws.T), then kt_steps of the teacher, all through one tl.dot site so
    # the software pipeline sees a single stream of loads. The loader's state (the step the next loads are for) and the
    # epilogue's (the tile the accumulators hold) advance separately, as in fused_linear_logprob's forward.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    num_items = num_row_blocks * num_splits
    ks_steps = tl.cdiv(KS, BLOCK_K)
    k_steps = ks_steps + tl.cdiv(KT, BLOCK_K)
    steps = 0
    for item in range(pid, num_items, num_programs):
        _rb, _sp, v_start, v_stop = _item_span(item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
        steps += tl.cdiv(v_stop - v_start, BLOCK_V) * k_steps

    k = k_steps - 1
    item = pid - num_programs
    row0 = 0
    v = 0
    v_stop = 0
    e_item = pid
    row_block, split, e_v, e_v_stop = _item_span(pid, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    m_s, s_s, ent, m_t, s_t, cross = _fresh_stats(BLOCK_N)
    h_ptrs, w_ptrs = _tile_pointers(hs_ptr, ws_ptr, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_V), stride_hs_n,
                                    stride_hs_k, stride_ws_v, stride_ws_k, BLOCK_K)  # fmt: skip
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    acc_s = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for _step in range(steps):
        k = tl.where(k == k_steps - 1, 0, k + 1)
        student = k < ks_steps
        if k == 0:
            v += BLOCK_V
            if v >= v_stop:
                item += num_programs
                next_rows, _sp, v, v_stop = _item_span(item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
                row0 = next_rows * BLOCK_N
            h_ptrs, w_ptrs = _tile_pointers(hs_ptr, ws_ptr, (row0 + tl.arange(0, BLOCK_N)) % N,
                                            (v + tl.arange(0, BLOCK_V)) % V, stride_hs_n, stride_hs_k, stride_ws_v,
                                            stride_ws_k, BLOCK_K)  # fmt: skip
        elif k == ks_steps:
            h_ptrs, w_ptrs = _tile_pointers(ht_ptr, wt_ptr, (row0 + tl.arange(0, BLOCK_N)) % N,
                                            (v + tl.arange(0, BLOCK_V)) % V, stride_ht_n, stride_ht_k, stride_wt_v,
                                            stride_wt_k, BLOCK_K)  # fmt: skip
        else:
            h_ptrs += BLOCK_K * tl.where(student, stride_hs_k, stride_ht_k)
            w_ptrs += BLOCK_K * tl.where(student, stride_ws_k, stride_wt_k)
        # written out, not in a helper: the interpreter pays ~3 ms per nested jit call
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_left = tl.where(student, KS - k * BLOCK_K, KT - (k - ks_steps) * BLOCK_K)
            h = tl.load(h_ptrs, mask=(offs_k < k_left)[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k < k_left)[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if k == ks_steps - 1:
            acc_s = acc
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
        if k == k_steps - 1:
            m_s, s_s, ent, m_t, s_t, cross = _fold_pair(
                acc_s, acc, bs_ptr, bt_ptr, s_buf_ptr, t_buf_ptr, s_tile_max_ptr, t_tile_max_ptr, offs_n, e_v,
                e_v_stop, N, V, stride_sb, stride_tb, m_s, s_s, ent, m_t, s_t, cross, temperature,
                HAS_S_BIAS, HAS_T_BIAS, SCALED, MODE, WRITE_BUFFERS, BLOCK_V,
            )  # fmt: skip
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            e_v += BLOCK_V
            if e_v >= e_v_stop:
                _store_stats(part_ptr, split, num_splits, offs_n, N, m_s, s_s, ent, m_t, s_t, cross)
                m_s, s_s, ent, m_t, s_t, cross = _fresh_stats(BLOCK_N)
                e_item += num_programs
                row_block, split, e_v, e_v_stop = _item_span(
                    e_item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N
                )
                offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit(do_not_specialize=["N", "num_splits"])
def _fused_linear_divergence_merge_kernel(
    part_ptr,
    lse_s_ptr,
    lse_t_ptr,
    entropy_ptr,
    divergence_ptr,
    N,
    num_splits,
    MODE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    stride = num_splits * N
    m_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    m_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for split in range(num_splits):
        m_s = tl.maximum(m_s, tl.load(part_ptr + split * N + offs_n, mask=n_mask, other=0.0))
        m_t = tl.maximum(m_t, tl.load(part_ptr + 3 * stride + split * N + offs_n, mask=n_mask, other=0.0))
    s_s = tl.zeros((BLOCK_N,), tl.float32)
    ent = tl.zeros((BLOCK_N,), tl.float32)
    s_t = tl.zeros((BLOCK_N,), tl.float32)
    cross = tl.zeros((BLOCK_N,), tl.float32)
    for split in range(num_splits):
        ptrs = part_ptr + split * N + offs_n
        m_s_i = tl.load(ptrs, mask=n_mask, other=0.0)
        s_s_i = tl.load(ptrs + stride, mask=n_mask, other=0.0)
        m_t_i = tl.load(ptrs + 3 * stride, mask=n_mask, other=0.0)
        alpha_s = tl.exp(m_s_i - m_s)
        alpha_t = tl.exp(m_t_i - m_t)
        s_s += alpha_s * s_s_i
        ent += alpha_s * (tl.load(ptrs + 2 * stride, mask=n_mask, other=0.0) + (m_s_i - m_s) * s_s_i)
        s_t += alpha_t * tl.load(ptrs + 4 * stride, mask=n_mask, other=0.0)
        if MODE == 0:
            cross += alpha_t * tl.load(ptrs + 5 * stride, mask=n_mask, other=0.0)
        if MODE == 1:
            cross += alpha_s * tl.load(ptrs + 5 * stride, mask=n_mask, other=0.0)
    log_s_s = tl.log(s_s)
    log_s_t = tl.log(s_t)
    # each logsumexp kept as (max, log-sum): at |z| ~ 1e3 their fp32 sum loses digits the gradient needs
    tl.store(lse_s_ptr + offs_n, m_s, mask=n_mask)
    tl.store(lse_s_ptr + N + offs_n, log_s_s, mask=n_mask)
    tl.store(lse_t_ptr + offs_n, m_t, mask=n_mask)
    tl.store(lse_t_ptr + N + offs_n, log_s_t, mask=n_mask)
    tl.store(entropy_ptr + offs_n, log_s_s - ent / s_s, mask=n_mask)
    # E[z_t - z_s] - (L_t - L_s), the difference of logsumexps taken max by max and log-sum by log-sum
    if MODE == 0:
        tl.store(divergence_ptr + offs_n, cross / s_t - (m_t - m_s) - (log_s_t - log_s_s), mask=n_mask)
    if MODE == 1:
        tl.store(divergence_ptr + offs_n, cross / s_s - (m_s - m_t) - (log_s_s - log_s_t), mask=n_mask)


@triton.jit
def _tile_log_probs(s_buf_ptr, t_buf_ptr, s_tile_max_ptr, t_tile_max_ptr, lse_s_ptr, lse_t_ptr, offs_n, tile, N, V,
                    stride_sb, stride_tb, TILE_V: tl.constexpr):  # fmt: skip
    # p_s, log p_s and log p_t of one forward tile of the buffers, and its mask: log p = (buffer's log)
    # + (t - L), with t the tile's max and L the row's logsumexp
    offs_v = tile * TILE_V + tl.arange(0, TILE_V)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_v < V)[None, :]
    rows = offs_n.to(tl.int64)
    e_s = tl.load(s_buf_ptr + rows[:, None] * stride_sb + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
    log_e_t = tl.load(t_buf_ptr + rows[:, None] * stride_tb + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
    # the reduction's last group may run past the last tile: its columns are masked, its row loads kept in bounds
    tiles = rows * tl.cdiv(V, TILE_V) + tl.minimum(tile, tl.cdiv(V, TILE_V) - 1)
    shift_s = (tl.load(s_tile_max_ptr + tiles, mask=n_mask, other=0.0) - tl.load(lse_s_ptr + offs_n, mask=n_mask,
               other=0.0)) - tl.load(lse_s_ptr + N + offs_n, mask=n_mask, other=0.0)  # fmt: skip
    shift_t = (tl.load(t_tile_max_ptr + tiles, mask=n_mask, other=0.0) - tl.load(lse_t_ptr + offs_n, mask=n_mask,
               other=0.0)) - tl.load(lse_t_ptr + N + offs_n, mask=n_mask, other=0.0)  # fmt: skip
    p_s = e_s * tl.exp(shift_s)[:, None]
    log_p_s = tl.log(e_s) + shift_s[:, None]  # -inf where p_s underflowed: the mixture must see p_s = 0 there
    log_p_t = log_e_t + shift_t[:, None]
    return mask & (e_s > 0), p_s, log_p_s, log_p_t, mask


@triton.jit
def _log_mixture(log_p_s, log_p_t, log_one_minus_beta, log_beta):
    # log((1 - beta) p_s + beta p_t) from the logs; log p_t is finite, so hi is, and a zero p_s adds exp(-inf) = 0
    a = log_p_s + log_one_minus_beta
    b = log_p_t + log_beta
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))


@triton.jit(do_not_specialize=["N"])
def _fused_linear_divergence_reduce_kernel(
    s_buf_ptr,
    t_buf_ptr,
    s_tile_max_ptr,
    t_tile_max_ptr,
    lse_s_ptr,
    lse_t_ptr,
    part_ptr,
    N,
    V,
    stride_sb,
    stride_tb,
    beta,
    log_one_minus_beta,
    log_beta,
    BLOCK_N: tl.constexpr,
    TILE_V: tl.constexpr,
    TILES: tl.constexpr,
):
    # The JSD's second pass: per row, partial sums over TILES forward tiles of the divergence and of KL(p_s || m),
    # into part [2, groups, N] (summed by the launcher: a fixed order, unlike atomics).
    group = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    jsd = tl.zeros((BLOCK_N,), tl.float32)
    kl_s = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(TILES):
        has_s, p_s, log_p_s, log_p_t, mask = _tile_log_probs(
            s_buf_ptr, t_buf_ptr, s_tile_max_ptr, t_tile_max_ptr, lse_s_ptr, lse_t_ptr, offs_n, group * TILES + i, N,
            V, stride_sb, stride_tb, TILE_V,
        )  # fmt: skip
        log_m = _log_mixture(log_p_s, log_p_t, log_one_minus_beta, log_beta)
        term_s = tl.where(has_s, p_s * (log_p_s - log_m), 0.0)
        term_t = tl.where(mask, tl.exp(log_p_t) * (log_p_t - log_m), 0.0)
        jsd += tl.sum(beta * term_t + (1.0 - beta) * term_s, axis=1)
        kl_s += tl.sum(term_s, axis=1)
    n_mask = offs_n < N
    groups = tl.num_programs(1)
    tl.store(part_ptr + group * N + offs_n, jsd, mask=n_mask)
    tl.store(part_ptr + (groups + group) * N + offs_n, kl_s, mask=n_mask)


@triton.jit(do_not_specialize=["N"])
def _fused_linear_divergence_dlogits_kernel(
    s_buf_ptr,
    t_buf_ptr,
    s_tile_max_ptr,
    t_tile_max_ptr,
    lse_s_ptr,
    lse_t_ptr,
    aux_ptr,
    weight_ptr,
    N,
    V,
    stride_sb,
    stride_tb,
    temperature,
    beta,
    log_one_minus_beta,
    log_beta,
    MODE: tl.constexpr,
    SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_V: tl.constexpr,
):
    # One program per BLOCK_N rows and one forward tile (each row has a single tile max there); rewrites the student's
    # buffer in place. aux: the row's KL(p_s || p_t) (reverse KL) or KL(p_s || m) (JSD); weight: d(loss)/d(row's value).
    tile = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    has_s, p_s, log_p_s, log_p_t, mask = _tile_log_probs(
        s_buf_ptr, t_buf_ptr, s_tile_max_ptr, t_tile_max_ptr, lse_s_ptr, lse_t_ptr, offs_n, tile, N, V, stride_sb,
        stride_tb, TILE_V,
    )  # fmt: skip
    if MODE == 0:
        grad = p_s - tl.exp(log_p_t)
    else:
        aux = tl.load(aux_ptr + offs_n, mask=n_mask, other=0.0)
        if MODE == 1:
            grad = tl.where(has_s, p_s * (log_p_s - log_p_t - aux[:, None]), 0.0)
        else:
            log_m = _log_mixture(log_p_s, log_p_t, log_one_minus_beta, log_beta)
            grad = (1.0 - beta) * tl.where(has_s, p_s * (log_p_s - log_m - aux[:, None]), 0.0)
    grad *= tl.load(weight_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    grad = divide_by_temperature(grad, temperature, SCALED)
    offs_v = tile * TILE_V + tl.arange(0, TILE_V)
    ptrs = s_buf_ptr + offs_n.to(tl.int64)[:, None] * stride_sb + offs_v[None, :]
    tl.store(ptrs, grad.to(s_buf_ptr.dtype.element_ty), mask=mask)


_TILES = (INTERPRETER_TILE, *CANDIDATE_TILES["16bit"], *CANDIDATE_TILES["fp32"])
# Splits are multiples of every BLOCK_V, so a tile never straddles two splits and tile i covers [i, i + 1) * BLOCK_V.
_SPLIT_GRANULE = max(c.kwargs["BLOCK_V"] for c in _TILES)
_fwd = TiledKernel(
    _fused_linear_divergence_fwd_kernel,
    pinned=pinned_tile,
    tiles=_TILES,
    usable=_candidates,
    key=["KS", "KT", "V", "N_BUCKET", "HAS_S_BIAS", "HAS_T_BIAS", "SCALED", "MODE", "WRITE_BUFFERS", "PRECISION"],
    derived={"EVEN_K": lambda args: args["KS"] % args["BLOCK_K"] == 0 and args["KT"] % args["BLOCK_K"] == 0},
    dtype_arg="hs_ptr",
)


def divergence_buffers(rows: int, vocab: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's [rows, vocab] buffers that `fused_linear_divergence_fwd` fills, in `like`'s
    dtype and on its device (rows 16-byte aligned)."""
    return exp_buffer(rows, vocab, like), exp_buffer(rows, vocab, like)


def _beta_logs(beta: float) -> dict:
    # log(1 - beta) and log(beta) in fp64 once; only the JSD uses them (both finite there)
    mixture = 0.0 < beta < 1.0
    return {"beta": beta, "log_one_minus_beta": math.log1p(-beta) if mixture else 0.0,
            "log_beta": math.log(beta) if mixture else 0.0}  # fmt: skip


def fused_linear_divergence_fwd(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    s_bias: torch.Tensor | None,
    t_hidden: torch.Tensor,
    t_weight: torch.Tensor,
    t_bias: torch.Tensor | None,
    beta: float,
    temperature: float,
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_programs: int | None = None,
    config: triton.Config | None = None,
) -> dict:
    """Forward of one row chunk. s_hidden [n, Ks], s_weight [V, Ks], t_hidden [n, Kt], t_weight [V, Kt], biases [V] or
    None, all of one dtype. buffers: `divergence_buffers` of at least n rows, needed for the JSD (0 < beta < 1) and for
    `fused_linear_divergence_dlogits`; without them (forward / reverse KL values only) nothing [n, V] is written.
    num_programs: the persistent grid's size (default: one per SM). config: a tile instead of the pinned / autotuned
    one.

    Returns float32 [n] "divergence" and "entropy" (the student's, at the temperature); and, for the dlogits kernel,
    "lse_s", "lse_t" ([2, n]: max, log-sum), "aux" (the row constant of the gradient), "tile_max_s", "tile_max_t",
    "tile_v".
    """
    n, ks = s_hidden.shape
    V, kt = t_weight.shape[0], t_hidden.shape[1]
    mode = divergence_mode(beta)
    if mode == JSD and buffers is None:
        raise ValueError(f"beta={beta} (the JSD) needs buffers: its divergence is a second pass over them")
    device = s_hidden.device
    programs = num_programs or persistent_programs(device)
    split_v = _default_split_v(n, V, programs, (config or pinned_tile(s_hidden.dtype)).kwargs["BLOCK_N"])
    split_v = triton.cdiv(split_v, _SPLIT_GRANULE) * _SPLIT_GRANULE
    num_splits = triton.cdiv(V, split_v)
    f32 = {"device": device, "dtype": torch.float32}
    part = torch.empty((_NUM_STATS, num_splits, n), **f32)
    if config is None and _fwd.tuner is None:
        config = pinned_tile(s_hidden.dtype)
    # one max per row and forward tile; an autotuned launch may pick any tile, so size for the narrowest
    block_v = config.kwargs["BLOCK_V"] if config is not None else min(c.kwargs["BLOCK_V"] for c in _TILES)
    tile_max = torch.empty((2, n * triton.cdiv(V, block_v)), **f32) if buffers is not None else part
    s_buf, t_buf = buffers if buffers is not None else (s_hidden, s_hidden)
    _fwd(
        _persistent_grid(programs, lambda meta: triton.cdiv(n, meta["BLOCK_N"]) * num_splits),
        s_hidden, s_weight, s_bias if s_bias is not None else s_hidden,
        t_hidden, t_weight, t_bias if t_bias is not None else s_hidden,
        s_buf, t_buf, tile_max[0], tile_max[1], part,
        n, V, ks, kt, _n_bucket(n), num_splits, split_v,
        s_hidden.stride(0), s_hidden.stride(1), s_weight.stride(0), s_weight.stride(1),
        t_hidden.stride(0), t_hidden.stride(1), t_weight.stride(0), t_weight.stride(1),
        s_buf.stride(0), t_buf.stride(0), temperature,
        HAS_S_BIAS=s_bias is not None, HAS_T_BIAS=t_bias is not None, SCALED=temperature != 1.0, MODE=mode,
        WRITE_BUFFERS=buffers is not None, PRECISION=dot_precision(s_hidden.dtype), config=config,
    )  # fmt: skip

    out = {name: torch.empty(n, **f32) for name in ("divergence", "entropy")}
    out["lse_s"], out["lse_t"] = torch.empty((2, n), **f32), torch.empty((2, n), **f32)
    block_n = 128
    _fused_linear_divergence_merge_kernel[(triton.cdiv(n, block_n),)](
        part, out["lse_s"], out["lse_t"], out["entropy"], out["divergence"], n, num_splits, MODE=mode, BLOCK_N=block_n
    )
    if buffers is None:
        return out
    out["tile_max_s"], out["tile_max_t"] = tile_max[0], tile_max[1]
    out["tile_v"] = (config or _fwd.tuner.best_config).kwargs["BLOCK_V"]
    out["aux"] = out["divergence"]
    if mode == JSD:
        out["divergence"], out["aux"] = _jsd_second_pass(buffers, out, n, V, beta)
    return out


def _rows_per_program(tile_v: int) -> int:
    return 16 if interpreting() else max(1, _ELEMENTS // tile_v)


def _jsd_second_pass(buffers, out: dict, n: int, V: int, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    s_buf, t_buf = buffers
    tile_v = out["tile_v"]
    groups = triton.cdiv(triton.cdiv(V, tile_v), _REDUCE_TILES)
    block_n = _rows_per_program(tile_v)
    part = torch.empty((2, groups, n), device=s_buf.device, dtype=torch.float32)
    _fused_linear_divergence_reduce_kernel[(triton.cdiv(n, block_n), groups)](
        s_buf, t_buf, out["tile_max_s"], out["tile_max_t"], out["lse_s"], out["lse_t"], part,
        n, V, s_buf.stride(0), t_buf.stride(0), **_beta_logs(beta),
        BLOCK_N=block_n, TILE_V=tile_v, TILES=_REDUCE_TILES, num_warps=8,
    )  # fmt: skip
    jsd, kl_s = part.sum(dim=1)
    return jsd, kl_s


def fused_linear_divergence_dlogits(
    buffers: tuple[torch.Tensor, torch.Tensor], fwd: dict, row_weights: torch.Tensor, beta: float, temperature: float
) -> torch.Tensor:
    """Rewrite the student buffer (as left by `fused_linear_divergence_fwd`, whose output dict is `fwd`) in place as
    the gradient of sum_i row_weights[i] * divergence[i] with respect to the student's logits (before the temperature).
    row_weights: contiguous float32 [n]. Returns the [n, V] view."""
    s_buf, t_buf = buffers
    n, V = row_weights.shape[0], s_buf.shape[1]
    tile_v = fwd["tile_v"]
    block_n = _rows_per_program(tile_v)
    _fused_linear_divergence_dlogits_kernel[(triton.cdiv(n, block_n), triton.cdiv(V, tile_v))](
        s_buf, t_buf, fwd["tile_max_s"], fwd["tile_max_t"], fwd["lse_s"], fwd["lse_t"], fwd["aux"], row_weights,
        n, V, s_buf.stride(0), t_buf.stride(0), temperature, **_beta_logs(beta),
        MODE=divergence_mode(beta), SCALED=temperature != 1.0, BLOCK_N=block_n, TILE_V=tile_v, num_warps=8,
    )  # fmt: skip
    return s_buf[:n]
