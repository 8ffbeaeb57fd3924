"""GRPO policy loss: TRL 1.16's clipped (or gated) importance-weighted objective, KL penalty and loss aggregations."""

import math
from typing import NamedTuple

import torch

from ._common import check_float, check_same_device, resolve_impl

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Loss types whose TRL metrics are clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}
CLIPPED_SURROGATE_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


class GRPOLossMetrics(NamedTuple):
    """Per-sequence statistics behind the metrics TRL's GRPOTrainer logs from its loss; detached float32 [B] tensors.

    Each is a numerator or denominator, so that sums over processes give TRL's exact global means (see `logs`):

    - tokens: sum_t mask[b, t], the denominator of the KL mean.
    - kl: sum_t mask[b, t] * kl[b, t] (after the bias correction, if any); None when beta == 0.
    - clip_low / clip_high / clip_region: TRL's is_low_clipped / is_high_clipped / their union, summed over the
      row's tokens weighted by the mask at importance_sampling_level="token"; at "sequence" level one 0/1 flag per
      sequence (TRL then counts sequences, fully masked ones included). For cispo, clip_high is TRL's
      cispo_clip_ratio numerator (ratio > epsilon_high with a positive advantage) and clip_low is 0. The
      clipped-surrogate losses compare the delta-capped ratio, as TRL does. For sapo (no clip metrics in TRL) they
      count the raw ratio outside [1 - epsilon_low, 1 + epsilon_high] the same way.
    - clip_weight: the clip counts' denominator: `tokens` at token level, 1 per sequence at sequence level.
    """

    tokens: torch.Tensor
    kl: torch.Tensor | None
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_region: torch.Tensor
    clip_weight: torch.Tensor

    def logs(self, loss_type: str, *, reduce=None, gather=None) -> dict[str, torch.Tensor]:
        """TRL's metric names and values (0-d tensors) for this loss_type, computed as GRPOTrainer._compute_loss does.

        reduce(t) must sum a tensor over processes (e.g. `lambda t: accelerator.reduce(t, reduction="sum")`) and
        gather(t) concatenate a [B] tensor over processes (`accelerator.gather`); both default to this process only.
        Gives "kl" when beta != 0; clip_ratio/low_mean, high_mean, region_mean, low_min, high_max for grpo, bnpo,
        dr_grpo, dapo and luspo; cispo_clip_ratio for cispo; no clip metric for sapo (TRL logs none).
        """
        reduce = reduce if reduce is not None else (lambda t: t)
        gather = gather if gather is not None else (lambda t: t)

        def global_mean(numerator, denominator):
            totals = reduce(torch.stack([numerator.sum(), denominator.sum()]))
            return totals[0] / totals[1].clamp(min=1.0)

        def nan_extreme(values, largest):
            values = values[~torch.isnan(values)]
            if values.numel() == 0:
                return torch.tensor(math.nan, device=values.device)
            return values.max() if largest else values.min()

        out = {}
        if self.kl is not None:
            out["kl"] = global_mean(self.kl, self.tokens)
        if loss_type in CLIPPED_SURROGATE_LOSSES:
            out["clip_ratio/low_mean"] = global_mean(self.clip_low, self.clip_weight)
            out["clip_ratio/high_mean"] = global_mean(self.clip_high, self.clip_weight)
            out["clip_ratio/region_mean"] = global_mean(self.clip_region, self.clip_weight)
            # per-sequence fractions: 0/0 = NaN for fully masked rows, which nanmin / nanmax skip
            out["clip_ratio/low_min"] = nan_extreme(gather(self.clip_low / self.clip_weight), largest=False)
            out["clip_ratio/high_max"] = nan_extreme(gather(self.clip_high / self.clip_weight), largest=True)
        elif loss_type == "cispo":
            out["cispo_clip_ratio"] = global_mean(self.clip_high, self.clip_weight)
        return out


