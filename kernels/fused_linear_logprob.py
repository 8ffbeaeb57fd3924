"""Fused linear log-prob: per-token log p(target), entropy and logit statistics of softmax((hidden @ weight.T + bias) / T)
without ever writing the [N, V] logits to device memory.

Forward: the work is cut into items, one per (BLOCK_N rows, vocabulary slice "split"); splitting the vocabulary gives
the GPU enough items when N is small. The grid is persistent (one program per SM): a program takes items p, p + P, ...
and runs all their [BLOCK_N, BLOCK_V] logits tiles' K steps as ONE flat loop, so that the software pipeline keeps
loading the next tile's operands while the current tile is folded into online statistics (running max, sum of
exponentials, entropy numerator, the target logit, ...). A second, tiny kernel merges the per-split statistics.

Backward: the logits are recomputed tile by tile (the same persistent flat loop) and turned into d(loss)/d(logits);
that gradient is written for one vocabulary chunk at a time (a bounded buffer) and multiplied into dH and dW by cuBLAS,
which accumulates in fp32.

Tiles: one pinned triton.Config per dtype (chosen from the sm_90 compile report, tests/kernels/sm90_compile.py: no
spills, pipelined, on wgmma); POSTTRAIN_AUTOTUNE=1 autotunes over CANDIDATE_TILES instead (kernels/_common.py).
"""

import torch
import triton
import triton.language as tl

from ._common import (
    TiledKernel,
    divide_by_temperature,
    dot_precision,
    interpreting,
    persistent_programs,
)

# Upper bound for the backward's per-chunk logits-gradient buffer.
BWD_CHUNK_BYTES = 256 * 1024 * 1024
# Forward items (row block x vocabulary split) wanted per program: enough that the last wave is a small share.
ITEMS_PER_PROGRAM = 4
# Vocabulary columns per split: at most this many (fewer when N is small and the grid needs more items) ...
MAX_SPLIT_V = 4096
# ... and a multiple of this, which every BLOCK_V below divides.
SPLIT_V_GRANULE = 256


def _tile(bn, bv, bk, warps, stages, group=8, **extra):
    return triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP_N": group, **extra}, num_warps=warps,
                         num_stages=stages)  # fmt: skip


# The interpreter runs each block op in numpy: few, large blocks are fastest; 32 rows still leave a row tail in the
# tests' shapes.
INTERPRETER_TILE = _tile(32, 256, 32, 4, 1, group=2)
# sm_90, bf16/fp16 (and tf32): wgmma 128x128 tiles, 3 shared-memory stages, 8 warps; no spills with every statistic.
PINNED_16BIT = _tile(128, 128, 64, 8, 3)
# sm_90, fp32 with IEEE dots (no tensor cores): a small tile, so the FMA loop neither spills nor takes seconds to build.
PINNED_FP32 = _tile(64, 64, 32, 4, 3)
# What POSTTRAIN_AUTOTUNE=1 tries. WIDE: 128x256 forward tiles (two 128-wide MMAs per hidden slice, the epilogue on
# one 128-wide slice at a time); they spill once entropy or a statistic is asked for, so only plain log-probs use them.
WIDE_16BIT = _tile(128, 128, 64, 8, 3, V_SLICES=2)
CANDIDATE_TILES = {
    "16bit": (PINNED_16BIT, _tile(128, 128, 64, 8, 4), _tile(64, 256, 64, 8, 3)),
    "fp32": (PINNED_FP32, _tile(128, 64, 32, 8, 3)),
}


def pinned_tile(dtype: torch.dtype) -> triton.Config:
    """The tile both kernels run at for `dtype` inputs unless POSTTRAIN_AUTOTUNE=1 or a launcher is given `config`."""
    if interpreting():
        return INTERPRETER_TILE
    return PINNED_FP32 if dtype == torch.float32 else PINNED_16BIT


def _bwd_candidates(args: dict) -> tuple[triton.Config, ...]:
    if interpreting():
        return (INTERPRETER_TILE,)
    return CANDIDATE_TILES["fp32" if args["h_ptr"].dtype == torch.float32 else "16bit"]


