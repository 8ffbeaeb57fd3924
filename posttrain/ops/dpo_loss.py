"""Per-pair DPO-family losses (every loss_type of TRL 1.16's DPOTrainer) from summed sequence log-probs."""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._common import check_float, check_same_device, resolve_impl


class LossSemantics(NamedTuple):
    """What one TRL 1.16 DPO loss_type reads and how posttrain computes it (a row of LOSS_SEMANTICS)."""

    kernel_mode: str | None  # the Triton kernels' elementwise mode; None: computed in torch only
    lengths: tuple[str, ...]  # the completion lengths it divides by: "chosen", "rejected"
    f_divergence: bool  # accepts an f_divergence_type other than reverse_kl (TRL's margin-based types)
    label_smoothing: tuple[float, float, bool] | None  # (low, high, low_inclusive) of label_smoothing; None: unread
    sorts_batch: bool  # pairs the k-th smallest policy and reference quantities across the batch


_BOTH = ("chosen", "rejected")
_FLIP = (0.0, 0.5, True)  # a preference-flip probability
# The one table of DPO loss semantics: DPOConfig's checks, dpo_loss's checks and dispatch, and the kernels' modes.
# sigmoid_norm is the sigmoid kernel with lengths; aot's smoothed sigmoid is conservative DPO's ("cdpo").
LOSS_SEMANTICS = {
    "sigmoid": LossSemantics("sigmoid", (), True, None, False),
    "hinge": LossSemantics("hinge", (), True, None, False),
    "ipo": LossSemantics("ipo", _BOTH, True, None, False),
    "exo_pair": LossSemantics("exo_pair", (), True, (0.0, 0.5, False), False),
    "nca_pair": LossSemantics("nca_pair", (), False, None, False),
    "robust": LossSemantics("robust", (), True, _FLIP, False),
    "bco_pair": LossSemantics("bco_pair", (), False, None, False),
    "sppo_hard": LossSemantics("sppo_hard", (), False, None, False),
    "aot": LossSemantics("cdpo", (), False, _FLIP, True),
    "aot_unpaired": LossSemantics("cdpo", (), False, _FLIP, True),
    "apo_zero": LossSemantics("apo_zero", (), False, None, False),
    "apo_down": LossSemantics("apo_down", (), False, None, False),
    "discopop": LossSemantics("discopop", (), True, None, False),
    # a batch mean, not a per-pair loss: no kernel; it accepts (and ignores) an f-divergence, as TRL
    "sft": LossSemantics(None, ("chosen",), True, None, False),
    "sigmoid_norm": LossSemantics("sigmoid", _BOTH, True, None, False),
}
LOSS_TYPES = tuple(LOSS_SEMANTICS)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = tuple(name for name, row in LOSS_SEMANTICS.items() if row.f_divergence)
# Where TRL's alpha-divergence falls back to reverse_kl, and where it clamps the exponent (its fp32 / bf16 value)
ALPHA_ONE_TOLERANCE = 1e-6
ALPHA_EXP_CLAMP = 80.0


def _softplus(x):
    # log(1 + e^x) exactly (F.softplus switches to x above its threshold)
    return -F.logsigmoid(-x)


def _effective_f_divergence(f_divergence_type: str, alpha: float) -> str:
    if f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) < ALPHA_ONE_TOLERANCE:
        return "reverse_kl"  # the limit alpha -> 1 of the alpha-divergence
    return f_divergence_type


def _f_score(x, f_divergence_type, alpha):
    if f_divergence_type == "forward_kl":
        return 1.0 - torch.exp(-x)
    if f_divergence_type == "js_divergence":
        return math.log(2.0) - _softplus(-x)
    if f_divergence_type == "alpha_divergence":
        t = (alpha - 1.0) * x
        return (torch.exp(t.clamp(max=ALPHA_EXP_CLAMP)) - 1.0) * (1.0 / (alpha - 1.0))
    return x


def _smoothed_sigmoid(z, eps):
    return (1.0 - eps) * _softplus(-z) + eps * _softplus(z)


