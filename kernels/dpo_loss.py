"""DPO-family preference losses, one program per BLOCK pairs of the batch.

Every loss here is a function of a pair's two policy/reference log-ratios u = chosen - ref_chosen and
v = rejected - ref_rejected (and, for the length-normalized ones, the two completion lengths), so both passes are a
single elementwise sweep: loads in any float dtype, fp32 math, one fp32 loss per pair. The backward recomputes the
loss's local derivatives from the inputs instead of saving them (four [B] loads are cheaper than two extra tensors
kept alive through the model's backward) and multiplies them by the incoming gradient.

The kernels compute modes, not TRL loss types: posttrain.ops.dpo_loss.LOSS_SEMANTICS maps each loss type to its mode
(sigmoid_norm is "sigmoid" with lengths; aot's label-smoothed sigmoid is "cdpo", conservative DPO's). The scores are
divided by the completion lengths exactly when lengths are given. Losses that sort across the batch (aot,
aot_unpaired) and the batch-mean sft loss are not here: the op sorts in torch and feeds the sorted margins to "cdpo" as
chosen / rejected with no references, and computes sft in torch.
"""

import math

import torch
import triton
import triton.language as tl

from posttrain.ops.dpo_loss import ALPHA_EXP_CLAMP, F_DIVERGENCE_TYPES, LOSS_SEMANTICS

KERNEL_MODES = tuple(sorted({row.kernel_mode for row in LOSS_SEMANTICS.values()} - {None}))
# Modes of the raw log-ratios u, v rather than of the f-divergence score margin (_logratio_loss)
LOGRATIO_MODES = ("nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down")
# jit code may only read constexpr globals
_EXP_CLAMP = tl.constexpr(ALPHA_EXP_CLAMP)


@triton.jit
def _log1p_unit(y):
    # log(1 + y) for y in [0, 1] as 2 atanh(y / (2 + y)): libdevice's log1p does not run in the interpreter, and
    # log(1 + y) loses all relative precision when y is tiny, which is where softplus(-large) lives. s^2 <= 1/9, so
    # eight terms of the series reach fp32 precision.
    s = y / (2.0 + y)
    s2 = s * s
    p = 1.0 / 15.0
    p = p * s2 + 1.0 / 13.0
    p = p * s2 + 1.0 / 11.0
    p = p * s2 + 1.0 / 9.0
    p = p * s2 + 1.0 / 7.0
    p = p * s2 + 1.0 / 5.0
    p = p * s2 + 1.0 / 3.0
    p = p * s2 + 1.0
    return 2.0 * s * p


@triton.jit
def _softplus(x):
    # log(1 + e^x) = -logsigmoid(-x) without overflow for large |x|
    return tl.maximum(x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    # from exp(-|x|) <= 1: no overflow, and both tails keep their relative precision
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0.0, 1.0, e) / (1.0 + e)


@triton.jit
def _f_score(x, alpha_m1, inv_alpha_m1, F_DIV: tl.constexpr):
    """The f-divergence's f'(e^x) for a log-ratio x, and its derivative w.r.t. x."""
    if F_DIV == "forward_kl":
        e = tl.exp(-x)
        score = 1.0 - e
        d_score = e
    elif F_DIV == "js_divergence":
        score = 0.6931471805599453 - _softplus(-x)
        d_score = _sigmoid(-x)
    elif F_DIV == "alpha_divergence":
        # TRL clamps the exponent at 80 so exp() stays finite in fp32; the clamp's gradient is 0 above it
        t = alpha_m1 * x
        e = tl.exp(tl.minimum(t, _EXP_CLAMP))
        score = (e - 1.0) * inv_alpha_m1
        d_score = tl.where(t <= _EXP_CLAMP, e, 0.0)
    else:
        score = x
        d_score = tl.full(x.shape, 1.0, tl.float32)
    return score, d_score