def _fwd_candidates(args: dict) -> tuple[triton.Config, ...]:
    tiles = _bwd_candidates(args)
    plain = not any(args[flag] for flag in ("HAS_ENTROPY", "HAS_MEAN", "HAS_ARGMAX", "HAS_SQ"))
    return (*tiles, WIDE_16BIT) if plain and tiles is CANDIDATE_TILES["16bit"] else tiles


_EVEN_K = {"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0}


@triton.jit
def _grouped_tile(pid, num_row_blocks, num_col_blocks, GROUP_N: tl.constexpr):
    # GROUP_N row blocks sweep all column blocks together, so the hidden rows and weight columns that the concurrently
    # running programs read stay in L2 (the classic grouped matmul ordering).
    per_group = GROUP_N * num_col_blocks
    first_row = (pid // per_group) * GROUP_N
    group_rows = tl.minimum(num_row_blocks - first_row, GROUP_N)
    row_block = first_row + (pid % per_group) % group_rows
    col_block = (pid % per_group) // group_rows
    return row_block, col_block


@triton.jit
def _k_slice(h_ptr, w_ptr, rows, cols, k0, K, stride_hn, stride_hk, stride_wv, stride_wk, EVEN_K: tl.constexpr,
             BLOCK_K: tl.constexpr):  # fmt: skip
    # hidden[rows, k0 : k0 + BLOCK_K] and weight[cols, k0 : k0 + BLOCK_K].T. rows and cols must be in bounds (callers
    # wrap them and mask the result), which keeps the K loop free of row/column masks.
    offs_k = k0 + tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + offs_k[None, :] * stride_hk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wv
    if EVEN_K:
        h = tl.load(h_ptrs)
        w = tl.load(w_ptrs)
    else:
        h = tl.load(h_ptrs, mask=(offs_k < K)[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k < K)[:, None], other=0.0)
    return h, w


@triton.jit
def _tile_pointers(h_ptr, w_ptr, rows, cols, stride_hn, stride_hk, stride_wv, stride_wk, BLOCK_K: tl.constexpr):
    # the K step 0 pointers of hidden[rows, :BLOCK_K] and weight[cols, :BLOCK_K].T; each further step adds
    # BLOCK_K * stride_hk (stride_wk). rows and cols must be in bounds (callers wrap them and mask the result), which
    # keeps the K loop free of row/column masks.
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + offs_k[None, :] * stride_hk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wv
    return h_ptrs, w_ptrs


@triton.jit
def _scaled_logits(acc, b_ptr, cols, temperature, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr):
    # (acc + bias[cols]) / T: the logits tile from its fp32 hidden @ weight.T accumulator
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return divide_by_temperature(acc, temperature, SCALED)


@triton.jit
def _item_span(item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N: tl.constexpr):
    # The forward's work item -> (row block, split, its first and past-the-last vocabulary column). Past the last item
    # (the epilogue's state after its final tile) the last one is repeated, which keeps the grouping's divisions sane.
    row_block, split = _grouped_tile(tl.minimum(item, num_items - 1), num_row_blocks, num_splits, GROUP_N)
    v_start = split * split_v
    return row_block, split, v_start, tl.minimum(v_start + split_v, V)


@triton.jit
def _fresh_stats(BLOCK_N: tl.constexpr):
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    tgt_z = tl.zeros((BLOCK_N,), tl.float32)  # the target's logit, when it lies in this split
    ent = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) * (z - m): relative to m, so |z| ~ 1e4 loses nothing
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int32)
    sq = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(2 (z - m)), for log sum_v p_v^2
    return m, s, tgt_z, ent, zsum, arg, sq


