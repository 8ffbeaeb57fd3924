"""GRPO policy loss: TRL 1.16's clipped (or gated) importance-weighted objective, KL penalty and loss aggregations."""

import math
from typing import NamedTuple

import torch

from ._common import check_float, check_same_device, resolve_impl

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
# Loss types whose TRL metrics are clip_ratio/{low_mean, high_mean, region_mean, low_min, high_max}
CLIPPED_SURROGATE_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
# Loss types divided by num_items (TRL: the loss tokens of the whole accumulated batch); the others by the micro-batch
TOKEN_NORMALIZED_LOSSES = ("dapo", "cispo", "vespo")
# VESPO's clamps, as TRL 1.16 (and the paper's code): each token's log-ratio to +-20, the sequence's log-weight to
# [log 1e-8, 20], lambda to at least 1e-4
VESPO_TOKEN_LOG_RATIO_LIMIT = 20.0
VESPO_LOG_W_RANGE = (math.log(1e-8), 20.0)
VESPO_LAMBDA_FLOOR = 1e-4
VESPO_FIELDS = ("vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg")


class GRPOLossMetrics(NamedTuple):
    """Per-sequence statistics behind the metrics TRL's GRPOTrainer logs from its loss; detached float32 [B] tensors.

    Each is a numerator or denominator, so that sums over processes give TRL's exact global means (see `logs`):

    - tokens: sum_t mask[b, t], the denominator of the KL mean.
    - kl: sum_t mask[b, t] * kl[b, t] (after the bias correction, if any); None when beta == 0.
    - clip_low / clip_high / clip_region: TRL's is_low_clipped / is_high_clipped / their union, summed over the
      row's tokens weighted by the mask at importance_sampling_level="token"; at "sequence" level one 0/1 flag per
      sequence (TRL then counts sequences, fully masked ones included). For cispo, clip_high is TRL's
      cispo_clip_ratio numerator (ratio > epsilon_high with a positive advantage) and clip_low is 0. The
      clipped-surrogate losses compare the delta-capped ratio, as TRL does. For sapo and vespo (no clip metrics in
      TRL) they count the raw ratio outside [1 - epsilon_low, 1 + epsilon_high] the same way.
    - clip_weight: the clip counts' denominator: `tokens` at token level, 1 per sequence at sequence level.
    - phi: vespo's per-sequence weight phi(w) (TRL's phi_seq); None for the other loss types.
    """

    tokens: torch.Tensor
    kl: torch.Tensor | None
    clip_low: torch.Tensor
    clip_high: torch.Tensor
    clip_region: torch.Tensor
    clip_weight: torch.Tensor
    phi: torch.Tensor | None = None

    def logs(self, loss_type: str, *, reduce=None, gather=None) -> dict[str, torch.Tensor]:
        """TRL's metric names and values (0-d tensors) for this loss_type, computed as GRPOTrainer._compute_loss does.

        reduce(t) must sum a tensor over processes (e.g. `lambda t: accelerator.reduce(t, reduction="sum")`) and
        gather(t) concatenate a [B] tensor over processes (`accelerator.gather`); both default to this process only.
        Gives "kl" when beta != 0; clip_ratio/low_mean, high_mean, region_mean, low_min, high_max for grpo, bnpo,
        dr_grpo, dapo and luspo; cispo_clip_ratio for cispo; vespo/phi_seq_mean (the mean over sequences) for vespo;
        no clip metric for sapo and vespo (TRL logs none).
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
        elif loss_type == "vespo":
            out["vespo/phi_seq_mean"] = global_mean(self.phi, torch.ones_like(self.phi))
        return out


def _policy_loss_ref(ratio, advantages, logps, phi, cfg):
    """Per-token policy loss and TRL's clip flags (low, high) at importance ratio `ratio` ([B, T] or [B, 1])."""
    loss_type, epsilon_low, epsilon_high = cfg["loss_type"], cfg["epsilon_low"], cfg["epsilon_high"]
    if loss_type == "cispo":
        weight = ratio.clamp(max=epsilon_high).detach()
        high = (ratio > epsilon_high) & (advantages > 0)
        return -weight * advantages * logps, torch.zeros_like(high), high
    if loss_type == "sapo":
        t_pos, t_neg = cfg["sapo_temperature_pos"], cfg["sapo_temperature_neg"]
        temperature = torch.where(advantages > 0, advantages.new_tensor(t_pos), advantages.new_tensor(t_neg))
        loss = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantages
    elif loss_type == "vespo":
        loss = -phi * advantages * logps
    else:
        clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
        if cfg["delta"] is not None:
            ratio = ratio.clamp(max=cfg["delta"])
        loss = -torch.minimum(ratio * advantages, clipped * advantages)
    return loss, (ratio < 1 - epsilon_low) & (advantages < 0), (ratio > 1 + epsilon_high) & (advantages > 0)


