"""Fused linear loss, one row chunk at a time: the chunk's logits are computed once, and turned into d(loss)/d(logits)
in place, so the loss and both input gradients cost three GEMMs (logits, dH, dW) instead of four.

1. `fused_linear_loss_fwd`: fused_linear_logprob's persistent forward (work items of BLOCK_N rows x one vocabulary
   split, tl.dot tiles with an fp32 accumulator), whose epilogue also writes exp(z - t) of each [BLOCK_N, BLOCK_V]
   logits tile to the chunk's [n, V] buffer, t being the tile's per-row max, and t to a small fp32 side table;
   fused_linear_logprob's merge kernel combines the per-split statistics into log-probs, entropy, the requested
   statistics and each row's logsumexp.
2. The caller evaluates its loss on those and hands back d(loss)/d(logprob) and d(loss)/d(entropy) per row.
3. `fused_linear_loss_dlogits`: rewrites the buffer in place as d(loss)/d(logits), still in the input dtype.
4. The caller multiplies the buffer into dH and dW with cuBLAS (fp32 accumulation).

Why exp(z - tile max) in the buffer and not z (QuACK's idea): a bf16 logit carries an absolute error of |z| * 2^-9,
which becomes a relative error of the same size in p = exp(z - lse) (6 % at |z| = 30): the statistics come from fp32
logits, and the gradient should not lose what they keep. A value in [0, 1] keeps p's relative error at 2^-9 whatever
the logit scale, and log p = log(e) + (t - lse) keeps an absolute error of 2^-9 for the entropy gradient. It costs one
fp32 per row and BLOCK_V columns (under 2 % of a bf16 buffer at BLOCK_V = 128) and no extra exponential: the online
statistics are folded from the same per-tile values.
"""

import torch
import triton
import triton.language as tl

from . import fused_linear_logprob as logprob
from ._common import TiledKernel, divide_by_temperature, dot_precision, interpreting, persistent_programs
from .fused_linear_logprob import (
    INTERPRETER_TILE,
    _default_split_v,
    _fresh_stats,
    _fused_linear_logprob_merge_kernel,
    _item_span,
    _k_slice,
    _n_bucket,
    _persistent_grid,
    _row_targets,
    _scaled_logits,
    _store_stats,
    _tile,
)

# Elements per program of the element-wise kernels
_DLOGITS_ELEMENTS = 8192
_SCALE_BLOCK = 4096


# The forward's epilogue also stores a [BLOCK_N, BLOCK_V] buffer tile. At fused_linear_logprob's 128 x 128 tile that
# costs spills under Triton 3.6 (the GPU image's: 76-248 bytes a thread with entropy / argmax / every statistic;
# none under 3.9), and its fp32 tile spills 40 bytes there; these two are spill-free under both (sm90 compile tests).
PINNED_16BIT = _tile(128, 64, 64, 8, 3)
PINNED_FP32 = _tile(64, 64, 32, 8, 3)
# What POSTTRAIN_AUTOTUNE=1 tries: the pinned tile, then fused_linear_logprob's (none of the two-slice wide tiles: the
# buffer store is [BLOCK_N, BLOCK_V])
CANDIDATE_TILES = {
    "16bit": (PINNED_16BIT, *logprob.CANDIDATE_TILES["16bit"]),
    "fp32": (PINNED_FP32, *logprob.CANDIDATE_TILES["fp32"]),
}


def pinned_tile(dtype: torch.dtype) -> triton.Config:
    """The forward kernel's tile for `dtype` inputs unless POSTTRAIN_AUTOTUNE=1 or the launcher is given `config`."""
    if interpreting():
        return INTERPRETER_TILE
    return PINNED_FP32 if dtype == torch.float32 else PINNED_16BIT


def _candidates(args: dict) -> tuple[triton.Config, ...]:
    if interpreting():
        return (INTERPRETER_TILE,)
    return CANDIDATE_TILES["fp32" if args["h_ptr"].dtype == torch.float32 else "16bit"]