@triton.jit
def _logratio_loss(u, v, beta, c1, LOSS: tl.constexpr):
    """(loss, d/du, d/dv) of the losses defined on the raw log-ratios; c1 = 1 / (2 beta) for sppo_hard."""
    a = beta * u
    b = beta * v
    if LOSS == "nca_pair":
        loss = _softplus(-a) + 0.5 * _softplus(a) + 0.5 * _softplus(b)
        du = beta * (0.5 * _sigmoid(a) - _sigmoid(-a))
        dv = 0.5 * beta * _sigmoid(b)
    elif LOSS == "bco_pair":
        loss = _softplus(-a) + _softplus(b)
        du = -beta * _sigmoid(-a)
        dv = beta * _sigmoid(b)
    elif LOSS == "sppo_hard":
        ec = u - c1
        er = v + c1
        loss = ec * ec + er * er
        du = 2.0 * ec
        dv = 2.0 * er
    elif LOSS == "apo_zero":
        # sigmoid(-a) rather than 1 - sigmoid(a): the same number, but not rounded to 0 when the sigmoid saturates
        loss = _sigmoid(-a) + _sigmoid(b)
        du = -beta * _sigmoid(a) * _sigmoid(-a)
        dv = beta * _sigmoid(b) * _sigmoid(-b)
    else:  # apo_down
        w = a - b
        gw = beta * _sigmoid(w) * _sigmoid(-w)
        loss = _sigmoid(a) + _sigmoid(-w)
        du = beta * _sigmoid(a) * _sigmoid(-a) - gw
        dv = gw
    return loss, du, dv