def _vespo_phi_ref(token_log_ratio, m, advantages, log_is, cfg):
    """VESPO's per-sequence weight [B] (no gradient): phi(w) = e^lam w^k e^(-lam w), w the clamped sequence ratio."""
    limit = VESPO_TOKEN_LOG_RATIO_LIMIT
    seq_log_ratio = (token_log_ratio.detach().clamp(-limit, limit) * m).sum(dim=1)
    if log_is is not None:
        seq_log_ratio = seq_log_ratio + log_is.to(seq_log_ratio.dtype)
    log_w = seq_log_ratio.clamp(*VESPO_LOG_W_RANGE)
    nonneg = advantages >= 0
    k = torch.where(nonneg, log_w.new_tensor(cfg["vespo_k_pos"]), log_w.new_tensor(cfg["vespo_k_neg"]))
    lam = torch.where(nonneg, log_w.new_tensor(cfg["vespo_lambda_pos"]), log_w.new_tensor(cfg["vespo_lambda_neg"]))
    lam = lam.clamp(min=VESPO_LAMBDA_FLOOR)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp())
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _select(x, valid):
    """x where valid, else 0: masked-out tokens drop out whatever they hold (NaN, inf), in value and gradient."""
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _row_terms_ref(logps, old_logps, ref_logps, advantages, mask, cfg):
    """Per-sequence sums (loss differentiable in logps) and GRPOLossMetrics, in plain torch."""
    dtype = torch.promote_types(logps.dtype, torch.float32)
    valid = mask != 0
    logps = _select(logps.to(dtype), valid)
    old = _select(old_logps.detach().to(dtype), valid) if old_logps is not None else logps.detach()
    adv = advantages.detach().to(dtype).unsqueeze(1)
    m = mask.to(dtype)
    tokens = m.sum(dim=1)
    token_log_ratio = logps - old
    log_ratio = token_log_ratio
    if cfg["importance_sampling_level"] == "sequence":
        log_ratio = ((log_ratio * m).sum(dim=1) / tokens.clamp(min=1.0)).unsqueeze(1)
    ratio = log_ratio.exp()
    phi = None
    if cfg["loss_type"] == "vespo":
        phi = _vespo_phi_ref(token_log_ratio, m, adv.squeeze(1), cfg["vespo_log_is"], cfg)
    per_token, low, high = _policy_loss_ref(ratio, adv, logps, None if phi is None else phi.unsqueeze(1), cfg)
    if cfg.get("policy_weights") is not None:
        per_token = per_token * _select(cfg["policy_weights"].detach().to(dtype), valid)
    kl = None
    if cfg["beta"] != 0.0:
        d = _select(ref_logps.detach().to(dtype), valid) - logps
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
    phi = None if phi is None else phi.float()
    return row_loss, GRPOLossMetrics(tokens.float(), kl, *counts, clip_weight, phi)


def _per_sequence_mean(x, num_sequences):
    return x.mean() if num_sequences is None else x.sum() / num_sequences


def _token_normalizer(row_loss, tokens, num_items):
    # an explicit num_items is the caller's normalizer as given (TRL's may be below 1 once divided by processes x
    # accumulation steps); only the default token count is clamped
    if num_items is None:
        return tokens.sum().clamp(min=1.0)
    if isinstance(num_items, torch.Tensor):
        return num_items.to(device=row_loss.device, dtype=row_loss.dtype)
    return num_items