@triton.jit
def _fold_tile(acc, b_ptr, v0, v_stop, V, tgt, m, s, tgt_z, ent, zsum, arg, sq, temperature, HAS_BIAS: tl.constexpr,
               SCALED: tl.constexpr, HAS_ENTROPY: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ARGMAX: tl.constexpr,
               HAS_SQ: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    # the online statistics updated with the logits of columns [v0, v0 + BLOCK_V) (those < v_stop)
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < v_stop
    z = _scaled_logits(acc, b_ptr, offs_v % V, temperature, HAS_BIAS, SCALED)
    z = tl.where(v_mask[None, :], z, float("-inf"))
    tile_max = tl.max(z, axis=1)
    m_new = tl.maximum(m, tile_max)
    alpha = tl.exp(m - m_new)
    shifted = z - m_new[:, None]
    e = tl.exp(shifted)
    # the target's logit taken from the very tile that feeds the max and the sum: log p = z_t - m - log s is then
    # exactly 0 when the target is the only logit (V = 1) or carries all the mass
    is_tgt = (offs_v[None, :] == tgt[:, None]) & v_mask[None, :]
    tgt_z += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
    if HAS_ENTROPY:
        # moving the reference point from m to m_new shifts every (z - m) by (m - m_new); s = 0 on the first tile
        rebased = ent + tl.where(s > 0, (m - m_new) * s, 0.0)
        ent = alpha * rebased + tl.sum(tl.where(v_mask[None, :], e * shifted, 0.0), axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    if HAS_MEAN:
        zsum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
    if HAS_ARGMAX:
        # strict '>' keeps the earlier tile on ties: the first maximum, as torch.argmax
        tile_arg = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int32)
        arg = tl.where(tile_max > m, v0 + tile_arg, arg)
    if HAS_SQ:
        sq = alpha * alpha * sq + tl.sum(e * e, axis=1)
    return m_new, s, tgt_z, ent, zsum, arg, sq


@triton.jit
def _store_stats(part, n_mask, part_max_ptr, part_sum_ptr, part_tgt_ptr, part_ent_ptr, part_zsum_ptr, part_arg_ptr,
                 part_sq_ptr, m, s, tgt_z, ent, zsum, arg, sq, HAS_ENTROPY: tl.constexpr, HAS_MEAN: tl.constexpr,
                 HAS_ARGMAX: tl.constexpr, HAS_SQ: tl.constexpr):  # fmt: skip
    tl.store(part_max_ptr + part, m, mask=n_mask)
    tl.store(part_sum_ptr + part, s, mask=n_mask)
    tl.store(part_tgt_ptr + part, tgt_z, mask=n_mask)
    if HAS_ENTROPY:
        tl.store(part_ent_ptr + part, ent, mask=n_mask)
    if HAS_MEAN:
        tl.store(part_zsum_ptr + part, zsum, mask=n_mask)
    if HAS_ARGMAX:
        tl.store(part_arg_ptr + part, arg, mask=n_mask)
    if HAS_SQ:
        tl.store(part_sq_ptr + part, sq, mask=n_mask)


@triton.jit
def _row_targets(tgt_ptr, row0, N, BLOCK_N: tl.constexpr):
    offs_n = row0 + tl.arange(0, BLOCK_N)
    return tl.load(tgt_ptr + offs_n, mask=offs_n < N, other=-1).to(tl.int32)  # token ids < V < 2**31


@triton.jit(do_not_specialize=["N", "N_BUCKET", "num_splits"])
def _fused_linear_logprob_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_tgt_ptr,
    part_ent_ptr,
    part_zsum_ptr,
    part_arg_ptr,
    part_sq_ptr,
    N,
    V,
    K,
    N_BUCKET,
    num_splits,
    split_v,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    temperature,
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_ARGMAX: tl.constexpr,
    HAS_SQ: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
    V_SLICES: tl.constexpr = 1,
):
    # A tile is BLOCK_N x (V_SLICES * BLOCK_V): with V_SLICES = 2 one hidden slice feeds two BLOCK_V-wide MMAs, and
    # the epilogue folds one BLOCK_V-wide accumulator at a time (each [BLOCK_N, BLOCK_V] temporary of the epilogue
    # costs BLOCK_N * BLOCK_V / threads registers). N_BUCKET is only the autotune key's bucket of N.
    TILE_V: tl.constexpr = V_SLICES * BLOCK_V
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    num_items = num_row_blocks * num_splits
    k_steps = tl.cdiv(K, BLOCK_K)
    steps = 0  # this program's K steps over all its items' tiles (the last split may be short)
    for item in range(pid, num_items, num_programs):
        _rb, _sp, v_start, v_stop = _item_span(item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
        steps += tl.cdiv(v_stop - v_start, TILE_V) * k_steps

    # The loader's state (which tile the next K step reads) and the epilogue's (which tile the accumulator holds) are
    # advanced separately: the pipeline issues the loads of later steps before the epilogue of the current one.
    k = k_steps - 1
    item = pid - num_programs
    row0 = 0
    v = 0
    v_stop = 0
    e_item = pid
    row_block, split, e_v, e_v_stop = _item_span(pid, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
    e_row0 = row_block * BLOCK_N
    tgt = _row_targets(tgt_ptr, e_row0, N, BLOCK_N)
    m, s, tgt_z, ent, zsum, arg, sq = _fresh_stats(BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for _step in range(steps):
        k = tl.where(k == k_steps - 1, 0, k + 1)
        if k == 0:
            v += TILE_V
            if v >= v_stop:
                item += num_programs
                next_rows, _sp, v, v_stop = _item_span(item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
                row0 = next_rows * BLOCK_N
        # Addresses are rebuilt at every step from scalars (not carried as pointer tiles: those cost the epilogue
        # registers), and written out rather than in a helper: the interpreter pays ~3 ms per nested jit call.
        offs_k = k * BLOCK_K + tl.arange(0, BLOCK_K)
        rows = ((row0 + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        cols = ((v + tl.arange(0, BLOCK_V)) % V).to(tl.int64)
        h_ptrs = h_ptr + rows[:, None] * stride_hn + offs_k[None, :] * stride_hk
        w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wv
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=(offs_k < K)[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k < K)[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if V_SLICES == 2:
            cols2 = ((v + BLOCK_V + tl.arange(0, BLOCK_V)) % V).to(tl.int64)
            w2_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols2[None, :] * stride_wv
            if EVEN_K:
                w2 = tl.load(w2_ptrs)
            else:
                w2 = tl.load(w2_ptrs, mask=(offs_k < K)[:, None], other=0.0)
            acc2 = tl.dot(h, w2, acc2, input_precision=PRECISION)
        if k == k_steps - 1:
            m, s, tgt_z, ent, zsum, arg, sq = _fold_tile(
                acc, b_ptr, e_v, e_v_stop, V, tgt, m, s, tgt_z, ent, zsum, arg, sq, temperature,
                HAS_BIAS, SCALED, HAS_ENTROPY, HAS_MEAN, HAS_ARGMAX, HAS_SQ, BLOCK_V,
            )  # fmt: skip
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            if V_SLICES == 2:
                m, s, tgt_z, ent, zsum, arg, sq = _fold_tile(
                    acc2, b_ptr, e_v + BLOCK_V, e_v_stop, V, tgt, m, s, tgt_z, ent, zsum, arg, sq, temperature,
                    HAS_BIAS, SCALED, HAS_ENTROPY, HAS_MEAN, HAS_ARGMAX, HAS_SQ, BLOCK_V,
                )  # fmt: skip
                acc2 = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            e_v += TILE_V
            if e_v >= e_v_stop:
                offs_n = e_row0 + tl.arange(0, BLOCK_N)
                _store_stats(
                    split * N + offs_n, offs_n < N, part_max_ptr, part_sum_ptr, part_tgt_ptr, part_ent_ptr,
                    part_zsum_ptr, part_arg_ptr, part_sq_ptr, m, s, tgt_z, ent, zsum, arg, sq,
                    HAS_ENTROPY, HAS_MEAN, HAS_ARGMAX, HAS_SQ,
                )  # fmt: skip
                m, s, tgt_z, ent, zsum, arg, sq = _fresh_stats(BLOCK_N)
                e_item += num_programs
                row_block, split, e_v, e_v_stop = _item_span(
                    e_item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N
                )
                e_row0 = row_block * BLOCK_N
                tgt = _row_targets(tgt_ptr, e_row0, N, BLOCK_N)


@triton.jit(do_not_specialize=["N", "num_splits"])
def _fused_linear_logprob_merge_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_tgt_ptr,
    part_ent_ptr,
    part_zsum_ptr,
    part_arg_ptr,
    part_sq_ptr,
    tgt_ptr,
    logprob_ptr,
    entropy_ptr,
    max_ptr,
    log_sum_ptr,
    mean_logit_ptr,
    is_argmax_ptr,
    log_sum_sq_ptr,
    N,
    V,
    num_splits,
    ignore_index,
    HAS_ENTROPY: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_ARGMAX: tl.constexpr,
    HAS_SQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for split in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_max_ptr + split * N + offs_n, mask=n_mask, other=0.0))
    s = tl.zeros((BLOCK_N,), tl.float32)
    tgt_z = tl.zeros((BLOCK_N,), tl.float32)
    ent = tl.zeros((BLOCK_N,), tl.float32)
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int32)
    sq = tl.zeros((BLOCK_N,), tl.float32)
    for split in range(0, num_splits):
        part = split * N + offs_n
        m_i = tl.load(part_max_ptr + part, mask=n_mask, other=0.0)
        s_i = tl.load(part_sum_ptr + part, mask=n_mask, other=0.0)
        alpha = tl.exp(m_i - m)
        s += alpha * s_i
        tgt_z += tl.load(part_tgt_ptr + part, mask=n_mask, other=0.0)  # one split holds it, the others 0: exact
        if HAS_ENTROPY:
            ent += alpha * (tl.load(part_ent_ptr + part, mask=n_mask, other=0.0) + (m_i - m) * s_i)
        if HAS_MEAN:
            zsum += tl.load(part_zsum_ptr + part, mask=n_mask, other=0.0)
        if HAS_ARGMAX:
            better = m_i > best
            arg = tl.where(better, tl.load(part_arg_ptr + part, mask=n_mask, other=0), arg)
            best = tl.where(better, m_i, best)
        if HAS_SQ:
            sq += alpha * alpha * tl.load(part_sq_ptr + part, mask=n_mask, other=0.0)

    log_s = tl.log(s)
    tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=ignore_index)
    valid = tgt != ignore_index
    # logsumexp = m + log_s, kept as two numbers: at |z| ~ 1e3 their fp32 sum loses digits the backward needs
    tl.store(max_ptr + offs_n, m, mask=n_mask)
    tl.store(log_sum_ptr + offs_n, log_s, mask=n_mask)
    tl.store(logprob_ptr + offs_n, tl.where(valid, (tgt_z - m) - log_s, 0.0), mask=n_mask)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + offs_n, tl.where(valid, log_s - ent / s, 0.0), mask=n_mask)
    if HAS_MEAN:
        tl.store(mean_logit_ptr + offs_n, tl.where(valid, zsum / V, 0.0), mask=n_mask)
    if HAS_ARGMAX:
        tl.store(is_argmax_ptr + offs_n, valid & (arg == tgt), mask=n_mask)
    if HAS_SQ:
        tl.store(log_sum_sq_ptr + offs_n, tl.where(valid, tl.log(sq) - 2.0 * log_s, 0.0), mask=n_mask)


@triton.jit(do_not_specialize=["N", "N_BUCKET", "v_start", "num_cols"])
def _fused_linear_logprob_bwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    max_ptr,
    log_sum_ptr,
    ent_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    dlogits_ptr,
    N,
    K,
    N_BUCKET,
    v_start,
    num_cols,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    stride_dn,
    temperature,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_GRAD_LOGPROB: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    # dlogits[:, c] for the vocabulary chunk [v_start, v_start + num_cols), c = column within the chunk. Persistent:
    # program p owns tiles p, p + P, ... and runs their K steps as one flat loop, as the forward does.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    num_col_blocks = tl.cdiv(num_cols, BLOCK_V)
    k_steps = tl.cdiv(K, BLOCK_K)
    steps = tl.cdiv(num_row_blocks * num_col_blocks - pid, num_programs) * k_steps

    k = k_steps - 1
    tile = pid - num_programs
    e_tile = pid
    h_ptrs, w_ptrs = _tile_pointers(h_ptr, w_ptr, tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_V), stride_hn, stride_hk,
                                    stride_wv, stride_wk, BLOCK_K)  # fmt: skip
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for _step in range(steps):
        k = tl.where(k == k_steps - 1, 0, k + 1)
        if k == 0:
            tile += num_programs
            row_block, col_block = _grouped_tile(tile, num_row_blocks, num_col_blocks, GROUP_N)
            rows = (row_block * BLOCK_N + tl.arange(0, BLOCK_N)) % N
            cols = v_start + (col_block * BLOCK_V + tl.arange(0, BLOCK_V)) % num_cols
            h_ptrs, w_ptrs = _tile_pointers(h_ptr, w_ptr, rows, cols, stride_hn, stride_hk, stride_wv, stride_wk,
                                            BLOCK_K)  # fmt: skip
        else:  # the epilogue here is light enough to afford carried pointer tiles (the forward's is not)
            h_ptrs += BLOCK_K * stride_hk
            w_ptrs += BLOCK_K * stride_wk
        if EVEN_K:  # written out, as in the forward
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=(offs_k < K - k * BLOCK_K)[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k < K - k * BLOCK_K)[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if k == k_steps - 1:
            row_block, col_block = _grouped_tile(e_tile, num_row_blocks, num_col_blocks, GROUP_N)
            e_tile += num_programs
            offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_c = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
            n_mask = offs_n < N
            offs_v = v_start + offs_c % num_cols
            z = _scaled_logits(acc, b_ptr, offs_v, temperature, HAS_BIAS, SCALED)
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=ignore_index)
            valid = tgt != ignore_index
            row_max = tl.load(max_ptr + offs_n, mask=n_mask, other=0.0)
            log_p = (z - row_max[:, None]) - tl.load(log_sum_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
            p = tl.exp(log_p)
            grad = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            if HAS_GRAD_LOGPROB:
                # d log p_t / dz_v = [v == t] - p_v
                g = tl.where(valid, tl.load(grad_logprob_ptr + offs_n, mask=n_mask, other=0.0), 0.0)
                is_tgt = offs_v[None, :] == tgt[:, None]
                grad += g[:, None] * (is_tgt.to(tl.float32) - p)
            if HAS_GRAD_ENTROPY:
                # d entropy / dz_v = -p_v * (log p_v + entropy)
                g = tl.where(valid, tl.load(grad_entropy_ptr + offs_n, mask=n_mask, other=0.0), 0.0)
                ent = tl.load(ent_ptr + offs_n, mask=n_mask, other=0.0)
                grad -= g[:, None] * p * (log_p + ent[:, None])
            grad = divide_by_temperature(grad, temperature, SCALED)
            out_ptrs = dlogits_ptr + offs_n.to(tl.int64)[:, None] * stride_dn + offs_c[None, :]
            c_mask = offs_c < num_cols
            tl.store(out_ptrs, grad.to(dlogits_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])


_FLAGS = ["HAS_BIAS", "SCALED", "PRECISION"]
_ALL_TILES = (INTERPRETER_TILE, WIDE_16BIT, *CANDIDATE_TILES["16bit"], *CANDIDATE_TILES["fp32"])
_fwd = TiledKernel(
    _fused_linear_logprob_fwd_kernel,
    pinned=pinned_tile,
    tiles=_ALL_TILES,
    usable=_fwd_candidates,
    key=["K", "V", "N_BUCKET", *_FLAGS, "HAS_ENTROPY", "HAS_MEAN", "HAS_ARGMAX", "HAS_SQ"],
    derived=_EVEN_K,
    dtype_arg="h_ptr",
)
_bwd = TiledKernel(
    _fused_linear_logprob_bwd_kernel,
    pinned=pinned_tile,
    tiles=_ALL_TILES,
    usable=_bwd_candidates,
    key=["K", "N_BUCKET", *_FLAGS, "HAS_GRAD_LOGPROB", "HAS_GRAD_ENTROPY"],
    derived=_EVEN_K,
    dtype_arg="h_ptr",
)


def _n_bucket(n: int) -> int:
    # The autotune key's view of N: N changes every training step, so tune per power-of-two bucket, not per value.
    return min(triton.next_power_of_2(max(n, 1)), 8192)


def _persistent_grid(programs: int, work_items):
    # one program per SM, never more programs than work items
    return lambda meta: (max(1, min(programs, work_items(meta))),)


def _default_split_v(N: int, V: int, programs: int, block_n: int) -> int:
    # Few rows give few row blocks: cut the vocabulary finer so that every program gets ITEMS_PER_PROGRAM items.
    splits_wanted = triton.cdiv(ITEMS_PER_PROGRAM * programs, triton.cdiv(N, block_n))
    split_v = triton.cdiv(triton.cdiv(V, splits_wanted), SPLIT_V_GRANULE) * SPLIT_V_GRANULE
    return min(split_v, MAX_SPLIT_V)


def fused_linear_logprob_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    stats: tuple[str, ...] = (),
    split_v: int | None = None,
    num_programs: int | None = None,
    config: triton.Config | None = None,
) -> dict[str, torch.Tensor]:
    """Launch the forward. hidden [N, K], weight [V, K] (same dtype, stride 1 not required), targets [N] int64.

    split_v: vocabulary columns per work item (default: at most MAX_SPLIT_V, fewer when N is small). num_programs: the
    persistent grid's size (default: one per SM). config: a tile to run instead of the pinned / autotuned one.

    Returns float32 [N] tensors "logprob", "entropy" with with_entropy, and each of `stats` (a subset of these):
    "mean_logit", the bool "is_argmax", "log_sum_sq_probs" (log sum_v p_v^2); rows whose target is ignore_index get
    0 / False. Also "lse": [2, N], each row's logsumexp of the scaled logits as (max, log-sum), which the backward takes.
    """
    N, K = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    programs = num_programs or persistent_programs(device)
    split_v = split_v or _default_split_v(N, V, programs, (config or pinned_tile(hidden.dtype)).kwargs["BLOCK_N"])
    num_splits = triton.cdiv(V, split_v)
    f32 = dict(device=device, dtype=torch.float32)
    flags = {"HAS_ENTROPY": with_entropy, "HAS_MEAN": "mean_logit" in stats, "HAS_ARGMAX": "is_argmax" in stats,
             "HAS_SQ": "log_sum_sq_probs" in stats}  # fmt: skip
    part_max = torch.empty((num_splits, N), **f32)
    part_sum = torch.empty((num_splits, N), **f32)
    part_tgt = torch.empty((num_splits, N), **f32)
    part_ent = torch.empty((num_splits, N), **f32) if with_entropy else part_sum
    part_zsum = torch.empty((num_splits, N), **f32) if flags["HAS_MEAN"] else part_sum
    part_arg = torch.empty((num_splits, N), device=device, dtype=torch.int32) if flags["HAS_ARGMAX"] else part_sum
    part_sq = torch.empty((num_splits, N), **f32) if flags["HAS_SQ"] else part_sum
    bias_or_any = bias if bias is not None else hidden
    scaling = {"HAS_BIAS": bias is not None, "SCALED": temperature != 1.0}
    _fwd(
        _persistent_grid(programs, lambda meta: triton.cdiv(N, meta["BLOCK_N"]) * num_splits),
        hidden, weight, bias_or_any, targets,
        part_max, part_sum, part_tgt, part_ent, part_zsum, part_arg, part_sq,
        N, V, K, _n_bucket(N), num_splits, split_v,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        temperature,
        **scaling, **flags, PRECISION=dot_precision(hidden.dtype), config=config,
    )  # fmt: skip

    out = {"logprob": torch.empty(N, **f32), "lse": torch.empty((2, N), **f32)}
    if with_entropy:
        out["entropy"] = torch.empty(N, **f32)
    for name in stats:
        out[name] = torch.empty(N, device=device, dtype=torch.bool if name == "is_argmax" else torch.float32)
    block_n = 128
    _fused_linear_logprob_merge_kernel[(triton.cdiv(N, block_n),)](
        part_max, part_sum, part_tgt, part_ent, part_zsum, part_arg, part_sq, targets,
        out["logprob"], out.get("entropy", part_sum), out["lse"][0], out["lse"][1], out.get("mean_logit", part_sum),
        out.get("is_argmax", part_sum), out.get("log_sum_sq_probs", part_sum),
        N, V, num_splits, ignore_index,
        **flags, BLOCK_N=block_n,
    )  # fmt: skip
    return out


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with an fp32 `acc`, without first rounding a @ b to a's (low-precision) dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _grad_buffer(shape, like: torch.Tensor, accumulate: bool) -> torch.Tensor:
    if accumulate:
        return torch.zeros(shape, device=like.device, dtype=torch.float32)
    return torch.empty(shape, device=like.device, dtype=like.dtype)


def _chunk_sizes(N: int, V: int, itemsize: int, budget: int) -> tuple[int, int]:
    # Rows x columns of one logits-gradient chunk within `budget` bytes: all rows when possible (then dW needs no
    # cross-chunk accumulation), and at least 1024 columns so the GEMMs stay efficient.
    min_cols = min(V, 1024)
    rows = max(1, min(N, budget // (min_cols * itemsize)))
    cols = max(min_cols, min(V, budget // (rows * itemsize)))
    return rows, cols


def fused_linear_logprob_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs_grad: tuple[bool, bool, bool],
    chunk_bytes: int = BWD_CHUNK_BYTES,
    num_programs: int | None = None,
    config: triton.Config | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dhidden, dweight, dbias), each None where `needs_grad` says so, in the inputs' dtypes.

    grad_logprob / grad_entropy: contiguous float32 [N] or None (no gradient reached that output). The logits gradient
    is recomputed by a Triton kernel into a buffer of at most `chunk_bytes`; cuBLAS turns each chunk into dH and dW,
    accumulating across chunks in fp32. num_programs / config: as for fused_linear_logprob_fwd.
    """
    N, K = hidden.shape
    V = weight.shape[0]
    needs_h, needs_w, needs_b = needs_grad
    programs = num_programs or persistent_programs(hidden.device)
    rows, cols = _chunk_sizes(N, V, hidden.element_size(), chunk_bytes)
    one_row_chunk, one_col_chunk = rows == N, cols == V
    # fp32 accumulators only where a gradient is summed over several chunks
    dh = _grad_buffer((N, K), hidden, accumulate=not one_col_chunk) if needs_h else None
    dw = _grad_buffer((V, K), weight, accumulate=not one_row_chunk) if needs_w else None
    db = torch.zeros(V, device=weight.device, dtype=torch.float32) if needs_b else None
    # rows padded to 16 elements: each starts 16-byte aligned (vector stores) and stride_dn keeps one specialization
    row_stride = triton.cdiv(cols, 16) * 16
    buffer = torch.empty(rows * row_stride, device=hidden.device, dtype=hidden.dtype)
    n_bucket = _n_bucket(rows)
    for r0 in range(0, N, rows):
        h_chunk = hidden[r0 : r0 + rows]
        n = h_chunk.shape[0]
        for v0 in range(0, V, cols):
            c = min(cols, V - v0)
            dlogits = buffer[: n * row_stride].view(n, row_stride)[:, :c]
            _bwd(
                _persistent_grid(
                    programs, lambda meta, n=n, c=c: triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_V"])
                ),
                h_chunk, weight, bias if bias is not None else hidden, targets[r0:],
                lse[0, r0:], lse[1, r0:], entropy[r0:] if entropy is not None else hidden,
                grad_logprob[r0:] if grad_logprob is not None else hidden,
                grad_entropy[r0:] if grad_entropy is not None else hidden,
                dlogits,
                n, K, n_bucket, v0, c,
                h_chunk.stride(0), h_chunk.stride(1), weight.stride(0), weight.stride(1), dlogits.stride(0),
                temperature, ignore_index,
                HAS_BIAS=bias is not None, SCALED=temperature != 1.0, HAS_GRAD_LOGPROB=grad_logprob is not None,
                HAS_GRAD_ENTROPY=grad_entropy is not None, PRECISION=dot_precision(hidden.dtype), config=config,
            )  # fmt: skip
            if needs_h:
                if one_col_chunk:
                    torch.mm(dlogits, weight, out=dh[r0 : r0 + n])
                else:
                    _accumulate_mm(dh[r0 : r0 + n], dlogits, weight[v0 : v0 + c])
            if needs_w:
                if one_row_chunk:
                    torch.mm(dlogits.t(), h_chunk, out=dw[v0 : v0 + c])
                else:
                    _accumulate_mm(dw[v0 : v0 + c], dlogits.t(), h_chunk)
            if needs_b:
                db[v0 : v0 + c] += dlogits.sum(dim=0, dtype=torch.float32)
    return (
        dh.to(hidden.dtype) if needs_h else None,
        dw.to(weight.dtype) if needs_w else None,
        db.to(bias.dtype) if needs_b else None,
    )