@triton.jit
def _margin_loss(
    u, v, len_c, len_r, beta, eps, c1, c2, alpha_m1, inv_alpha_m1,
    LOSS: tl.constexpr, F_DIV: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    """(loss, d/du, d/dv) of the losses defined on the score margin f(u) - f(v), or on its length-averaged form.

    c1, c2: 1 / (2 beta) for ipo; log(1 - eps), log(eps) for exo_pair; 1 / (1 - 2 eps) for robust; 1 / tau for
    discopop. eps is the label smoothing of cdpo, exo_pair and robust.
    """
    sc, dsc = _f_score(u, alpha_m1, inv_alpha_m1, F_DIV)
    sr, dsr = _f_score(v, alpha_m1, inv_alpha_m1, F_DIV)
    if NORMALIZE:
        sc = sc / len_c
        sr = sr / len_r
        dsc = dsc / len_c
        dsr = dsr / len_r
    delta = sc - sr
    z = beta * delta
    # g = d loss / d delta
    if LOSS == "sigmoid":
        loss = _softplus(-z)
        g = -beta * _sigmoid(-z)
    elif LOSS == "cdpo":
        loss = (1.0 - eps) * _softplus(-z) + eps * _softplus(z)
        g = beta * (eps * _sigmoid(z) - (1.0 - eps) * _sigmoid(-z))
    elif LOSS == "hinge":
        m = 1.0 - z
        loss = tl.maximum(m, 0.0)
        g = tl.where(m > 0.0, -beta, 0.0)
    elif LOSS == "ipo":
        e = delta - c1
        loss = e * e
        g = 2.0 * e
    elif LOSS == "exo_pair":
        # d/dz of p (log p - c1) + q (log q - c2) collapses to p q (z - c1 + c2), since log p - log q = z
        p = _sigmoid(z)
        q = _sigmoid(-z)
        loss = p * (-_softplus(-z) - c1) + q * (-_softplus(z) - c2)
        g = beta * p * q * (z - c1 + c2)
    elif LOSS == "robust":
        loss = ((1.0 - eps) * _softplus(-z) - eps * _softplus(z)) * c1
        g = -beta * ((1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z)) * c1
    else:  # discopop
        # exp(-z) * sigmoid(z / tau) folded into one exp: it stays finite (-> 0) where exp(-z) alone overflows and
        # the sigmoid underflows to 0, which in the unfused product gives inf * 0 = nan
        s = _sigmoid(z * c1)
        sn = _sigmoid(-z * c1)
        sp = _softplus(-z)
        ex = tl.exp(-z - _softplus(-z * c1))
        loss = sp * sn + ex
        g = beta * (-_sigmoid(-z) * sn - sp * s * sn * c1 + ex * (sn * c1 - 1.0))
    return loss, g * dsc, -g * dsr


@triton.jit
def _pair_loss(
    c_ptr, r_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, mask,
    stride_c, stride_r, stride_rc, stride_rr, stride_lc, stride_lr,
    beta, eps, c1, c2, alpha_m1, inv_alpha_m1,
    LOSS: tl.constexpr, F_DIV: tl.constexpr, ON_LOGRATIOS: tl.constexpr, HAS_REF: tl.constexpr,
    NORMALIZE: tl.constexpr,
):  # fmt: skip
    u = tl.load(c_ptr + offs * stride_c, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(r_ptr + offs * stride_r, mask=mask, other=0.0).to(tl.float32)
    if HAS_REF:
        u -= tl.load(rc_ptr + offs * stride_rc, mask=mask, other=0.0).to(tl.float32)
        v -= tl.load(rr_ptr + offs * stride_rr, mask=mask, other=0.0).to(tl.float32)
    if ON_LOGRATIOS:
        loss, du, dv = _logratio_loss(u, v, beta, c1, LOSS)
    else:
        if NORMALIZE:
            # a length of 0 counts as 1, as TRL's clamp(min=1)
            len_c = tl.maximum(tl.load(lc_ptr + offs * stride_lc, mask=mask, other=1).to(tl.float32), 1.0)
            len_r = tl.maximum(tl.load(lr_ptr + offs * stride_lr, mask=mask, other=1).to(tl.float32), 1.0)
        else:
            len_c = tl.full(u.shape, 1.0, tl.float32)
            len_r = len_c
        loss, du, dv = _margin_loss(
            u, v, len_c, len_r, beta, eps, c1, c2, alpha_m1, inv_alpha_m1, LOSS, F_DIV, NORMALIZE
        )
    return loss, du, dv


@triton.jit
def _dpo_loss_fwd_kernel(
    c_ptr, r_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, loss_ptr, B,
    stride_c, stride_r, stride_rc, stride_rr, stride_lc, stride_lr,
    beta, eps, c1, c2, alpha_m1, inv_alpha_m1,
    LOSS: tl.constexpr, F_DIV: tl.constexpr, ON_LOGRATIOS: tl.constexpr, HAS_REF: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    loss, _, _ = _pair_loss(
        c_ptr, r_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, mask,
        stride_c, stride_r, stride_rc, stride_rr, stride_lc, stride_lr,
        beta, eps, c1, c2, alpha_m1, inv_alpha_m1, LOSS, F_DIV, ON_LOGRATIOS, HAS_REF, NORMALIZE,
    )  # fmt: skip
    tl.store(loss_ptr + offs, loss, mask=mask)


@triton.jit
def _dpo_loss_bwd_kernel(
    c_ptr, r_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, grad_loss_ptr, dc_ptr, dr_ptr, B,
    stride_c, stride_r, stride_rc, stride_rr, stride_lc, stride_lr, stride_g,
    beta, eps, c1, c2, alpha_m1, inv_alpha_m1,
    LOSS: tl.constexpr, F_DIV: tl.constexpr, ON_LOGRATIOS: tl.constexpr, HAS_REF: tl.constexpr,
    NORMALIZE: tl.constexpr, NEED_DC: tl.constexpr, NEED_DR: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    _, du, dv = _pair_loss(
        c_ptr, r_ptr, rc_ptr, rr_ptr, lc_ptr, lr_ptr, offs, mask,
        stride_c, stride_r, stride_rc, stride_rr, stride_lc, stride_lr,
        beta, eps, c1, c2, alpha_m1, inv_alpha_m1, LOSS, F_DIV, ON_LOGRATIOS, HAS_REF, NORMALIZE,
    )  # fmt: skip
    g = tl.load(grad_loss_ptr + offs * stride_g, mask=mask, other=0.0).to(tl.float32)
    if NEED_DC:
        tl.store(dc_ptr + offs, (g * du).to(dc_ptr.dtype.element_ty), mask=mask)
    if NEED_DR:
        tl.store(dr_ptr + offs, (g * dv).to(dr_ptr.dtype.element_ty), mask=mask)


def _launch_args(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, mode,
                 f_divergence_type, beta, label_smoothing, alpha, tau):  # fmt: skip
    """Pointers, strides, scalars and constexprs shared by both launchers; absent inputs point at `chosen`."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"mode {mode!r} is not one of the kernels': {', '.join(KERNEL_MODES)}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} is not one of: {', '.join(F_DIVERGENCE_TYPES)}")
    has_ref = ref_chosen is not None
    normalize = chosen_lengths is not None
    tensors = (chosen, rejected, ref_chosen if has_ref else chosen, ref_rejected if has_ref else chosen,
               chosen_lengths if normalize else chosen, rejected_lengths if normalize else chosen)  # fmt: skip
    # the host-side constants are computed in float64
    eps = float(label_smoothing)
    c1 = c2 = 0.0
    if mode in ("ipo", "sppo_hard"):
        c1 = 0.5 / beta
    elif mode == "exo_pair":
        c1, c2 = math.log1p(-eps), math.log(eps)
    elif mode == "robust":
        c1 = 1.0 / (1.0 - 2.0 * eps)
    elif mode == "discopop":
        c1 = 1.0 / tau
    alpha_m1 = alpha - 1.0 if f_divergence_type == "alpha_divergence" else 0.0
    inv_alpha_m1 = 1.0 / alpha_m1 if alpha_m1 != 0.0 else 0.0
    scalars = (float(beta), float(eps), c1, c2, alpha_m1, inv_alpha_m1)
    constexprs = dict(
        LOSS=mode,
        F_DIV=f_divergence_type,
        ON_LOGRATIOS=mode in LOGRATIO_MODES,
        HAS_REF=has_ref,
        NORMALIZE=normalize,
    )
    return tensors, tuple(t.stride(0) for t in tensors), scalars, constexprs


def _block(B: int) -> tuple[int, int]:
    # A batch of pairs is small (tens to thousands): one program per 1024 pairs, warps scaled to the block
    block = min(max(triton.next_power_of_2(B), 32), 1024)
    return block, max(1, min(4, block // 256))


def dpo_loss_fwd(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    *,
    mode: str,
    f_divergence_type: str,
    beta: float,
    label_smoothing: float,
    alpha: float,
    tau: float,
) -> torch.Tensor:
    """Per-pair losses of kernel `mode` (KERNEL_MODES), float32 [B]. All inputs are [B] (any stride, any float dtype;
    lengths any numeric dtype).

    u = chosen - ref_chosen, v = rejected - ref_rejected; with ref_chosen = ref_rejected = None, u = chosen and
    v = rejected. Given lengths (both or neither), the margin modes divide each score by its length (at least 1).
    label_smoothing is read by cdpo, exo_pair and robust only; alpha (!= 1) by alpha_divergence only.
    """
    B = chosen.shape[0]
    loss = torch.empty(B, device=chosen.device, dtype=torch.float32)
    if B == 0:
        return loss
    tensors, strides, scalars, constexprs = _launch_args(
        chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, mode, f_divergence_type,
        beta, label_smoothing, alpha, tau,
    )  # fmt: skip
    block, num_warps = _block(B)
    _dpo_loss_fwd_kernel[(triton.cdiv(B, block),)](
        *tensors, loss, B, *strides, *scalars, **constexprs, BLOCK=block, num_warps=num_warps
    )
    return loss


def dpo_loss_bwd(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_lengths: torch.Tensor | None,
    rejected_lengths: torch.Tensor | None,
    grad_loss: torch.Tensor,
    *,
    mode: str,
    f_divergence_type: str,
    beta: float,
    label_smoothing: float,
    alpha: float,
    tau: float,
    need_chosen: bool = True,
    need_rejected: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(d chosen, d rejected) = grad_loss * d loss / d (chosen, rejected), in chosen's / rejected's dtypes.

    grad_loss: [B], any stride (a mean's backward hands over a stride-0 expand). The reference log-probs' gradients
    are the negatives of these. A gradient not asked for (need_*) is None. Arguments as dpo_loss_fwd.
    """
    B = chosen.shape[0]
    dc = torch.empty(B, device=chosen.device, dtype=chosen.dtype) if need_chosen else None
    dr = torch.empty(B, device=rejected.device, dtype=rejected.dtype) if need_rejected else None
    if B == 0 or not (need_chosen or need_rejected):
        return dc, dr
    tensors, strides, scalars, constexprs = _launch_args(
        chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, mode, f_divergence_type,
        beta, label_smoothing, alpha, tau,
    )  # fmt: skip
    block, num_warps = _block(B)
    _dpo_loss_bwd_kernel[(triton.cdiv(B, block),)](
        *tensors, grad_loss, dc if need_chosen else chosen, dr if need_rejected else chosen, B,
        *strides, grad_loss.stride(0), *scalars, **constexprs,
        NEED_DC=need_chosen, NEED_DR=need_rejected, BLOCK=block, num_warps=num_warps,
    )  # fmt: skip
    return dc, dr