def _aggregate(row_loss, tokens, loss_type, max_completion_length, num_items, num_sequences):
    """The loss from per-sequence sums, as each TRL loss_type normalizes it (no gradient-accumulation scaling)."""
    if loss_type in ("grpo", "sapo"):
        return _per_sequence_mean(row_loss / tokens.to(row_loss.dtype).clamp(min=1.0), num_sequences)
    if loss_type == "dr_grpo":
        sequences = row_loss.shape[0] if num_sequences is None else num_sequences
        return row_loss.sum() / (sequences * max_completion_length)
    if loss_type == "luspo":
        return _per_sequence_mean(row_loss, num_sequences)
    # bnpo, and the TOKEN_NORMALIZED_LOSSES
    return row_loss.sum() / _token_normalizer(row_loss, tokens, num_items)


def _vespo_log_is(importance_sampling_ratio, mask):
    """Per sequence, the sampler correction's log-ratio (each token's clamped as TRL) summed over unmasked tokens."""
    log_is = torch.log(importance_sampling_ratio.detach().float()).clamp(*VESPO_LOG_W_RANGE)
    if log_is.shape[1] == 1:  # a sequence-level ratio
        return log_is[:, 0].contiguous()
    return _select(log_is, mask != 0).sum(dim=1)


def _config(mask, options: dict, policy_weights, importance_sampling_ratio) -> dict:
    """The loss options and the per-token weights as one dict, the form the kernels' launchers take.

    The sampler correction (importance_sampling_ratio) multiplies the policy weights, except for vespo, which folds it
    into its sequence weight instead (TRL 1.16).
    """
    vespo_log_is = None
    if options["loss_type"] == "vespo":
        vespo_log_is = (
            _vespo_log_is(importance_sampling_ratio, mask)
            if importance_sampling_ratio is not None
            else torch.zeros(mask.shape[0], dtype=torch.float32, device=mask.device)
        )
    elif importance_sampling_ratio is not None:
        policy_weights = (
            importance_sampling_ratio if policy_weights is None else policy_weights * importance_sampling_ratio
        )
    return {**options, "policy_weights": policy_weights, "vespo_log_is": vespo_log_is}