def dpo_loss_ref(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
) -> torch.Tensor:
    """Plain-PyTorch `dpo_loss` (arguments as there, assumed valid): the test oracle, the CPU fallback and the
    benchmark baseline. Math in float32, or float64 when any log-prob input is float64; returns [B] in that dtype.
    """
    logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in logps) else torch.float32
    c, r, rc, rr = (t.to(dtype) for t in logps)
    beta, eps = float(beta), float(label_smoothing)

    if loss_type == "sft":
        # TRL's NLL of the chosen completions: the token mean over the whole batch, repeated for every pair
        n_tokens = chosen_lengths.to(dtype).sum().clamp(min=1.0)
        return (-c.sum() / n_tokens).repeat(c.shape[0])
    if loss_type == "aot":
        delta = torch.sort(c - r, dim=0).values - torch.sort(rc - rr, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)

    u, v = c - rc, r - rr
    if loss_type == "aot_unpaired":
        delta = torch.sort(u, dim=0).values - torch.sort(v, dim=0).values
        return _smoothed_sigmoid(beta * delta, eps)
    if loss_type == "nca_pair":
        return _softplus(-beta * u) + 0.5 * _softplus(beta * u) + 0.5 * _softplus(beta * v)
    if loss_type == "bco_pair":
        return _softplus(-beta * u) + _softplus(beta * v)
    if loss_type == "sppo_hard":
        return (u - 0.5 / beta) ** 2 + (v + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return torch.sigmoid(-beta * u) + torch.sigmoid(beta * v)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * u) + torch.sigmoid(-beta * (u - v))

    f_divergence_type = _effective_f_divergence(f_divergence_type, f_alpha_divergence_coef)
    score_c = _f_score(u, f_divergence_type, f_alpha_divergence_coef)
    score_r = _f_score(v, f_divergence_type, f_alpha_divergence_coef)
    if LOSS_SEMANTICS[loss_type].lengths:
        score_c = score_c / chosen_lengths.to(dtype).clamp(min=1.0)
        score_r = score_r / rejected_lengths.to(dtype).clamp(min=1.0)
    delta = score_c - score_r
    z = beta * delta
    if loss_type in ("sigmoid", "sigmoid_norm"):
        return _softplus(-z)
    if loss_type == "hinge":
        return torch.relu(1.0 - z)
    if loss_type == "ipo":
        return (delta - 0.5 / beta) ** 2
    if loss_type == "exo_pair":
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
    if loss_type == "robust":
        return ((1.0 - eps) * _softplus(-z) - eps * _softplus(z)) / (1.0 - 2.0 * eps)
    if loss_type == "discopop":
        # exp(-z) * sigmoid(z / tau) as one exp: finite where the product would be inf * 0
        tau = float(discopop_tau)
        return _softplus(-z) * torch.sigmoid(-z / tau) + torch.exp(-z - _softplus(-z / tau))
    raise ValueError(f"loss_type {loss_type!r} is not one of: {', '.join(LOSS_TYPES)}")


class DPOLossFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton kernels (posttrain.kernels.dpo_loss) for the elementwise loss types.

    forward(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, mode, f_divergence_type,
    beta, label_smoothing, alpha, tau) returns float32 [B]; mode is a kernel mode (LOSS_SEMANTICS' kernel_mode),
    ref_* may be None (the log-ratios are then chosen and rejected themselves), and lengths None means no length
    normalization. Gradients reach the four log-prob inputs (the references' are the negatives of the policy's).
    """

    @staticmethod
    def forward(
        ctx, chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths,
        mode, f_divergence_type, beta, label_smoothing, alpha, tau,
    ):  # fmt: skip
        from posttrain.kernels.dpo_loss import dpo_loss_fwd

        params = dict(
            mode=mode, f_divergence_type=f_divergence_type, beta=beta, label_smoothing=label_smoothing,
            alpha=alpha, tau=tau,
        )  # fmt: skip
        loss = dpo_loss_fwd(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, **params)
        ctx.save_for_backward(chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths)
        ctx.params = params
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        from posttrain.kernels.dpo_loss import dpo_loss_bwd

        chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths = ctx.saved_tensors
        need_c, need_r, need_rc, need_rr = ctx.needs_input_grad[:4]
        dc, dr = dpo_loss_bwd(
            chosen, rejected, ref_chosen, ref_rejected, chosen_lengths, rejected_lengths, grad_loss, **ctx.params,
            need_chosen=need_c or need_rc, need_rejected=need_r or need_rr,
        )  # fmt: skip
        return (
            dc if need_c else None,
            dr if need_r else None,
            -dc.to(ref_chosen.dtype) if need_rc else None,
            -dr.to(ref_rejected.dtype) if need_rr else None,
            *(None,) * 8,
        )


def _check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_label_smoothing(loss_type: str, label_smoothing) -> None:
    """Raise ValueError, naming the range, when `loss_type` reads label_smoothing and it lies outside that range."""
    bounds = LOSS_SEMANTICS[loss_type].label_smoothing
    if bounds is None:
        return
    low, high, low_inclusive = bounds
    ok = isinstance(label_smoothing, (int, float)) and (
        (low <= label_smoothing if low_inclusive else low < label_smoothing) and label_smoothing < high
    )
    if not ok:
        interval = f"{'[' if low_inclusive else '('}{low}, {high})"
        hint = " (the EXO paper suggests 1e-3)" if loss_type == "exo_pair" else ""
        raise ValueError(
            f"label_smoothing must lie in {interval} for loss_type {loss_type!r}, got {label_smoothing!r}{hint}"
        )


def _check_args(logps: dict, lengths: dict, loss_type, f_divergence_type, beta, label_smoothing, alpha, tau):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of: {', '.join(LOSS_TYPES)}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type {f_divergence_type!r} is not one of: {', '.join(F_DIVERGENCE_TYPES)}")
    semantics = LOSS_SEMANTICS[loss_type]
    if f_divergence_type != "reverse_kl" and not semantics.f_divergence:
        raise ValueError(
            f"f_divergence_type {f_divergence_type!r} needs a loss_type built on the reward margin "
            f"({', '.join(F_DIVERGENCE_LOSS_TYPES)}); loss_type {loss_type!r} only supports 'reverse_kl'"
        )
    if f_divergence_type == "alpha_divergence" and not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"f_alpha_divergence_coef must be a finite number, got {alpha!r}")
    _check_positive("beta", beta)
    if loss_type == "discopop":
        _check_positive("discopop_tau", tau)
    check_label_smoothing(loss_type, label_smoothing)

    first = "chosen_logps"
    for name, tensor in logps.items():
        check_float(name, tensor, dim=1)
        if tensor.shape != logps[first].shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(logps[first].shape)} (that of {first})"
            )
    for side in semantics.lengths:
        if lengths[f"{side}_lengths"] is None:
            raise ValueError(
                f"loss_type {loss_type!r} needs {side}_lengths (each {side} completion's token count), got None"
            )
    for name, tensor in lengths.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.dtype == torch.bool or tensor.is_complex():
            kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be an integer or float torch.Tensor, got {kind}")
        if tensor.shape != logps[first].shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected {tuple(logps[first].shape)} (that of {first})"
            )
    check_same_device(**logps, **lengths)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    discopop_tau: float = 0.05,
    impl: str = "auto",
) -> torch.Tensor:
    """Per-pair preference losses of one TRL 1.16 DPO `loss_type`, from the sequences' summed log-probs.

    With u = chosen_logps - ref_chosen_logps, v = rejected_logps - ref_rejected_logps, the f-divergence score f
    (reverse_kl: f(x) = x; forward_kl: 1 - e^-x; js_divergence: log 2 + log σ(x); alpha_divergence:
    (e^min((α-1)x, 80) - 1) / (α-1), reverse_kl when |α - 1| < 1e-6), z = β (f(u) - f(v)), ε = label_smoothing and
    Lc, Lr the completion lengths (clamped to >= 1), loss_type gives per pair:

        sigmoid       -log σ(z)
        hinge         relu(1 - z)
        ipo           (f(u)/Lc - f(v)/Lr - 1/(2β))²
        exo_pair      σ(z) (log σ(z) - log(1-ε)) + σ(-z) (log σ(-z) - log ε)
        nca_pair      -log σ(βu) - ½ log σ(-βu) - ½ log σ(-βv)
        robust        ((1-ε) (-log σ(z)) + ε log σ(-z)) / (1 - 2ε)
        bco_pair      -log σ(βu) - log σ(-βv)
        sppo_hard     (u - 1/(2β))² + (v + 1/(2β))²
        aot           with d = sort(chosen - rejected) - sort(ref_chosen - ref_rejected), elementwise:
                      -(1-ε) log σ(βd) - ε log σ(-βd)
        aot_unpaired  the same with d = sort(u) - sort(v)
        apo_zero      1 - σ(βu) + σ(βv)
        apo_down      σ(βu) + 1 - σ(β(u - v))
        discopop      with m = σ(z/τ): -log σ(z) (1 - m) + e^-z m
        sft           -sum(chosen_logps) / sum(chosen_lengths), the same value repeated for every pair
        sigmoid_norm  -log σ(β (f(u)/Lc - f(v)/Lr))

    f_divergence_type other than reverse_kl is accepted only for sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust,
    discopop and sft (sft does not use it), as in TRL. label_smoothing is read only by robust, aot, aot_unpaired
    (each needs 0 <= ε < 0.5) and exo_pair (0 < ε < 0.5). TRL reduces with a mean over pairs (times its
    loss_weights when it combines several loss types); aot and aot_unpaired's outputs are in sorted order, not pair
    order, exactly as TRL's, so only their sum / mean is meaningful per pair.

    Args:
        chosen_logps, rejected_logps: [B] float32 / bfloat16 / float16 / float64, the policy's log-probs of each
            pair's chosen and rejected completion, summed over the completion tokens.
        ref_chosen_logps, ref_rejected_logps: [B], the same under the reference model. TRL detaches them; if they
            do require grad, they get their gradients too.
        beta: > 0, the β above (τ of the IPO paper for ipo).
        loss_type: one of the loss types above.
        label_smoothing: ε, see above; ignored by the other loss types.
        f_divergence_type: reverse_kl, forward_kl, js_divergence or alpha_divergence.
        f_alpha_divergence_coef: α of alpha_divergence.
        chosen_lengths, rejected_lengths: [B] integer or float completion token counts (TRL's completion_mask summed
            over the sequence); needed by ipo and sigmoid_norm (both) and sft (chosen_lengths), ignored otherwise.
        discopop_tau: > 0, τ of discopop.
        impl: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, torch for float64 inputs or elsewhere), "triton"
            or "torch". sft is a batch mean and always runs in torch; aot / aot_unpaired sort in torch, then the
            Triton kernel computes the elementwise loss.

    Returns:
        [B] float32 per-pair losses (float64 when impl="torch" gets float64 inputs), differentiable w.r.t. the log-prob
        inputs; gradients come back in each input's dtype.

    Example:
        >>> chosen, rejected = -torch.rand(8) * 100, -torch.rand(8) * 100         # summed completion log-probs
        >>> ref_chosen, ref_rejected = chosen + torch.randn(8), rejected + torch.randn(8)
        >>> losses = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)        # [8], sigmoid DPO
        >>> loss = losses.mean()
        >>> ipo = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type="ipo",
        ...                chosen_lengths=torch.full((8,), 50), rejected_lengths=torch.full((8,), 70))
    """
    logps = dict(
        chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )  # fmt: skip
    lengths = dict(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    _check_args(
        logps, lengths, loss_type, f_divergence_type, beta, label_smoothing, f_alpha_divergence_coef, discopop_tau
    )
    options = dict(
        beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, discopop_tau=discopop_tau,
    )  # fmt: skip
    has_fp64 = any(t.dtype == torch.float64 for t in logps.values())
    impl = resolve_impl("torch" if has_fp64 and impl == "auto" else impl, chosen_logps.device)
    if impl == "triton" and has_fp64:
        raise TypeError(
            "impl='triton' supports float32, bfloat16 and float16 log-probs; got float64 (use impl='torch')"
        )
    semantics = LOSS_SEMANTICS[loss_type]
    if impl == "torch" or semantics.kernel_mode is None:
        return dpo_loss_ref(*logps.values(), **options)

    c, r, rc, rr = logps.values()
    f_divergence_type = _effective_f_divergence(f_divergence_type, f_alpha_divergence_coef)
    eps = float(label_smoothing) if semantics.label_smoothing is not None else 0.0
    scalars = (float(beta), eps, float(f_alpha_divergence_coef), float(discopop_tau))
    if semantics.sorts_batch:
        # Sorting pairs the k-th smallest policy quantity with the k-th smallest reference one; torch.sort's backward
        # scatters the kernel's gradients back to the pairs they came from.
        if loss_type == "aot":
            x, y = c.float() - r.float(), rc.float() - rr.float()
        else:
            x, y = c.float() - rc.float(), r.float() - rr.float()
        x, y = torch.sort(x, dim=0).values, torch.sort(y, dim=0).values
        return DPOLossFunction.apply(x, y, None, None, None, None, semantics.kernel_mode, "reverse_kl", *scalars)
    lengths = (chosen_lengths, rejected_lengths) if semantics.lengths else (None, None)
    return DPOLossFunction.apply(c, r, rc, rr, *lengths, semantics.kernel_mode, f_divergence_type, *scalars)
