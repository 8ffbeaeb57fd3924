"""GRPO kernels: group-normalized advantages (and RLOO's leave-one-out ones), and the clipped policy-gradient loss of
TRL's GRPOTrainer per sequence.

Advantages: a single program walks the [B, R] rewards group block by group block. Everything is NaN-aware: a reward
function that returned None is NaN, and padding is loaded as NaN so it drops out of every statistic by itself. The
batch-level statistics ("batch" scaling, normalize_then_sum, RLOO's normalize_advantages) need the whole batch before
any advantage can be written, so the program makes two extra sweeps (sum, then squared deviations) and recomputes the
cheap per-row rewards each time instead of staging them in memory.

Loss: one program per sequence loops over its tokens and writes per-sequence sums (loss, mask, KL, clip counts); the
loss-type-specific aggregation of those [B] vectors is left to torch, so its autograd provides the per-sequence
gradient scale and the backward kernel only needs d(loss)/d(row sum). With importance_sampling_level="sequence" the
ratio couples every token of a row; the forward also stores sum_t mask_t * d(per-token loss_t)/d(ratio), which makes
the backward a single sweep. VESPO's per-sequence weight needs the row's summed log-ratio before any token's loss, so
it takes the same extra first sweep. Masked-out tokens are never read (their loads are masked off), so whatever they
hold (NaN, inf) cannot reach a sum.
"""

import torch
import triton
import triton.language as tl

from posttrain.ops.grpo_loss import VESPO_LAMBDA_FLOOR, VESPO_LOG_W_RANGE, VESPO_TOKEN_LOG_RATIO_LIMIT

from ._common import interpreting

SCALE_CODES = {"none": 0, "group": 1, "batch": 2}
# Every clipped-surrogate loss type shares one per-token formula; they differ only in the torch-side aggregation
LOSS_CODES = {"grpo": 0, "bnpo": 0, "dr_grpo": 0, "dapo": 0, "luspo": 0, "cispo": 1, "sapo": 2, "vespo": 3}
# Elements per advantages tile ([groups, generations, reward functions])
ADV_TILE_ELEMENTS = 4096
# jit code may only read constexpr globals
FLT_MAX = tl.constexpr(3.4028234663852886e38)
VESPO_LOG_W_MIN = tl.constexpr(VESPO_LOG_W_RANGE[0])
VESPO_LOG_W_MAX = tl.constexpr(VESPO_LOG_W_RANGE[1])
VESPO_TOKEN_LOG_RATIO_MAX = tl.constexpr(VESPO_TOKEN_LOG_RATIO_LIMIT)
VESPO_LAMBDA_MIN = tl.constexpr(VESPO_LAMBDA_FLOOR)


@triton.jit
def _not_nan(x):
    return x == x  # noqa: PLR0124 (NaN is the one value unequal to itself)


@triton.jit
def _nan_mean_std(x, AXIS: tl.constexpr):
    # NaN-aware mean and Bessel-corrected std along AXIS (kept as size 1); both NaN without data, std NaN for one value
    valid = _not_nan(x)
    count = tl.sum(valid.to(tl.float32), axis=AXIS, keep_dims=True)
    mean = tl.sum(tl.where(valid, x, 0.0), axis=AXIS, keep_dims=True) / count
    dev = tl.where(valid, x - mean, 0.0)
    var = tl.sum(dev * dev, axis=AXIS, keep_dims=True) / (count - 1.0)
    std = tl.where(count > 1.0, tl.sqrt(var), float("nan"))
    return mean, std