def _policy_loss_ref(ratio, advantages, logps, *, loss_type, epsilon_low, epsilon_high, delta, t_pos, t_neg):
    """Per-token policy loss and TRL's clip flags (low, high) at importance ratio `ratio` ([B, T] or [B, 1])."""
    if loss_type == "cispo":
        weight = ratio.clamp(max=epsilon_high).detach()
        high = (ratio > epsilon_high) & (advantages > 0)
        return -weight * advantages * logps, torch.zeros_like(high), high
    if loss_type == "sapo":
        temperature = torch.where(advantages > 0, advantages.new_tensor(t_pos), advantages.new_tensor(t_neg))
        gate = torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        return -gate * advantages, low, high
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    return loss, (ratio < 1 - epsilon_low) & (advantages < 0), (ratio > 1 + epsilon_high) & (advantages > 0)


def _row_terms_ref(logps, old_logps, ref_logps, advantages, mask, cfg):
    """Per-sequence sums (loss differentiable in logps) and GRPOLossMetrics, in plain torch."""
    dtype = torch.promote_types(logps.dtype, torch.float32)
    logps = logps.to(dtype)
    old = (old_logps if old_logps is not None else logps).detach().to(dtype)
    adv = advantages.detach().to(dtype).unsqueeze(1)
    m = mask.to(dtype)
    tokens = m.sum(dim=1)
    log_ratio = logps - old
    if cfg["importance_sampling_level"] == "sequence":
        log_ratio = ((log_ratio * m).sum(dim=1) / tokens.clamp(min=1.0)).unsqueeze(1)
    ratio = log_ratio.exp()
    per_token, low, high = _policy_loss_ref(
        ratio, adv, logps, loss_type=cfg["loss_type"], epsilon_low=cfg["epsilon_low"],
        epsilon_high=cfg["epsilon_high"], delta=cfg["delta"], t_pos=cfg["sapo_temperature_pos"],
        t_neg=cfg["sapo_temperature_neg"],
    )  # fmt: skip
    if cfg.get("policy_weights") is not None:
        per_token = per_token * cfg["policy_weights"].detach().to(dtype)
    kl = None
    if cfg["beta"] != 0.0:
        d = ref_logps.detach().to(dtype) - logps
        per_token_kl = d.exp() - d - 1
        if cfg["use_bias_correction_kl"]:
            per_token_kl = per_token_kl * ratio
        per_token = per_token + cfg["beta"] * per_token_kl
        kl = (per_token_kl * m).sum(dim=1).detach().float()
    row_loss = (per_token * m).sum(dim=1)
    flags = [low, high, low | high]
    # by level, not by shape: TRL's metric helpers test x.shape[1] == 1, which also takes T == 1 for the sequence level
    if cfg["importance_sampling_level"] == "sequence":  # one clip decision per sequence
        counts = [f.squeeze(1).float() for f in flags]
        clip_weight = torch.ones_like(tokens, dtype=torch.float32)
    else:
        counts = [(f.to(dtype) * m).sum(dim=1).float() for f in flags]
        clip_weight = tokens.float()
    return row_loss, GRPOLossMetrics(tokens.float(), kl, *counts, clip_weight)