@triton.jit
def _fold_tile_into_buffer(acc, b_ptr, exp_ptr, tile_max_ptr, offs_n, v0, v_stop, N, V, stride_en, tgt, m, s, tgt_z,
                           ent, zsum, arg, sq, temperature, HAS_BIAS: tl.constexpr, SCALED: tl.constexpr,
                           HAS_ENTROPY: tl.constexpr, HAS_MEAN: tl.constexpr, HAS_ARGMAX: tl.constexpr,
                           HAS_SQ: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    # Writes exp(z - t) of the logits of columns [v0, v0 + BLOCK_V) (those < v_stop), t = the tile's per-row max, and
    # t to the side table; then folds the tile into the online statistics (fused_linear_logprob's, relative to the
    # running max m). The tile's sums are taken relative to t, so one exponential per logit serves the buffer and the
    # statistics, and are rebased onto m_new with beta = exp(t - m_new).
    offs_v = v0 + tl.arange(0, BLOCK_V)
    v_mask = offs_v < v_stop
    n_mask = offs_n < N
    z = _scaled_logits(acc, b_ptr, offs_v % V, temperature, HAS_BIAS, SCALED)
    z = tl.where(v_mask[None, :], z, float("-inf"))
    t = tl.max(z, axis=1)
    shifted = tl.where(v_mask[None, :], z - t[:, None], 0.0)
    e = tl.where(v_mask[None, :], tl.exp(shifted), 0.0)
    exp_ptrs = exp_ptr + offs_n.to(tl.int64)[:, None] * stride_en + offs_v[None, :]
    tl.store(exp_ptrs, e.to(exp_ptr.dtype.element_ty), mask=n_mask[:, None] & v_mask[None, :])
    tl.store(tile_max_ptr + offs_n.to(tl.int64) * tl.cdiv(V, BLOCK_V) + v0 // BLOCK_V, t, mask=n_mask)
    # the target's logit from the very tile that feeds the max and the sum (log p = 0 exactly when V = 1)
    is_tgt = (offs_v[None, :] == tgt[:, None]) & v_mask[None, :]
    tgt_z += tl.sum(tl.where(is_tgt, z, 0.0), axis=1)
    m_new = tl.maximum(m, t)
    alpha = tl.exp(m - m_new)
    beta = tl.exp(t - m_new)
    tile_sum = tl.sum(e, axis=1)
    if HAS_ENTROPY:
        # moving the reference point from m to m_new shifts every (z - m) by (m - m_new); s = 0 on the first tile
        rebased = ent + tl.where(s > 0, (m - m_new) * s, 0.0)
        ent = alpha * rebased + beta * (tl.sum(e * shifted, axis=1) + (t - m_new) * tile_sum)
    s = alpha * s + beta * tile_sum
    if HAS_MEAN:
        zsum += tl.sum(tl.where(v_mask[None, :], z, 0.0), axis=1)
    if HAS_ARGMAX:
        # strict '>' keeps the earlier tile on ties: the first maximum, as torch.argmax
        tile_arg = tl.argmax(z, axis=1, tie_break_left=True).to(tl.int32)
        arg = tl.where(t > m, v0 + tile_arg, arg)
    if HAS_SQ:
        sq = alpha * alpha * sq + beta * beta * tl.sum(e * e, axis=1)
    return m_new, s, tgt_z, ent, zsum, arg, sq


@triton.jit(do_not_specialize=["N", "N_BUCKET", "num_splits"])
def _fused_linear_loss_fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    tgt_ptr,
    exp_ptr,
    tile_max_ptr,
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
    stride_en,
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
    # fused_linear_logprob's persistent forward (items = row block x vocabulary split; a program runs all its tiles'
    # K steps as one flat loop, so the next tile's loads overlap this tile's epilogue), with the buffer written by the
    # epilogue. The per-split statistics keep that kernel's layout, and its merge kernel combines them.
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_row_blocks = tl.cdiv(N, BLOCK_N)
    num_items = num_row_blocks * num_splits
    k_steps = tl.cdiv(K, BLOCK_K)
    steps = 0
    for item in range(pid, num_items, num_programs):
        _rb, _sp, v_start, v_stop = _item_span(item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
        steps += tl.cdiv(v_stop - v_start, BLOCK_V) * k_steps

    # loader state (the tile the next K step reads) and epilogue state (the tile the accumulator holds)
    k = k_steps - 1
    item = pid - num_programs
    row0 = 0
    v = 0
    v_stop = 0
    e_item = pid
    row_block, split, e_v, e_v_stop = _item_span(pid, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
    offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    tgt = _row_targets(tgt_ptr, row_block * BLOCK_N, N, BLOCK_N)
    m, s, tgt_z, ent, zsum, arg, sq = _fresh_stats(BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for _step in range(steps):
        k = tl.where(k == k_steps - 1, 0, k + 1)
        if k == 0:
            v += BLOCK_V
            if v >= v_stop:
                item += num_programs
                next_rows, _sp, v, v_stop = _item_span(item, num_items, num_row_blocks, num_splits, split_v, V, GROUP_N)
                row0 = next_rows * BLOCK_N
        rows = (row0 + tl.arange(0, BLOCK_N)) % N
        cols = (v + tl.arange(0, BLOCK_V)) % V
        h, w = _k_slice(h_ptr, w_ptr, rows, cols, k * BLOCK_K, K, stride_hn, stride_hk, stride_wv, stride_wk, EVEN_K,
                        BLOCK_K)  # fmt: skip
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
        if k == k_steps - 1:
            m, s, tgt_z, ent, zsum, arg, sq = _fold_tile_into_buffer(
                acc, b_ptr, exp_ptr, tile_max_ptr, offs_n, e_v, e_v_stop, N, V, stride_en, tgt,
                m, s, tgt_z, ent, zsum, arg, sq, temperature,
                HAS_BIAS, SCALED, HAS_ENTROPY, HAS_MEAN, HAS_ARGMAX, HAS_SQ, BLOCK_V,
            )  # fmt: skip
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            e_v += BLOCK_V
            if e_v >= e_v_stop:
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
                offs_n = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
                tgt = _row_targets(tgt_ptr, row_block * BLOCK_N, N, BLOCK_N)


_TILES = (INTERPRETER_TILE, *CANDIDATE_TILES["16bit"], *CANDIDATE_TILES["fp32"])
# Splits are multiples of every BLOCK_V, so a tile never straddles two splits and tile i covers [i, i + 1) * BLOCK_V.
_SPLIT_GRANULE = max(c.kwargs["BLOCK_V"] for c in _TILES)
# Only the forward kernel is tiled (pinned or autotuned): it is idempotent, while the dlogits kernel rewrites its input.
_fwd = TiledKernel(
    _fused_linear_loss_fwd_kernel,
    pinned=pinned_tile,
    tiles=_TILES,
    usable=_candidates,
    key=["K", "V", "N_BUCKET", "HAS_BIAS", "SCALED", "PRECISION", "HAS_ENTROPY", "HAS_MEAN", "HAS_ARGMAX", "HAS_SQ"],
    derived={"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0},
    dtype_arg="h_ptr",
)


@triton.jit(do_not_specialize=["N"])
def _fused_linear_loss_dlogits_kernel(
    buf_ptr,
    tile_max_ptr,
    max_ptr,
    log_sum_ptr,
    ent_ptr,
    tgt_ptr,
    grad_logprob_ptr,
    grad_entropy_ptr,
    N,
    V,
    stride_bn,
    temperature,
    ignore_index,
    SCALED: tl.constexpr,
    HAS_GRAD_LOGPROB: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILE_V: tl.constexpr,
):
    # One program per BLOCK_N rows and one forward tile (TILE_V columns), so each row has a single tile max.
    tile = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = tile * TILE_V + tl.arange(0, TILE_V)
    n_mask = offs_n < N
    mask = n_mask[:, None] & (offs_v < V)[None, :]
    ptrs = buf_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_v[None, :]
    e = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(tile_max_ptr + offs_n.to(tl.int64) * tl.cdiv(V, TILE_V) + tile, mask=n_mask, other=0.0)
    row_max = tl.load(max_ptr + offs_n, mask=n_mask, other=0.0)
    # log p = log e + shift, and shift <= 0
    shift = (t - row_max) - tl.load(log_sum_ptr + offs_n, mask=n_mask, other=0.0)
    p = e * tl.exp(shift)[:, None]
    tgt = tl.load(tgt_ptr + offs_n, mask=n_mask, other=ignore_index)
    valid = tgt != ignore_index
    grad = tl.zeros((BLOCK_N, TILE_V), tl.float32)
    if HAS_GRAD_LOGPROB:
        # d log p_t / dz_v = [v == t] - p_v
        g = tl.where(valid, tl.load(grad_logprob_ptr + offs_n, mask=n_mask, other=0.0), 0.0)
        grad += g[:, None] * ((offs_v[None, :] == tgt[:, None]).to(tl.float32) - p)
    if HAS_GRAD_ENTROPY:
        # d entropy / dz_v = -p_v * (log p_v + entropy); p_v log p_v -> 0 where e underflowed to 0
        g = tl.where(valid, tl.load(grad_entropy_ptr + offs_n, mask=n_mask, other=0.0), 0.0)
        ent = tl.load(ent_ptr + offs_n, mask=n_mask, other=0.0)
        log_p = tl.log(tl.where(e > 0, e, 1.0)) + shift[:, None]
        grad -= g[:, None] * tl.where(e > 0, p * (log_p + ent[:, None]), 0.0)
    grad = divide_by_temperature(grad, temperature, SCALED)
    tl.store(ptrs, grad.to(buf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_kernel(x_ptr, out_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (x * tl.load(scale_ptr).to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


def exp_buffer(rows: int, vocab: int, like: torch.Tensor) -> torch.Tensor:
    """The [rows, vocab] buffer `fused_linear_loss_fwd` fills, in `like`'s dtype and on its device. Rows are padded
    to 16 elements, so each starts 16-byte aligned (vector stores, cuBLAS's preferred leading dimension)."""
    row_stride = triton.cdiv(vocab, 16) * 16
    return torch.empty((rows, row_stride), device=like.device, dtype=like.dtype)[:, :vocab]


def fused_linear_loss_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    buffer: torch.Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    stats: tuple[str, ...] = (),
    num_programs: int | None = None,
    config: triton.Config | None = None,
) -> dict:
    """Forward of one row chunk. hidden [n, K], weight [V, K] (one dtype), targets [n] int64, buffer: an
    `exp_buffer` of at least n rows. num_programs: the persistent grid's size (default: one per SM). config: a tile
    to run instead of the pinned / autotuned one.

    Returns float32 [n] "logprob", "entropy" with with_entropy, each of `stats` ("mean_logit", the bool "is_argmax",
    "log_sum_sq_probs"); ignored rows hold 0 / False. For `fused_linear_loss_dlogits`: "lse" [2, n] (row max,
    log-sum), "tile_max" and "tile_v". buffer[:n] then holds exp(z - tile max) of the temperature-scaled logits z.
    """
    n, K = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    programs = num_programs or persistent_programs(device)
    split_v = _default_split_v(n, V, programs, (config or pinned_tile(hidden.dtype)).kwargs["BLOCK_N"])
    split_v = triton.cdiv(split_v, _SPLIT_GRANULE) * _SPLIT_GRANULE
    num_splits = triton.cdiv(V, split_v)
    f32 = {"device": device, "dtype": torch.float32}
    flags = {"HAS_ENTROPY": with_entropy, "HAS_MEAN": "mean_logit" in stats, "HAS_ARGMAX": "is_argmax" in stats,
             "HAS_SQ": "log_sum_sq_probs" in stats}  # fmt: skip
    parts = {name: torch.empty((num_splits, n), **f32) for name in ("max", "sum", "tgt")}
    for name, flag in (("ent", "HAS_ENTROPY"), ("zsum", "HAS_MEAN"), ("sq", "HAS_SQ")):
        parts[name] = torch.empty((num_splits, n), **f32) if flags[flag] else parts["sum"]
    parts["arg"] = (
        torch.empty((num_splits, n), device=device, dtype=torch.int32) if flags["HAS_ARGMAX"] else parts["sum"]
    )
    if config is None and _fwd.tuner is None:
        config = pinned_tile(hidden.dtype)
    # one max per row and forward tile; an autotuned launch may pick any tile, so size for the narrowest
    block_v = config.kwargs["BLOCK_V"] if config is not None else min(c.kwargs["BLOCK_V"] for c in _TILES)
    tile_max = torch.empty(n * triton.cdiv(V, block_v), **f32)
    _fwd(
        _persistent_grid(programs, lambda meta: triton.cdiv(n, meta["BLOCK_N"]) * num_splits),
        hidden, weight, bias if bias is not None else hidden, targets, buffer, tile_max,
        parts["max"], parts["sum"], parts["tgt"], parts["ent"], parts["zsum"], parts["arg"], parts["sq"],
        n, V, K, _n_bucket(n), num_splits, split_v,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), buffer.stride(0), temperature,
        HAS_BIAS=bias is not None, SCALED=temperature != 1.0, **flags, PRECISION=dot_precision(hidden.dtype),
        config=config,
    )  # fmt: skip

    out = {"logprob": torch.empty(n, **f32), "lse": torch.empty((2, n), **f32)}
    if with_entropy:
        out["entropy"] = torch.empty(n, **f32)
    for name in stats:
        out[name] = torch.empty(n, device=device, dtype=torch.bool if name == "is_argmax" else torch.float32)
    block_n = 128
    _fused_linear_logprob_merge_kernel[(triton.cdiv(n, block_n),)](
        part_max_ptr=parts["max"], part_sum_ptr=parts["sum"], part_tgt_ptr=parts["tgt"], part_ent_ptr=parts["ent"],
        part_zsum_ptr=parts["zsum"], part_arg_ptr=parts["arg"], part_sq_ptr=parts["sq"], tgt_ptr=targets,
        logprob_ptr=out["logprob"], entropy_ptr=out.get("entropy", parts["sum"]), max_ptr=out["lse"][0],
        log_sum_ptr=out["lse"][1], mean_logit_ptr=out.get("mean_logit", parts["sum"]),
        is_argmax_ptr=out.get("is_argmax", parts["sum"]), log_sum_sq_ptr=out.get("log_sum_sq_probs", parts["sum"]),
        N=n, V=V, num_splits=num_splits, ignore_index=ignore_index, **flags, BLOCK_N=block_n,
    )  # fmt: skip
    out["tile_max"] = tile_max
    out["tile_v"] = (config or _fwd.tuner.best_config).kwargs["BLOCK_V"]
    return out


def fused_linear_loss_dlogits(
    buffer: torch.Tensor,
    fwd: dict,
    targets: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
) -> torch.Tensor:
    """Rewrite buffer[:n] (as left by `fused_linear_loss_fwd`, whose output dict is `fwd`) in place as
    d(loss)/d(logits) for d(loss)/d(logprob) = grad_logprob and d(loss)/d(entropy) = grad_entropy (contiguous float32
    [n], or None for no gradient). Ignored rows get 0. Returns the [n, V] view."""
    n, V = targets.shape[0], buffer.shape[1]
    tile_v = fwd["tile_v"]
    block_n = 16 if interpreting() else max(1, _DLOGITS_ELEMENTS // tile_v)
    lse = fwd["lse"]
    entropy = fwd.get("entropy", lse[0])
    _fused_linear_loss_dlogits_kernel[(triton.cdiv(n, block_n), triton.cdiv(V, tile_v))](
        buffer, fwd["tile_max"], lse[0], lse[1], entropy, targets,
        grad_logprob if grad_logprob is not None else lse[0], grad_entropy if grad_entropy is not None else lse[0],
        n, V, buffer.stride(0), temperature, ignore_index,
        SCALED=temperature != 1.0, HAS_GRAD_LOGPROB=grad_logprob is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_N=block_n, TILE_V=tile_v, num_warps=8,
    )  # fmt: skip
    return buffer[:n]


def scale(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x * factor computed in fp32 and rounded once to x's dtype; factor is a one-element tensor on x's device, read
    on the device (no host sync). torch would round a 0-dim fp32 factor to x's bf16 before multiplying."""
    x = x.contiguous()
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        _scale_kernel[(triton.cdiv(numel, _SCALE_BLOCK),)](x, out, factor, numel, BLOCK=_SCALE_BLOCK, num_warps=4)
    return out