@triton.jit
def _combined_rewards(
    r_ptr,
    w_ptr,
    g0,
    G,
    N,
    R,
    stride_b,
    stride_r,
    std_eps,
    NORMALIZE_FIRST: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # One reward per completion of groups [g0, g0 + BLOCK_G): the weighted NaN-ignoring sum over reward functions
    # (after per-group normalization of each function with NORMALIZE_FIRST), NaN when every function returned None.
    offs_g = g0 + tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rows = offs_g[:, None] * N + offs_n[None, :]
    row_ok = (offs_g[:, None] < G) & (offs_n[None, :] < N)
    ptrs = r_ptr + rows.to(tl.int64)[:, :, None] * stride_b + offs_r[None, None, :] * stride_r
    x = tl.load(ptrs, mask=row_ok[:, :, None] & (offs_r < R)[None, None, :], other=float("nan")).to(tl.float32)
    w = tl.load(w_ptr + offs_r, mask=offs_r < R, other=0.0)
    scorable = tl.sum(_not_nan(x).to(tl.int32), axis=2) > 0
    if NORMALIZE_FIRST:
        mean_k, std_k = _nan_mean_std(x, 1)
        x = (x - mean_k) / (std_k + std_eps)
    weighted = x * w[None, None, :]
    total = tl.sum(tl.where(_not_nan(weighted), weighted, 0.0), axis=2)
    return tl.where(scorable, total, float("nan")), rows, row_ok


@triton.jit
def _grpo_advantages_kernel(
    r_ptr,
    w_ptr,
    adv_ptr,
    std_ptr,
    G,
    N,
    R,
    stride_b,
    stride_r,
    std_eps,
    SCALE: tl.constexpr,
    NORMALIZE_FIRST: tl.constexpr,
    BATCH_STATS: tl.constexpr,
    WRITE_STD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    batch_mean = 0.0
    batch_std = 0.0
    if BATCH_STATS:
        # Two-pass mean / variance over the whole batch: a one-pass sum of squares cancels badly for rewards ~1e3
        acc = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        cnt = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        for g0 in range(0, G, BLOCK_G):
            rew, rows, row_ok = _combined_rewards(
                r_ptr, w_ptr, g0, G, N, R, stride_b, stride_r, std_eps, NORMALIZE_FIRST, BLOCK_G, BLOCK_N, BLOCK_R
            )
            acc += tl.where(_not_nan(rew), rew, 0.0)
            cnt += _not_nan(rew).to(tl.float32)
        count = tl.sum(tl.sum(cnt, axis=1), axis=0)
        batch_mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        acc = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        for g0 in range(0, G, BLOCK_G):
            rew, rows, row_ok = _combined_rewards(
                r_ptr, w_ptr, g0, G, N, R, stride_b, stride_r, std_eps, NORMALIZE_FIRST, BLOCK_G, BLOCK_N, BLOCK_R
            )
            dev = tl.where(_not_nan(rew), rew - batch_mean, 0.0)
            acc += dev * dev
        var = tl.sum(tl.sum(acc, axis=1), axis=0) / (count - 1.0)
        batch_std = tl.where(count > 1.0, tl.sqrt(var), float("nan"))

    for g0 in range(0, G, BLOCK_G):
        rew, rows, row_ok = _combined_rewards(
            r_ptr, w_ptr, g0, G, N, R, stride_b, stride_r, std_eps, NORMALIZE_FIRST, BLOCK_G, BLOCK_N, BLOCK_R
        )
        zeros = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        if NORMALIZE_FIRST:
            adv = (rew - batch_mean) / (batch_std + std_eps)
            std = zeros + batch_std
        else:
            group_mean, group_std = _nan_mean_std(rew, 1)
            adv = rew - group_mean
            if SCALE == 1:
                adv = adv / (group_std + std_eps)
                std = zeros + group_std
            elif SCALE == 2:
                adv = adv / (batch_std + std_eps)
                std = zeros + batch_std
            else:
                std = zeros + group_std
        # torch.nan_to_num(nan=0.0): NaN (unscorable completion or group) -> 0, +-inf -> +-FLT_MAX
        adv = tl.where(_not_nan(adv), adv, 0.0)
        adv = tl.minimum(tl.maximum(adv, -FLT_MAX), FLT_MAX)
        tl.store(adv_ptr + rows, adv, mask=row_ok)
        if WRITE_STD:
            tl.store(std_ptr + rows, std, mask=row_ok)


def grpo_advantages_fwd(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str,
    normalize_then_sum: bool,
    return_std: bool,
    std_eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the advantages kernel. rewards [B, R] float (NaN = no reward), weights [R] float32 contiguous; std_eps is
    added to every standard deviation before dividing by it.

    B must be a multiple of num_generations. Returns float32 [B] advantages and, with return_std, the float32 [B]
    standard deviation each advantage was (or, for scale_rewards="none", would have been) divided by.
    """
    B, R = rewards.shape
    G = B // num_generations
    adv = torch.empty(B, device=rewards.device, dtype=torch.float32)
    std = torch.empty(B, device=rewards.device, dtype=torch.float32) if return_std else adv
    if B == 0:
        return adv, std if return_std else None
    block_n = triton.next_power_of_2(num_generations)
    block_r = triton.next_power_of_2(max(R, 1))
    block_g = max(1, min(triton.next_power_of_2(G), ADV_TILE_ELEMENTS // (block_n * block_r)))
    batch_stats = normalize_then_sum or scale_rewards == "batch"
    _grpo_advantages_kernel[(1,)](
        rewards, weights, adv, std,
        G, num_generations, R, rewards.stride(0), rewards.stride(1), float(std_eps),
        SCALE=SCALE_CODES[scale_rewards], NORMALIZE_FIRST=normalize_then_sum, BATCH_STATS=batch_stats,
        WRITE_STD=return_std, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=4 if block_g * block_n * block_r <= 1024 else 8,
    )  # fmt: skip
    return adv, std if return_std else None


@triton.jit
def _leave_one_out(
    r_ptr,
    w_ptr,
    kl_ptr,
    g0,
    G,
    N,
    R,
    stride_b,
    stride_r,
    clip_low,
    clip_high,
    beta,
    HAS_CLIP: tl.constexpr,
    HAS_KL: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # RLOO's reward per completion of groups [g0, g0 + BLOCK_G) (weighted sum, clipped, minus beta x KL; NaN when
    # unscorable) and its advantage over the mean of the group's other scorable completions (NaN without any)
    rew, rows, row_ok = _combined_rewards(
        r_ptr, w_ptr, g0, G, N, R, stride_b, stride_r, 0.0, False, BLOCK_G, BLOCK_N, BLOCK_R
    )
    if HAS_CLIP:
        # tl.minimum / tl.maximum may drop a NaN: keep unscorable rewards NaN explicitly
        rew = tl.where(_not_nan(rew), tl.minimum(tl.maximum(rew, clip_low), clip_high), rew)
    if HAS_KL:
        rew = rew - beta * tl.load(kl_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    valid = _not_nan(rew)
    count = tl.sum(valid.to(tl.float32), axis=1, keep_dims=True)
    total = tl.sum(tl.where(valid, rew, 0.0), axis=1, keep_dims=True)
    adv = rew - (total - rew) / (count - 1.0)
    return adv, rew, rows, row_ok


@triton.jit
def _rloo_advantages_kernel(
    r_ptr,
    w_ptr,
    kl_ptr,
    adv_ptr,
    std_ptr,
    G,
    N,
    R,
    stride_b,
    stride_r,
    clip_low,
    clip_high,
    beta,
    std_eps,
    HAS_CLIP: tl.constexpr,
    HAS_KL: tl.constexpr,
    NORMALIZE: tl.constexpr,
    WRITE_STD: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    batch_mean = 0.0
    batch_std = 1.0
    if NORMALIZE:
        # Two sweeps for the batch mean and std of the advantages, recomputed rather than staged (see the docstring)
        acc = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        cnt = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        for g0 in range(0, G, BLOCK_G):
            adv, rew, rows, row_ok = _leave_one_out(
                r_ptr, w_ptr, kl_ptr, g0, G, N, R, stride_b, stride_r, clip_low, clip_high, beta, HAS_CLIP, HAS_KL,
                BLOCK_G, BLOCK_N, BLOCK_R,
            )  # fmt: skip
            acc += tl.where(_not_nan(adv), adv, 0.0)
            cnt += _not_nan(adv).to(tl.float32)
        count = tl.sum(tl.sum(cnt, axis=1), axis=0)
        batch_mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
        acc = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
        for g0 in range(0, G, BLOCK_G):
            adv, rew, rows, row_ok = _leave_one_out(
                r_ptr, w_ptr, kl_ptr, g0, G, N, R, stride_b, stride_r, clip_low, clip_high, beta, HAS_CLIP, HAS_KL,
                BLOCK_G, BLOCK_N, BLOCK_R,
            )  # fmt: skip
            dev = tl.where(_not_nan(adv), adv - batch_mean, 0.0)
            acc += dev * dev
        var = tl.sum(tl.sum(acc, axis=1), axis=0) / (count - 1.0)
        batch_std = tl.where(count > 1.0, tl.sqrt(var), float("nan")) + std_eps

    for g0 in range(0, G, BLOCK_G):
        adv, rew, rows, row_ok = _leave_one_out(
            r_ptr, w_ptr, kl_ptr, g0, G, N, R, stride_b, stride_r, clip_low, clip_high, beta, HAS_CLIP, HAS_KL,
            BLOCK_G, BLOCK_N, BLOCK_R,
        )  # fmt: skip
        if NORMALIZE:
            adv = (adv - batch_mean) / batch_std
        adv = tl.where(_not_nan(adv), adv, 0.0)
        adv = tl.minimum(tl.maximum(adv, -FLT_MAX), FLT_MAX)
        tl.store(adv_ptr + rows, adv, mask=row_ok)
        if WRITE_STD:
            group_std = _nan_mean_std(rew, 1)[1]
            tl.store(std_ptr + rows, tl.zeros((BLOCK_G, BLOCK_N), tl.float32) + group_std, mask=row_ok)


def rloo_advantages_fwd(
    rewards: torch.Tensor,
    weights: torch.Tensor,
    kl: torch.Tensor | None,
    num_generations: int,
    clip_range: tuple[float, float] | None,
    beta: float,
    normalize: bool,
    return_std: bool,
    std_eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the RLOO advantages kernel. rewards [B, R] float (NaN = no reward), weights [R] float32 contiguous, kl
    [B] contiguous or None; std_eps is added to the batch std with `normalize`.

    B must be a multiple of num_generations. Returns float32 [B] advantages and, with return_std, the float32 [B] std
    of each completion's group of (clipped, KL-penalized) rewards.
    """
    B, R = rewards.shape
    G = B // num_generations
    adv = torch.empty(B, device=rewards.device, dtype=torch.float32)
    std = torch.empty(B, device=rewards.device, dtype=torch.float32) if return_std else adv
    if B == 0:
        return adv, std if return_std else None
    block_n = triton.next_power_of_2(num_generations)
    block_r = triton.next_power_of_2(max(R, 1))
    block_g = max(1, min(triton.next_power_of_2(G), ADV_TILE_ELEMENTS // (block_n * block_r)))
    low, high = clip_range if clip_range is not None else (0.0, 0.0)
    _rloo_advantages_kernel[(1,)](
        rewards, weights, kl if kl is not None else adv, adv, std,
        G, num_generations, R, rewards.stride(0), rewards.stride(1), float(low), float(high), float(beta),
        float(std_eps), HAS_CLIP=clip_range is not None, HAS_KL=kl is not None, NORMALIZE=normalize,
        WRITE_STD=return_std, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_R=block_r,
        num_warps=4 if block_g * block_n * block_r <= 1024 else 8,
    )  # fmt: skip
    return adv, std if return_std else None


@triton.jit
def _vespo_phi(seq_log_ratio, adv, k_pos, lam_pos, k_neg, lam_neg):
    # VESPO's gamma weight phi(w) = e^lam w^k e^(-lam w) of the clamped sequence ratio w, in log space; NaN or inf
    # gives 0 (TRL's nan_to_num). The lambda floor is TRL's.
    log_w = tl.minimum(tl.maximum(seq_log_ratio, VESPO_LOG_W_MIN), VESPO_LOG_W_MAX)
    k = tl.where(adv >= 0, k_pos, k_neg)
    lam = tl.maximum(tl.where(adv >= 0, lam_pos, lam_neg), VESPO_LAMBDA_MIN)
    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
    # tl.maximum / tl.minimum may drop a NaN: the unclamped ratio decides
    return tl.where(_not_nan(seq_log_ratio) & (phi < float("inf")), phi, 0.0)


@triton.jit
def _policy_term(
    c, adv, logp, phi, eps_low, eps_high, delta, t_pos, t_neg, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr
):
    # Per-token policy loss at importance ratio c, and its gradient: d/d(logp) for cispo and vespo (whose weights are
    # detached), d/d(c) otherwise.
    if LOSS == 1:
        w = tl.minimum(c, eps_high)
        loss = -w * adv * logp
        grad = -w * adv
    elif LOSS == 2:
        temp = tl.where(adv > 0, t_pos, t_neg)
        gate = tl.sigmoid(temp * (c - 1.0))
        loss = -gate * (4.0 / temp) * adv
        grad = -4.0 * adv * gate * (1.0 - gate)
    elif LOSS == 3:
        loss = -phi * adv * logp
        grad = -phi * adv
    else:
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        c1 = c
        d1 = 1.0
        if HAS_DELTA:
            # clamp(max=delta) passes the gradient at c == delta, as torch.clamp does
            d1 = tl.where(c <= delta, 1.0, 0.0)
            c1 = tl.minimum(c, delta)
        c2 = tl.minimum(tl.maximum(c, lo), hi)
        d2 = tl.where((c >= lo) & (c <= hi), 1.0, 0.0)
        a = c1 * adv
        b = c2 * adv
        loss = -tl.minimum(a, b)
        # torch.minimum sends half the gradient to each side on a tie (the unclipped case: c1 == c2 == c)
        grad = -adv * tl.where(a < b, d1, tl.where(a > b, d2, 0.5 * (d1 + d2)))
    return loss, grad


@triton.jit
def _clip_flags(c, adv, eps_low, eps_high, delta, LOSS: tl.constexpr, HAS_DELTA: tl.constexpr):
    # TRL's is_low_clipped / is_high_clipped as 0/1 floats; the clipped-surrogate ones look at the delta-capped ratio
    # (nested where, not `&`: the interpreter cannot `&` a per-sequence scalar with a per-token vector)
    if LOSS == 1:
        high = tl.where(adv > 0, tl.where(c > eps_high, 1.0, 0.0), 0.0)
        low = high * 0.0  # cispo only clips from above
    else:
        c1 = c
        if LOSS == 0 and HAS_DELTA:
            c1 = tl.minimum(c, delta)
        low = tl.where(adv < 0, tl.where(c1 < 1.0 - eps_low, 1.0, 0.0), 0.0)
        high = tl.where(adv > 0, tl.where(c1 > 1.0 + eps_high, 1.0, 0.0), 0.0)
    return low, high


@triton.jit
def _load_row_tile(ptr, stride_t, offs, valid):
    # masked-out tokens read as 0 whatever they hold (NaN, inf): selected away, never multiplied by a 0 mask
    return tl.load(ptr + offs * stride_t, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _token_tile(
    t0, T, mask_row, logp_row, old_row, stride_mt, stride_lt, stride_ot, c_seq, SEQ: tl.constexpr, BLOCK_T: tl.constexpr
):
    # Tokens [t0, t0 + BLOCK_T) of a row: offsets, bounds, the unmasked tokens, mask, log-probs and importance ratio
    # (the sequence's at SEQ)
    offs = t0 + tl.arange(0, BLOCK_T)
    in_row = offs < T
    m = _load_row_tile(mask_row, stride_mt, offs, in_row)
    valid = in_row & (m != 0.0)
    logp = _load_row_tile(logp_row, stride_lt, offs, valid)
    if SEQ:
        c = c_seq
    else:
        c = tl.exp(logp - _load_row_tile(old_row, stride_ot, offs, valid))
    return offs, in_row, valid, m, logp, c


@triton.jit
def _row_prologue(
    row, T, adv, mask_row, logp_row, old_row, log_is_ptr, stride_mt, stride_lt, stride_ot,
    k_pos, lam_pos, k_neg, lam_neg, LOSS: tl.constexpr, SEQ: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # One sweep over the row for what couples its tokens: the token count and sequence ratio (SEQ), VESPO's weight
    acc_lr = tl.zeros((BLOCK_T,), tl.float32)
    acc_vlr = tl.zeros((BLOCK_T,), tl.float32)
    acc_m = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + tl.arange(0, BLOCK_T)
        in_row = offs < T
        m = _load_row_tile(mask_row, stride_mt, offs, in_row)
        valid = in_row & (m != 0.0)
        lr = _load_row_tile(logp_row, stride_lt, offs, valid) - _load_row_tile(old_row, stride_ot, offs, valid)
        acc_lr += lr * m
        acc_m += m
        if LOSS == 3:
            # TRL clamps each token's log-ratio to [-20, 20]; a NaN must survive the clamp (max / min may drop it)
            clamped = tl.minimum(tl.maximum(lr, -VESPO_TOKEN_LOG_RATIO_MAX), VESPO_TOKEN_LOG_RATIO_MAX)
            acc_vlr += tl.where(_not_nan(lr), clamped, lr) * m
    tokens = tl.sum(acc_m, axis=0)
    c_seq = 1.0
    if SEQ:
        c_seq = tl.exp(tl.sum(acc_lr, axis=0) / tl.maximum(tokens, 1.0))
    phi = 0.0
    if LOSS == 3:
        seq_log_ratio = tl.sum(acc_vlr, axis=0) + tl.load(log_is_ptr + row)
        phi = _vespo_phi(seq_log_ratio, adv, k_pos, lam_pos, k_neg, lam_neg)
    return tokens, c_seq, phi


@triton.jit
def _grpo_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    w_ptr,
    log_is_ptr,
    loss_ptr,
    tokens_ptr,
    kl_ptr,
    low_ptr,
    high_ptr,
    region_ptr,
    coef_ptr,
    dcoef_ptr,
    phi_ptr,
    T,
    stride_lb,
    stride_lt,
    stride_ob,
    stride_ot,
    stride_rb,
    stride_rt,
    stride_mb,
    stride_mt,
    stride_wb,
    stride_wt,
    beta,
    eps_low,
    eps_high,
    delta,
    t_pos,
    t_neg,
    k_pos,
    lam_pos,
    k_neg,
    lam_neg,
    LOSS: tl.constexpr,
    SEQ: tl.constexpr,
    HAS_KL: tl.constexpr,
    BIAS_KL: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    adv = tl.load(adv_ptr + row).to(tl.float32)
    w_row = w_ptr + row * stride_wb
    logp_row = logp_ptr + row * stride_lb
    old_row = old_ptr + row * stride_ob
    ref_row = ref_ptr + row * stride_rb
    mask_row = mask_ptr + row * stride_mb

    c_seq = 1.0
    tokens = 0.0
    phi = 0.0
    if SEQ or LOSS == 3:
        tokens, c_seq, phi = _row_prologue(
            row, T, adv, mask_row, logp_row, old_row, log_is_ptr, stride_mt, stride_lt, stride_ot,
            k_pos, lam_pos, k_neg, lam_neg, LOSS, SEQ, BLOCK_T,
        )  # fmt: skip

    acc_loss = tl.zeros((BLOCK_T,), tl.float32)
    acc_kl = tl.zeros((BLOCK_T,), tl.float32)
    acc_m = tl.zeros((BLOCK_T,), tl.float32)
    acc_low = tl.zeros((BLOCK_T,), tl.float32)
    acc_high = tl.zeros((BLOCK_T,), tl.float32)
    acc_region = tl.zeros((BLOCK_T,), tl.float32)
    acc_dcoef = tl.zeros((BLOCK_T,), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        offs, _, valid, m, logp, c = _token_tile(
            t0, T, mask_row, logp_row, old_row, stride_mt, stride_lt, stride_ot, c_seq, SEQ, BLOCK_T
        )
        loss, grad = _policy_term(c, adv, logp, phi, eps_low, eps_high, delta, t_pos, t_neg, LOSS, HAS_DELTA)
        if HAS_WEIGHTS:
            w = _load_row_tile(w_row, stride_wt, offs, valid)
            loss, grad = loss * w, grad * w
        if SEQ and LOSS != 1 and LOSS != 3:
            acc_dcoef += grad * m
        if HAS_KL:
            d = _load_row_tile(ref_row, stride_rt, offs, valid) - logp
            kl = tl.exp(d) - d - 1.0
            if BIAS_KL:
                if SEQ:
                    acc_dcoef += beta * kl * m
                kl = kl * c
            loss += beta * kl
            acc_kl += kl * m
        acc_loss += loss * m
        if not SEQ:
            acc_m += m
            low, high = _clip_flags(c, adv, eps_low, eps_high, delta, LOSS, HAS_DELTA)
            acc_low += low * m
            acc_high += high * m
            acc_region += tl.maximum(low, high) * m

    tl.store(loss_ptr + row, tl.sum(acc_loss, axis=0))
    if HAS_KL:
        tl.store(kl_ptr + row, tl.sum(acc_kl, axis=0))
    if LOSS == 3:
        tl.store(phi_ptr + row, phi)
    if SEQ:
        # one ratio per sequence, hence one clip decision per sequence (TRL counts sequences, not tokens, here)
        low, high = _clip_flags(c_seq, adv, eps_low, eps_high, delta, LOSS, HAS_DELTA)
        tl.store(tokens_ptr + row, tokens)
        tl.store(low_ptr + row, low)
        tl.store(high_ptr + row, high)
        tl.store(region_ptr + row, tl.maximum(low, high))
        tl.store(coef_ptr + row, c_seq)
        tl.store(dcoef_ptr + row, tl.sum(acc_dcoef, axis=0))
    else:
        tl.store(tokens_ptr + row, tl.sum(acc_m, axis=0))
        tl.store(low_ptr + row, tl.sum(acc_low, axis=0))
        tl.store(high_ptr + row, tl.sum(acc_high, axis=0))
        tl.store(region_ptr + row, tl.sum(acc_region, axis=0))


@triton.jit
def _grpo_loss_bwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    adv_ptr,
    mask_ptr,
    w_ptr,
    grad_row_ptr,
    tokens_ptr,
    coef_ptr,
    dcoef_ptr,
    phi_ptr,
    dlogp_ptr,
    T,
    stride_lb,
    stride_lt,
    stride_ob,
    stride_ot,
    stride_rb,
    stride_rt,
    stride_mb,
    stride_mt,
    stride_db,
    stride_dt,
    stride_wb,
    stride_wt,
    beta,
    eps_low,
    eps_high,
    delta,
    t_pos,
    t_neg,
    LOSS: tl.constexpr,
    SEQ: tl.constexpr,
    HAS_KL: tl.constexpr,
    BIAS_KL: tl.constexpr,
    HAS_DELTA: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # d(sum_t mask_t * per-token loss_t)/d(logp_s), times the upstream gradient of that row sum
    row = tl.program_id(0).to(tl.int64)
    w_row = w_ptr + row * stride_wb
    adv = tl.load(adv_ptr + row).to(tl.float32)
    g_row = tl.load(grad_row_ptr + row)
    logp_row = logp_ptr + row * stride_lb
    old_row = old_ptr + row * stride_ob
    ref_row = ref_ptr + row * stride_rb
    mask_row = mask_ptr + row * stride_mb
    dlogp_row = dlogp_ptr + row * stride_db

    c_seq = 1.0
    coupling = 0.0
    if SEQ:
        # every token's loss depends on the sequence ratio exp(sum_t m_t lr_t / max(sum_t m_t, 1))
        c_seq = tl.load(coef_ptr + row)
        coupling = c_seq * tl.load(dcoef_ptr + row) / tl.maximum(tl.load(tokens_ptr + row), 1.0)
    phi = 0.0
    if LOSS == 3:
        phi = tl.load(phi_ptr + row)

    for t0 in range(0, T, BLOCK_T):
        offs, in_row, valid, m, logp, c = _token_tile(
            t0, T, mask_row, logp_row, old_row, stride_mt, stride_lt, stride_ot, c_seq, SEQ, BLOCK_T
        )
        _, grad = _policy_term(c, adv, logp, phi, eps_low, eps_high, delta, t_pos, t_neg, LOSS, HAS_DELTA)
        if HAS_WEIGHTS:
            grad = grad * _load_row_tile(w_row, stride_wt, offs, valid)
        if LOSS == 1 or LOSS == 3:
            dl = grad
        elif SEQ:
            dl = 0.0
        else:
            dl = grad * c
        if SEQ:
            dl += coupling
        if HAS_KL:
            d = _load_row_tile(ref_row, stride_rt, offs, valid) - logp
            e = tl.exp(d)
            if BIAS_KL:
                dl += beta * (1.0 - e) * c
                if not SEQ:  # at the sequence level this share, kl * d ratio / d logp, is part of `coupling`
                    dl += beta * (e - d - 1.0) * c
            else:
                dl += beta * (1.0 - e)
        # masked-out tokens get an exact 0 (selected, so a NaN held there cannot leak in)
        out = tl.where(valid, g_row * m * dl, 0.0)
        tl.store(dlogp_row + offs * stride_dt, out.to(dlogp_ptr.dtype.element_ty), mask=in_row)


def _block_t(T: int, block_t: int | None) -> int:
    if block_t is not None:
        return block_t
    # The interpreter pays per block op, a GPU per register: whole rows there, 1024-token tiles on a GPU
    return min(max(triton.next_power_of_2(T), 16), 8192 if interpreting() else 1024)


def _operands(logps, old_logps, ref_logps, mask, cfg):
    """(old_logps, ref_logps, mask, weights, log_is, has_kl) as the kernels read them: logps stands in for an absent
    or unused input; cfg["policy_weights"] ([B, T] or [B, 1], or None) is broadcast to [B, T] without copying."""
    has_kl = cfg["beta"] != 0.0
    old_logps = old_logps if old_logps is not None else logps
    ref_logps = ref_logps if has_kl else logps
    # Triton reads torch.bool as i1; the same bytes as uint8 load everywhere
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    weights = cfg.get("policy_weights")
    weights = weights.expand(logps.shape) if weights is not None else logps
    log_is = cfg.get("vespo_log_is")
    return old_logps, ref_logps, mask, weights, log_is if log_is is not None else logps, has_kl


def _scalars(cfg: dict) -> tuple:
    delta = cfg["delta"]
    return (
        float(cfg["beta"]), float(cfg["epsilon_low"]), float(cfg["epsilon_high"]),
        float(delta) if delta is not None else 0.0,
        float(cfg["sapo_temperature_pos"]), float(cfg["sapo_temperature_neg"]),
    )  # fmt: skip


def _vespo_scalars(cfg: dict) -> tuple:
    names = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")
    return tuple(float(cfg.get(name, 0.0)) for name in names)


def _flags(cfg: dict, has_kl: bool) -> dict:
    return {
        "LOSS": LOSS_CODES[cfg["loss_type"]],
        "SEQ": cfg["importance_sampling_level"] == "sequence",
        "HAS_KL": has_kl,
        "BIAS_KL": bool(cfg["use_bias_correction_kl"]),
        "HAS_DELTA": cfg["delta"] is not None,
        "HAS_WEIGHTS": cfg.get("policy_weights") is not None,
    }


def grpo_loss_fwd(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: dict,
    block_t: int | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sequence sums of the GRPO per-token loss. logps, old_logps, ref_logps, mask [B, T] (any strides), advantages [B].

    cfg holds loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, sapo_temperature_pos,
    sapo_temperature_neg, use_bias_correction_kl and vespo_k_pos / _lambda_pos / _k_neg / _lambda_neg (as GRPOConfig),
    policy_weights ([B, T] or [B, 1] or None: multiplies each token's policy term, not its KL term) and, for vespo,
    vespo_log_is (float32 [B]: the sampler correction's clamped log-ratio summed per sequence, added to VESPO's).
    old_logps None means logps itself; ref_logps is read only when beta != 0. Tokens whose mask is 0 are never read.
    Returns float32 [B] tensors: "loss" (sum_t mask_t * loss_t), "tokens" (sum_t mask_t),
    "kl" (sum_t mask_t * kl_t, only when beta != 0), "clip_low" / "clip_high" / "clip_region" (mask-weighted counts of
    clipped tokens, or 0/1 per sequence at importance_sampling_level="sequence"), for the sequence level "coef"
    (the sequence ratio) and "dcoef" (sum_t mask_t * d loss_t / d ratio), and for vespo "phi" (VESPO's sequence
    weight); the backward needs the last three.
    """
    B, T = logps.shape
    old_logps, ref_logps, mask, weights, log_is, has_kl = _operands(logps, old_logps, ref_logps, mask, cfg)
    f32 = {"device": logps.device, "dtype": torch.float32}
    names = ("loss", "tokens", "kl", "clip_low", "clip_high", "clip_region", "coef", "dcoef", "phi")
    out = {name: torch.empty(B, **f32) for name in names}
    if B > 0:
        _grpo_loss_fwd_kernel[(B,)](
            logps, old_logps, ref_logps, advantages, mask, weights, log_is, *out.values(),
            T, logps.stride(0), logps.stride(1), old_logps.stride(0), old_logps.stride(1),
            ref_logps.stride(0), ref_logps.stride(1), mask.stride(0), mask.stride(1), weights.stride(0), weights.stride(1),
            *_scalars(cfg), *_vespo_scalars(cfg), **_flags(cfg, has_kl), BLOCK_T=_block_t(T, block_t),
        )  # fmt: skip
    if not has_kl:
        del out["kl"]
    if cfg["importance_sampling_level"] != "sequence":
        del out["coef"], out["dcoef"]
    if cfg["loss_type"] != "vespo":
        del out["phi"]
    return out


def grpo_loss_bwd(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    grad_rows: torch.Tensor,
    saved: dict[str, torch.Tensor],
    cfg: dict,
    block_t: int | None = None,
) -> torch.Tensor:
    """d(sum_b grad_rows[b] * loss_rows[b]) / d logps, in logps' dtype, [B, T] contiguous (0 where the mask is).

    grad_rows: contiguous float32 [B]; saved: grpo_loss_fwd's "tokens" (and "coef", "dcoef" at the sequence level,
    "phi" for vespo).
    """
    B, T = logps.shape
    old_logps, ref_logps, mask, weights, _, has_kl = _operands(logps, old_logps, ref_logps, mask, cfg)
    dlogps = torch.empty((B, T), device=logps.device, dtype=logps.dtype)
    tokens = saved["tokens"]
    if B > 0:
        _grpo_loss_bwd_kernel[(B,)](
            logps, old_logps, ref_logps, advantages, mask, weights, grad_rows, tokens,
            saved.get("coef", tokens), saved.get("dcoef", tokens), saved.get("phi", tokens), dlogps,
            T, logps.stride(0), logps.stride(1), old_logps.stride(0), old_logps.stride(1),
            ref_logps.stride(0), ref_logps.stride(1), mask.stride(0), mask.stride(1),
            dlogps.stride(0), dlogps.stride(1), weights.stride(0), weights.stride(1),
            *_scalars(cfg), **_flags(cfg, has_kl), BLOCK_T=_block_t(T, block_t),
        )  # fmt: skip
    return dlogps