def _options(loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, sapo_temperature_pos,
             sapo_temperature_neg, vespo, use_bias_correction_kl) -> dict:  # fmt: skip
    return {
        "loss_type": loss_type,
        "importance_sampling_level": importance_sampling_level,
        "beta": beta,
        "epsilon_low": epsilon_low,
        "epsilon_high": epsilon_high,
        "delta": delta,
        "sapo_temperature_pos": sapo_temperature_pos,
        "sapo_temperature_neg": sapo_temperature_neg,
        **dict(zip(VESPO_FIELDS, vespo)),
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
    num_sequences: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
    return_metrics: bool = False,
):
    """Plain-PyTorch reference of `grpo_loss` on validated inputs: the test oracle and the CPU fallback.

    Math runs in float32 (float64 for float64 logps); autograd differentiates it with respect to logps.
    Returns the scalar loss, or (loss, GRPOLossMetrics) with return_metrics.
    """
    options = _options(
        loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, sapo_temperature_pos,
        sapo_temperature_neg, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg), use_bias_correction_kl,
    )  # fmt: skip
    cfg = _config(mask, options, policy_weights, importance_sampling_ratio)
    row_loss, metrics = _row_terms_ref(logps, old_logps, ref_logps, advantages, mask, cfg)
    tokens = metrics.tokens.to(row_loss.dtype)
    loss = _aggregate(row_loss, tokens, loss_type, max_completion_length, num_items, num_sequences)
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
    None, clip_low, clip_high, clip_region, phi or None): row_loss[b] = sum_t mask[b, t] * per-token loss[b, t] is
    differentiable with respect to logps; the rest are statistics. cfg is the dict of loss options (see
    grpo_loss_fwd).
    """

    @staticmethod
    def forward(ctx, logps, old_logps, ref_logps, advantages, mask, cfg, impl="triton"):
        forward_launcher, ctx.backward_launcher = _launchers(impl)
        out = forward_launcher(logps, old_logps, ref_logps, advantages, mask, cfg)
        ctx.saved_names = [name for name in ("tokens", "coef", "dcoef", "phi") if name in out]
        ctx.save_for_backward(logps, old_logps, ref_logps, advantages, mask, *(out[k] for k in ctx.saved_names))
        ctx.cfg = cfg
        stats = [out[k] for k in ("tokens", "kl", "clip_low", "clip_high", "clip_region", "phi") if k in out]
        ctx.mark_non_differentiable(*stats)
        return (
            out["loss"], out["tokens"], out.get("kl"), out["clip_low"], out["clip_high"], out["clip_region"],
            out.get("phi"),
        )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_rows, *_):
        logps, old_logps, ref_logps, advantages, mask, *kept = ctx.saved_tensors
        if grad_rows is None or not ctx.needs_input_grad[0]:
            return (None,) * 7
        saved = dict(zip(ctx.saved_names, kept))
        grad = ctx.backward_launcher(
            logps, old_logps, ref_logps, advantages, mask, grad_rows.float().contiguous(), saved, ctx.cfg
        )
        return grad, None, None, None, None, None, None


def _check_number(name, value, positive=False, nonnegative=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    if nonnegative and value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_weights(name, weights, shape, logps):
    check_float(name, weights, dim=2)
    if weights.shape[0] != shape[0] or weights.shape[1] not in (1, shape[1]):
        raise ValueError(
            f"{name} has shape {tuple(weights.shape)}, expected ({shape[0]}, {shape[1]}) or ({shape[0]}, 1)"
        )
    check_same_device(logps=logps, **{name: weights})


def _check_tensors(logps, old_logps, ref_logps, advantages, mask):
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


def _check_options(options, ref_logps, max_completion_length, num_items, num_sequences):
    if options["loss_type"] not in LOSS_TYPES:
        raise ValueError(f"loss_type {options['loss_type']!r} is not one of: {', '.join(LOSS_TYPES)}")
    level = options["importance_sampling_level"]
    if level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"importance_sampling_level {level!r} is not one of: {', '.join(IMPORTANCE_SAMPLING_LEVELS)}")
    _check_number("beta", options["beta"], nonnegative=True)
    for name in ("epsilon_low", "epsilon_high"):
        # the clipping range [1 - epsilon_low, 1 + epsilon_high] must hold 1: a negative epsilon would invert it
        _check_number(name, options[name], nonnegative=True)
    for name in VESPO_FIELDS:
        _check_number(name, options[name])
    for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
        _check_number(name, options[name], positive=True)
    if options["delta"] is not None:
        _check_number("delta", options["delta"])
    if options["beta"] != 0.0 and ref_logps is None:
        raise ValueError(f"beta={options['beta']!r} adds a KL penalty to the reference model, which needs ref_logps")
    if options["loss_type"] == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' divides by B * max_completion_length: max_completion_length is None")
        _check_number("max_completion_length", max_completion_length, positive=True)
    if num_items is not None and not isinstance(num_items, torch.Tensor):
        _check_number("num_items", num_items, positive=True)
    if num_sequences is not None:
        _check_number("num_sequences", num_sequences, positive=True)


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
    num_sequences: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    use_bias_correction_kl: bool = True,
    policy_weights: torch.Tensor | None = None,
    importance_sampling_ratio: torch.Tensor | None = None,
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
      vespo: -phi * A * logps, phi (no gradient) = e^lam w^k e^(-lam w) with log w = the sequence's summed token
          log-ratios (each clamped to +-20; plus the sampler correction's summed log-ratios), clamped to
          [log 1e-8, 20]; k, lam = vespo_k_pos, vespo_lambda_pos if A >= 0 else vespo_k_neg, vespo_lambda_neg
          (lam >= 1e-4); phi is 0 where it is NaN or inf. Whatever the importance_sampling_level, as TRL.
    times policy_weights (and, but for vespo, importance_sampling_ratio) when given, plus beta * k3 KL when
    beta != 0: exp(ref - logps) - (ref - logps) - 1, times r when use_bias_correction_kl.
    The loss then aggregates loss[b, t] * mask[b, t] (S_b = sum over the row; N = num_sequences, default B):
      grpo, sapo: sum_b(S_b / max(mask_b.sum(), 1)) / N;  luspo: sum_b S_b / N;  dr_grpo: sum_b S_b / (N *
      max_completion_length);  bnpo, dapo, cispo, vespo: sum_b S_b / num_items (default max(mask.sum(), 1)).
    Tokens where mask == 0 do not contribute whatever logps, old_logps, ref_logps, policy_weights and
    importance_sampling_ratio hold there (NaN, inf), and get a zero gradient.

    Every normalizer is an argument, so the loss of a chunk of whole sequences with the whole batch's num_items /
    num_sequences is that chunk's share of the batch loss: the chunks' losses sum to the batch's.

    Args:
        logps: [B, T] float32 / bfloat16 / float16 per-token log-probabilities of the completions (the policy).
        old_logps: [B, T] log-probabilities at sampling time, or None for logps.detach() (on-policy).
        advantages: [B] one per sequence (grpo_advantages).
        mask: [B, T] bool / integer / float completion mask; its values weight the tokens as in TRL.
        ref_logps: [B, T] reference-model log-probabilities; required when beta != 0.
        beta, epsilon_low, epsilon_high, delta, loss_type, importance_sampling_level, sapo_temperature_pos,
            sapo_temperature_neg, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
            use_bias_correction_kl: GRPOConfig's fields (epsilon_low is GRPOConfig.epsilon; beta, epsilon_low and
            epsilon_high >= 0).
        max_completion_length: required by dr_grpo.
        num_items: the token normalizer of bnpo, dapo, cispo and vespo (a number or a 0-d tensor, used as given),
            default max(mask.sum(), 1). TRL passes max(num_items_in_batch, 1) / num_processes *
            gradient_accumulation_steps / steps_per_generation here for dapo, cispo and vespo.
        num_sequences: the sequence count of grpo, sapo, dr_grpo and luspo, default B.
        policy_weights: [B, T] or [B, 1] constant weights of each token's policy term (not of its KL term): TRL's
            high-entropy token mask (top_entropy_quantile) and off-policy sequence mask.
        importance_sampling_ratio: [B, T] or [B, 1] constant vLLM importance-sampling correction (TRL's
            importance_sampling_ratio): a policy weight, but for vespo, which adds its clamped log to log w.
        return_metrics: also return a GRPOLossMetrics (per-sequence KL, clip counts and vespo's phi;
            `.logs(loss_type)` gives TRL's logged values).
        impl: "auto" (the fastest available on CUDA: Triton or the CUDA extension; Triton under TRITON_INTERPRET=1;
            else torch), "triton", "cuda" (csrc/, when built; no vespo) or "torch".

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
        >>> grpo_loss(logps, old, advantages, mask, loss_type="vespo", return_metrics=True)[1].logs("vespo")
    """
    options = _options(
        loss_type, importance_sampling_level, beta, epsilon_low, epsilon_high, delta, sapo_temperature_pos,
        sapo_temperature_neg, (vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg), use_bias_correction_kl,
    )  # fmt: skip
    _check_tensors(logps, old_logps, ref_logps, advantages, mask)
    _check_options(options, ref_logps, max_completion_length, num_items, num_sequences)
    for name, weights in (("policy_weights", policy_weights), ("importance_sampling_ratio", importance_sampling_ratio)):
        if weights is not None:
            _check_weights(name, weights, tuple(logps.shape), logps)
    impl = "torch" if logps.dtype == torch.float64 and impl == "auto" else impl
    impl = resolve_impl(impl, logps.device, ("auto", "triton", "cuda", "torch"), op="grpo_loss")
    ref_logps = ref_logps if beta != 0.0 else None
    if impl == "torch" or logps.numel() == 0:
        return grpo_loss_ref(
            logps, old_logps, advantages, mask, ref_logps=ref_logps, max_completion_length=max_completion_length,
            num_items=num_items, num_sequences=num_sequences, policy_weights=policy_weights,
            importance_sampling_ratio=importance_sampling_ratio, return_metrics=return_metrics, **options,
        )  # fmt: skip
    if logps.dtype == torch.float64:
        raise TypeError(f"impl={impl!r} supports float32, bfloat16 and float16; logps is float64 (use impl='torch')")
    cfg = _config(mask, options, policy_weights, importance_sampling_ratio)
    if impl == "cuda":
        if loss_type == "vespo":
            raise NotImplementedError("impl='cuda' has no vespo kernel (csrc/grpo.cu): use impl='triton' or 'torch'")
    row_loss, tokens, kl, *clips, phi = GRPOLossFunction.apply(logps, old_logps, ref_logps, advantages, mask, cfg, impl)
    loss = _aggregate(row_loss, tokens, loss_type, max_completion_length, num_items, num_sequences)
    if not return_metrics:
        return loss
    clip_weight = tokens if importance_sampling_level == "token" else torch.ones_like(tokens)
    return loss, GRPOLossMetrics(tokens, kl, *clips, clip_weight, phi)
