"""TRL 1.16's importance-sampling correction of the sampler / trainer mismatch (vllm_importance_sampling_*): the
completions were sampled from the engine's distribution, the loss assumes the trainer's; each token's (or sequence's)
policy term is weighted by p_trainer / p_sampler, truncated or masked where it leaves [clip_min, clip_max]."""

import math

import torch


def importance_sampling_ratio(
    old_logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """exp(old_logps - sampling_logps) per token ("token_*" modes) or summed over each completion ("sequence_*"),
    clamped to [clip_min, clip_max] ("*_truncate") or set to 0 outside it ("*_mask"); a None bound is open.

    Args:
        old_logps: [B, T] float, the trainer's log-probs of the sampled tokens (no gradient).
        sampling_logps: [B, T] float, the sampler's; NaN where the engine had none (no correction there).
        mask: [B, T] bool / int, the completion tokens; others contribute nothing.
        mode: "token_truncate", "token_mask", "sequence_truncate" or "sequence_mask".

    Returns:
        [B, T] (token modes) or [B, 1] (sequence modes), in old_logps' dtype: grpo_loss's importance_sampling_ratio.

    Example:
        >>> importance_sampling_ratio(torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]]), torch.ones(1, 2),
        ...                           mode="token_truncate", clip_max=1.5)
        tensor([[1.5000, 1.0000]])
    """
    diff = torch.nan_to_num((old_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence_"):
        diff = diff.sum(dim=-1, keepdim=True)
    elif not mode.startswith("token_"):
        raise ValueError(f"vllm_importance_sampling_mode {mode!r} is not one of the token_* / sequence_* modes")
    ratio = torch.exp(diff)
    if mode.endswith("_truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    if not mode.endswith("_mask"):
        raise ValueError(f"vllm_importance_sampling_mode {mode!r} is not one of the *_truncate / *_mask modes")
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


def sampling_mismatch_stats(
    old_logps: torch.Tensor, sampling_logps: torch.Tensor, mask: torch.Tensor, ratio: torch.Tensor, *, mode: str
) -> dict[str, torch.Tensor]:
    """This process's statistics behind TRL's sampling/* metrics, as 0-d tensors: |old - sampling| mean and max over
    the completion tokens the sampler scored, and the ratio's min, mean and max (over completion tokens in token_*
    modes, over every sequence in sequence_* modes); 0 when there is nothing to average.

    Reduce across processes as TRL does: mean_delta by mean, max_delta by max, ratio_min by nanmin, ratio_mean by
    nanmean, ratio_max by nanmax.
    """
    mask = mask.bool()
    delta = (old_logps - sampling_logps).abs()
    delta = delta[mask & ~torch.isnan(delta)]
    flat = ratio.flatten() if mode.startswith("sequence_") else ratio[mask]
    zero = old_logps.new_zeros(())

    def stat(fn, values):
        return fn(values) if values.numel() > 0 else zero

    return {
        "mean_delta": stat(torch.mean, delta),
        "max_delta": stat(torch.max, delta),
        "ratio_min": stat(torch.min, flat),
        "ratio_mean": stat(torch.mean, flat),
        "ratio_max": stat(torch.max, flat),
    }
