"""Fused linear log-prob: per-token log p(target), entropy and logit statistics of softmax((hidden @ weight.T + bias) / T)
without ever writing the [N, V] logits to device memory.

Forward: each program owns BLOCK_N rows and one contiguous slice ("split") of the vocabulary. It computes its logits one
[BLOCK_N, BLOCK_V] tile at a time with tl.dot (fp32 accumulator) and folds every tile into online statistics: running
max, sum of exponentials, entropy numerator, the target logit. Splitting the vocabulary gives the GPU enough programs
when N is small; a second, tiny kernel merges the per-split statistics.

Backward: the logits are recomputed tile by tile and turned into d(loss)/d(logits) in the same kernel; that gradient is
written for one vocabulary chunk at a time (a bounded buffer) and multiplied into dH and dW by cuBLAS, which
accumulates in fp32.
"""

import torch
import triton
import triton.language as tl

from ._common import divide_by_temperature, dot_precision, interpreting

# Vocabulary columns per forward program; a multiple of every BLOCK_V below.
SPLIT_V = 4096
# Upper bound for the backward's per-chunk logits-gradient buffer.
BWD_CHUNK_BYTES = 256 * 1024 * 1024


# (BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages): wgmma-sized tiles for Hopper, two smaller fallbacks. Each
# compiles for sm_90 with pipelined loads (tests/kernels/test_sm90_compile.py); the 256-wide ones spill when every
# statistic is asked for, and autotuning then prefers the others.
HOPPER_TILES = (
    (128, 128, 64, 8, 3),
    (128, 128, 64, 8, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (64, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
)


def _configs():
    if interpreting():
        # The interpreter runs each block op in numpy: few, large blocks are fastest; 16 rows keep row tails tested.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 256, "BLOCK_K": 32, "GROUP_N": 2})]
    return [
        triton.Config({"BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_K": bk, "GROUP_N": 8}, num_warps=w, num_stages=s)
        for bn, bv, bk, w, s in HOPPER_TILES
    ]


def _n_bucket(n: int) -> int:
    # Part of the autotune key: N changes every training step, so tune per power-of-two bucket, not per value.
    return min(triton.next_power_of_2(max(n, 1)), 8192)


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
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    K,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    temperature,
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # (hidden[rows] @ weight[cols].T + bias[cols]) / T in fp32. rows and cols must be in bounds (callers wrap them
    # and mask the result), which keeps the K loop free of row/column masks.
    offs_k = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hn + offs_k[None, :] * stride_hk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_mask = offs_k < K - k * BLOCK_K
            h = tl.load(h_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols).to(tl.float32)[None, :]
    return divide_by_temperature(acc, temperature, SCALED)


@triton.autotune(configs=_configs(), key=["K", "V", "N_BUCKET"])
@triton.heuristics(_EVEN_K)
@triton.jit
def _fused_linear_logprob_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    part_max_ptr,
    part_sum_ptr,
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
):
    # Only what needs the whole tile lives here; the target's logit is one dot per row, in the merge kernel. Every
    # [BLOCK_N, BLOCK_V] temporary costs BLOCK_N * BLOCK_V / threads registers: the epilogue decides the tile size.
    row_block, split = _grouped_tile(tl.program_id(0), tl.cdiv(N, BLOCK_N), num_splits, GROUP_N)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    v_start = split * split_v
    v_stop = tl.minimum(v_start + split_v, V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max of z
    s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    ent = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) * (z - m): relative to m, so |z| ~ 1e4 loses nothing
    zsum = tl.zeros((BLOCK_N,), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int32)
    sq = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(2 (z - m)), for log sum_v p_v^2
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_stop
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, offs_n % N, offs_v % V, K, stride_hn, stride_hk, stride_wv, stride_wk, temperature,
            HAS_BIAS, SCALED, EVEN_K, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        z = tl.where(v_mask[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)
        shifted = z - m_new[:, None]
        e = tl.exp(shifted)
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
        m = m_new

    part = split * N + offs_n
    tl.store(part_max_ptr + part, m, mask=n_mask)
    tl.store(part_sum_ptr + part, s, mask=n_mask)
    if HAS_ENTROPY:
        tl.store(part_ent_ptr + part, ent, mask=n_mask)
    if HAS_MEAN:
        tl.store(part_zsum_ptr + part, zsum, mask=n_mask)
    if HAS_ARGMAX:
        tl.store(part_arg_ptr + part, arg, mask=n_mask)
    if HAS_SQ:
        tl.store(part_sq_ptr + part, sq, mask=n_mask)


@triton.jit
def _target_logit(h_ptr, w_ptr, b_ptr, offs_n, n_mask, tgt, K, stride_hn, stride_hk, stride_wv, stride_wk, temperature,
                  HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # (hidden[n] . weight[target[n]] + bias[target[n]]) / T in fp32: one dot per row instead of a compare-and-select
    # over every logits tile
    rows = offs_n.to(tl.int64)[:, None] * stride_hn
    cols = tgt.to(tl.int64)[:, None] * stride_wv
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = n_mask[:, None] & (offs_k < K)[None, :]
        h = tl.load(h_ptr + rows + offs_k[None, :] * stride_hk, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols + offs_k[None, :] * stride_wk, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + tgt, mask=n_mask, other=0.0).to(tl.float32)
    return divide_by_temperature(acc, temperature, SCALED)


@triton.jit
def _fused_linear_logprob_merge_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    part_max_ptr,
    part_sum_ptr,
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
    K,
    num_splits,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    temperature,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    SCALED: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_MEAN: tl.constexpr,
    HAS_ARGMAX: tl.constexpr,
    HAS_SQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for split in range(0, num_splits):
        m = tl.maximum(m, tl.load(part_max_ptr + split * N + offs_n, mask=n_mask, other=0.0))
    s = tl.zeros((BLOCK_N,), tl.float32)
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
    tgt_logit = _target_logit(
        h_ptr, w_ptr, b_ptr, offs_n, n_mask & valid, tl.where(valid, tgt, 0), K, stride_hn, stride_hk, stride_wv,
        stride_wk, temperature, HAS_BIAS, SCALED, BLOCK_N, BLOCK_K,
    )  # fmt: skip
    tl.store(logprob_ptr + offs_n, tl.where(valid, tgt_logit - m - log_s, 0.0), mask=n_mask)
    if HAS_ENTROPY:
        tl.store(entropy_ptr + offs_n, tl.where(valid, log_s - ent / s, 0.0), mask=n_mask)
    if HAS_MEAN:
        tl.store(mean_logit_ptr + offs_n, tl.where(valid, zsum / V, 0.0), mask=n_mask)
    if HAS_ARGMAX:
        tl.store(is_argmax_ptr + offs_n, valid & (arg == tgt), mask=n_mask)
    if HAS_SQ:
        tl.store(log_sum_sq_ptr + offs_n, tl.where(valid, tl.log(sq) - 2.0 * log_s, 0.0), mask=n_mask)


@triton.autotune(configs=_configs(), key=["K", "N_BUCKET"])
@triton.heuristics(_EVEN_K)
@triton.jit
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
    # dlogits[:, c] for the vocabulary chunk [v_start, v_start + num_cols), c = column within the chunk
    row_block, col_block = _grouped_tile(
        tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(num_cols, BLOCK_V), GROUP_N
    )
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = col_block * BLOCK_V + tl.arange(0, BLOCK_V)
    n_mask = offs_n < N
    c_mask = offs_c < num_cols
    offs_v = v_start + offs_c % num_cols
    z = _logits_tile(
        h_ptr, w_ptr, b_ptr, offs_n % N, offs_v, K, stride_hn, stride_hk, stride_wv, stride_wk, temperature,
        HAS_BIAS, SCALED, EVEN_K, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K,
    )  # fmt: skip
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
    tl.store(out_ptrs, grad.to(dlogits_ptr.dtype.element_ty), mask=n_mask[:, None] & c_mask[None, :])


def _grid_1d(n_programs):
    return lambda meta: (n_programs(meta),)


def fused_linear_logprob_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    stats: tuple[str, ...] = (),
    split_v: int = SPLIT_V,
) -> dict[str, torch.Tensor]:
    """Launch the forward. hidden [N, K], weight [V, K] (same dtype, stride 1 not required), targets [N] int64.

    Returns float32 [N] tensors "logprob", "entropy" with with_entropy, and each of `stats` (a subset of these):
    "mean_logit", the bool "is_argmax", "log_sum_sq_probs" (log sum_v p_v^2); rows whose target is ignore_index get
    0 / False. Also "lse": [2, N], each row's logsumexp of the scaled logits as (max, log-sum), which the backward takes.
    """
    N, K = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    num_splits = triton.cdiv(V, split_v)
    f32 = dict(device=device, dtype=torch.float32)
    flags = {"HAS_ENTROPY": with_entropy, "HAS_MEAN": "mean_logit" in stats, "HAS_ARGMAX": "is_argmax" in stats,
             "HAS_SQ": "log_sum_sq_probs" in stats}  # fmt: skip
    part_max = torch.empty((num_splits, N), **f32)
    part_sum = torch.empty((num_splits, N), **f32)
    part_ent = torch.empty((num_splits, N), **f32) if with_entropy else part_sum
    part_zsum = torch.empty((num_splits, N), **f32) if flags["HAS_MEAN"] else part_sum
    part_arg = torch.empty((num_splits, N), device=device, dtype=torch.int32) if flags["HAS_ARGMAX"] else part_sum
    part_sq = torch.empty((num_splits, N), **f32) if flags["HAS_SQ"] else part_sum
    bias_or_any = bias if bias is not None else hidden
    scaling = {"HAS_BIAS": bias is not None, "SCALED": temperature != 1.0}
    _fused_linear_logprob_fwd_kernel[_grid_1d(lambda meta: triton.cdiv(N, meta["BLOCK_N"]) * num_splits)](
        hidden, weight, bias_or_any,
        part_max, part_sum, part_ent, part_zsum, part_arg, part_sq,
        N, V, K, _n_bucket(N), num_splits, split_v,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        temperature,
        **scaling, **flags, PRECISION=dot_precision(hidden.dtype),
    )  # fmt: skip

    out = {"logprob": torch.empty(N, **f32), "lse": torch.empty((2, N), **f32)}
    if with_entropy:
        out["entropy"] = torch.empty(N, **f32)
    for name in stats:
        out[name] = torch.empty(N, device=device, dtype=torch.bool if name == "is_argmax" else torch.float32)
    block_n = 32
    _fused_linear_logprob_merge_kernel[(triton.cdiv(N, block_n),)](
        hidden, weight, bias_or_any,
        part_max, part_sum, part_ent, part_zsum, part_arg, part_sq, targets,
        out["logprob"], out.get("entropy", part_sum), out["lse"][0], out["lse"][1], out.get("mean_logit", part_sum),
        out.get("is_argmax", part_sum), out.get("log_sum_sq_probs", part_sum),
        N, V, K, num_splits, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        temperature, ignore_index,
        **scaling, **flags, BLOCK_N=block_n, BLOCK_K=min(triton.next_power_of_2(K), 128),
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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dhidden, dweight, dbias), each None where `needs_grad` says so, in the inputs' dtypes.

    grad_logprob / grad_entropy: contiguous float32 [N] or None (no gradient reached that output). The logits gradient
    is recomputed by a Triton kernel into a buffer of at most `chunk_bytes`; cuBLAS turns each chunk into dH and dW,
    accumulating across chunks in fp32.
    """
    N, K = hidden.shape
    V = weight.shape[0]
    needs_h, needs_w, needs_b = needs_grad
    rows, cols = _chunk_sizes(N, V, hidden.element_size(), chunk_bytes)
    one_row_chunk, one_col_chunk = rows == N, cols == V
    # fp32 accumulators only where a gradient is summed over several chunks
    dh = _grad_buffer((N, K), hidden, accumulate=not one_col_chunk) if needs_h else None
    dw = _grad_buffer((V, K), weight, accumulate=not one_row_chunk) if needs_w else None
    db = torch.zeros(V, device=weight.device, dtype=torch.float32) if needs_b else None
    buffer = torch.empty(rows * cols, device=hidden.device, dtype=hidden.dtype)
    n_bucket = _n_bucket(rows)
    for r0 in range(0, N, rows):
        h_chunk = hidden[r0 : r0 + rows]
        n = h_chunk.shape[0]
        for v0 in range(0, V, cols):
            c = min(cols, V - v0)
            dlogits = buffer[: n * c].view(n, c)
            _fused_linear_logprob_bwd_kernel[
                _grid_1d(lambda meta: triton.cdiv(n, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_V"]))
            ](
                h_chunk, weight, bias if bias is not None else hidden, targets[r0:],
                lse[0, r0:], lse[1, r0:], entropy[r0:] if entropy is not None else hidden,
                grad_logprob[r0:] if grad_logprob is not None else hidden,
                grad_entropy[r0:] if grad_entropy is not None else hidden,
                dlogits,
                n, K, n_bucket, v0, c,
                h_chunk.stride(0), h_chunk.stride(1), weight.stride(0), weight.stride(1), dlogits.stride(0),
                temperature, ignore_index,
                HAS_BIAS=bias is not None, SCALED=temperature != 1.0, HAS_GRAD_LOGPROB=grad_logprob is not None,
                HAS_GRAD_ENTROPY=grad_entropy is not None, PRECISION=dot_precision(hidden.dtype),
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