def _aggregate(row_loss, tokens, loss_type, max_completion_length, num_items):
    """The loss from per-sequence sums, as each TRL loss_type normalizes it (no gradient-accumulation scaling)."""
    B = row_loss.shape[0]
    if loss_type in ("grpo", "sapo"):
        return (row_loss / tokens.to(row_loss.dtype).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return row_loss.sum() / tokens.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return row_loss.sum() / (B * max_completion_length)
    if loss_type == "luspo":
        return row_loss.mean()
    # dapo, cispo: an explicit num_items is the caller's normalizer as given (TRL's may be below 1 once divided by
    # processes x accumulation steps); only the default token count is clamped
    if num_items is None:
        return row_loss.sum() / tokens.sum().clamp(min=1.0)
    if isinstance(num_items, torch.Tensor):
        return row_loss.sum() / num_items.to(device=row_loss.device, dtype=row_loss.dtype)
    return row_loss.sum() / num_items


def _config(
    loss_type,
    importance_sampling_level,
    beta,
    epsilon_low,
    epsilon_high,
    delta,
    sapo_temperature_pos,
    sapo_temperature_neg,
    use_bias_correction_kl,
    policy_weights=None,
):
    """The loss options as one dict, the form the kernels' launchers take."""
    return {
        "policy_weights": policy_weights,
        "loss_type": loss_type,
        "importance_sampling_level": importance_sampling_level,
        "beta": beta,
        "epsilon_low": epsilon_low,
        "epsilon_high": epsilon_high,
        "delta": delta,
        "sapo_temperature_pos": sapo_temperature_pos,
        "sapo_temperature_neg": sapo_temperature_neg,
        "use_bias_correction_kl": bool(use_bias_correction_kl),
    }


def grpo_loss_ref(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    return_metrics: bool = False,
):
    """Plain-PyTorch reference of `grpo_loss` on validated inputs: the test oracle and the CPU fallback.

    Math runs in float32 (float64 for float64 logps); autograd differentiates it with respect to logps.
    Returns the scalar loss, or (loss, GRPOLossMetrics) with return_metrics.
    """
    cfg = _config(
        loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, sapo_temperature_pos,
        sapo_temperature_neg, use_bias_correction_kl, policy_weights,
    )  # fmt: skip
    row_loss, metrics = _row_terms_ref(logps, old_logps, ref_logps, advantages, mask, cfg)
    loss = _aggregate(row_loss, metrics.tokens.to(row_loss.dtype), loss_type, max_completion_length, num_items)
    return (loss, metrics) if return_metrics else loss


def _launchers(impl: str):
    """(forward, backward) launchers of the per-sequence loss kernels: Triton's, or the CUDA extension's."""
    if impl == "cuda":
        from ._cuda import grpo_loss_bwd_cuda, grpo_loss_fwd_cuda

        return grpo_loss_fwd_cuda, grpo_loss_bwd_cuda
    from posttrain.kernels.grpo import grpo_loss_bwd, grpo_loss_fwd

    return grpo_loss_fwd, grpo_loss_bwd


class GRPOLossFunction(torch.autograd.Function):
    """Autograd wrapper of the kernels (posttrain.kernels.grpo, or csrc/ with impl="cuda") for the per-sequence part
    of the loss.

    forward(logps, old_logps, ref_logps, advantages, mask, cfg, impl) returns float32 [B] tensors (row_loss, tokens, kl or
    None, clip_low, clip_high, clip_region): row_loss[b] = sum_t mask[b, t] * per-token loss[b, t] is differentiable
    with respect to logps; the rest are statistics. cfg is the dict of loss options (see grpo_loss_fwd).
    """

    @staticmethod
    def forward(ctx, logps, old_logps, ref_logps, advantages, mask, cfg, impl="triton"):
        forward_launcher, ctx.backward_launcher = _launchers(impl)
        out = forward_launcher(logps, old_logps, ref_logps, advantages, mask, cfg)
        saved = (out["tokens"], out.get("coef"), out.get("dcoef"))
        ctx.save_for_backward(logps, old_logps, ref_logps, advantages, mask, *saved)
        ctx.cfg = cfg
        stats = [out[k] for k in ("tokens", "kl", "clip_low", "clip_high", "clip_region") if k in out]
        ctx.mark_non_differentiable(*stats)
        return out["loss"], out["tokens"], out.get("kl"), out["clip_low"], out["clip_high"], out["clip_region"]

    @staticmethod
    def backward(ctx, grad_rows, *_):
        logps, old_logps, ref_logps, advantages, mask, tokens, coef, dcoef = ctx.saved_tensors
        if grad_rows is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        saved = {"tokens": tokens, **({"coef": coef, "dcoef": dcoef} if coef is not None else {})}
        grad = ctx.backward_launcher(
            logps, old_logps, ref_logps, advantages, mask, grad_rows.float().contiguous(), saved, ctx.cfg
        )
        return grad, None, None, None, None, None, None


def _check_number(name, value, positive=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_inputs(logps, old_logps, ref_logps, advantages, mask, cfg, max_completion_length, num_items):
    check_float("logps", logps, dim=2)
    shape = tuple(logps.shape)
    for name, tensor in (("old_logps", old_logps), ("ref_logps", ref_logps)):
        if tensor is not None:
            check_float(name, tensor)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} to match logps")
    check_float("advantages", advantages)
    if tuple(advantages.shape) != shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({shape[0]},): one per sequence")
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {shape} to match logps")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or float, got {mask.dtype}")
    check_same_device(logps=logps, old_logps=old_logps, ref_logps=ref_logps, advantages=advantages, mask=mask)
    if cfg["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"loss_type {cfg['loss_type']!r} is not one of: {', '.join(LOSS_TYPES)}")
    level = cfg["importance_sampling_level"]
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level {level!r} is not one of: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    for name in ("beta", "epsilon_low", "epsilon_high"):
        _check_number(name, cfg[name])
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        _check_number(name, cfg[name], positive=True)
    if cfg["delta"] is not None:
        _check_number("delta", cfg["delta"])
    if cfg["beta"] != 0.0 and ref_logps is None:
        raise ValueError(f"beta={cfg['beta']!r} adds a KL penalty to the reference model, which needs ref_logps")
    if cfg["loss_type"] == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' divides by B * max_completion_length: max_completion_length is None")
        _check_number("max_completion_length", max_completion_length, positive=True)
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        _check_number("num_items", num_items, positive=True)
    weights = cfg["policy_weights"]
    if weights is not None:
        check_float("policy_weights", weights, dim=2)
        if weights.shape[0] != shape[0] or weights.shape[1] not in (1, shape[1]):
            raise ValueError(f"policy_weights has shape {tuple(weights.shape)}, expected ({shape[0]}, {shape[1]}) or "
                             f"({shape[0]}, 1)")  # fmt: skip
        check_same_device(logps=logps, policy_weights=weights)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items: torch.Tensor | float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    return_metrics: bool = False,
    impl: str = "auto",
):
    """GRPO policy loss of TRL 1.16's GRPOTrainer (`_compute_loss`), without its gradient-accumulation scaling.

    With ratio r = exp(logps - old_logps) per token ("token"), or per sequence exp(masked mean of logps - old_logps)
    ("sequence", GSPO), and A the sequence's advantage, the per-token loss is
      grpo, bnpo, dr_grpo, dapo, luspo: -min(r' A, clip(r, 1 - epsilon_low, 1 + epsilon_high) A), r' = min(r, delta)
          when delta is set (INTELLECT-2's two-sided clipping), else r;
      cispo: -min(r, epsilon_high).detach() * A * logps;
      sapo: -sigmoid(tau (r - 1)) * 4 / tau * A, tau = sapo_temperature_pos if A > 0 else sapo_temperature_neg;
    times policy_weights when given, plus beta * k3 KL when beta != 0: exp(ref - logps) - (ref - logps) - 1, times r
    when use_bias_correction_kl.
    The loss then aggregates loss[b, t] * mask[b, t] (S_b = sum over the row):
      grpo, sapo: mean_b(S_b / max(mask_b.sum(), 1));  bnpo: sum_b S_b / max(mask.sum(), 1);
      dr_grpo: sum_b S_b / (B * max_completion_length);  dapo, cispo: sum_b S_b / num_items;
      luspo: mean_b(S_b).

    Args:
        logps: [B, T] float32 / bfloat16 / float16 per-token log-probabilities of the completions (the policy).
        old_logps: [B, T] log-probabilities at sampling time, or None for logps.detach() (on-policy).
        advantages: [B] one per sequence (grpo_advantages).
        mask: [B, T] bool / integer / float completion mask; its values weight the tokens as in TRL.
        ref_logps: [B, T] reference-model log-probabilities; required when beta != 0.
        beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, sapo_temperature_pos,
            sapo_temperature_neg, use_bias_correction_kl: GRPOConfig's fields (epsilon_low is GRPOConfig.epsilon).
        max_completion_length: required by dr_grpo.
        num_items: dapo / cispo denominator (a number or a 0-d tensor, used as given), default max(mask.sum(), 1).
            TRL passes max(num_items_in_batch, 1) / num_processes * gradient_accumulation_steps /
            steps_per_generation here.
        policy_weights: [B, T] or [B, 1] constant weights of each token's policy term (not of its KL term): TRL's
            high-entropy token mask (top_entropy_quantile), off-policy sequence mask and vLLM importance ratios.
        return_metrics: also return a GRPOLossMetrics (per-sequence KL and clip counts; `.logs(loss_type)` gives TRL's
            logged values).
        impl: "auto" (the fastest available on CUDA: Triton or the CUDA extension; Triton under TRITON_INTERPRET=1;
            else torch), "triton", "cuda" (csrc/, when built) or "torch".

    Returns:
        The float32 scalar loss (float64 for float64 logps with impl="torch"/"auto"), differentiable with respect to
        logps only: old_logps, ref_logps, advantages and mask are constants. With return_metrics, (loss, metrics).

    Example:
        >>> logps = torch.randn(8, 32).clamp(max=0).requires_grad_()        # [B, T]
        >>> old = logps.detach() + 0.1 * torch.randn(8, 32)
        >>> advantages, mask = torch.randn(8), torch.ones(8, 32, dtype=torch.bool)
        >>> loss = grpo_loss(logps, old, advantages, mask, loss_type="dapo")   # float32 scalar
        >>> loss.backward()
        >>> loss, metrics = grpo_loss(logps, old, advantages, mask, epsilon_high=0.28, return_metrics=True)
        >>> metrics.logs("dapo")["clip_ratio/region_mean"]
    """
    cfg = _config(
        loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, sapo_temperature_pos,
        sapo_temperature_neg, use_bias_correction_kl, policy_weights,
    )  # fmt: skip
    _check_inputs(logps, old_logps, ref_logps, advantages, mask, cfg, max_completion_length, num_items)
    impl = "torch" if logps.dtype == torch.float64 and impl == "auto" else impl
    impl = resolve_impl(impl, logps.device, ("auto", "triton", "cuda", "torch"), op="grpo_loss")
    if impl == "torch" or logps.numel() == 0:
        return grpo_loss_ref(
            logps, old_logps, advantages, mask, ref_logps=ref_logps if cfg["beta"] != 0.0 else None, beta=beta,
            epsilon_low=epsilon_low, epsilon_high=epsilon_high, delta=delta, loss_type=loss_type,
            importance_sampling_level=importance_sampling_level, max_completion_length=max_completion_length,
            num_items=num_items, sapo_temperature_pos=sapo_temperature_pos,
            sapo_temperature_neg=sapo_temperature_neg, use_bias_correction_kl=use_bias_correction_kl,
            policy_weights=policy_weights, return_metrics=return_metrics,
        )  # fmt: skip
    if logps.dtype == torch.float64:
        raise TypeError(f"impl={impl!r} supports float32, bfloat16 and float16; logps is float64 (use impl='torch')")
    ref_logps = ref_logps if cfg["beta"] != 0.0 else None
    row_loss, tokens, kl, *clips = GRPOLossFunction.apply(logps, old_logps, ref_logps, advantages, mask, cfg, impl)
    loss = _aggregate(row_loss, tokens, loss_type, max_completion_length, num_items)
    if not return_metrics:
        return loss
    clip_weight = tokens if importance_sampling_level == "token" else torch.ones_like(tokens)
    return loss, GRPOLossMetrics(tokens, kl, *clips, clip_weight)
