"""RLOO advantages: each completion's reward minus the mean reward of the other completions of its prompt (the
leave-one-out baseline), as TRL 1.16's RLOOTrainer computes them."""

import math
from collections.abc import Sequence

import torch

from ._common import check_float, check_same_device, resolve_impl
from .grpo_advantages import STD_EPS, _check_inputs, _nan_weighted_sum, nan_mean_std


def rloo_advantages_ref(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_weights: torch.Tensor | None = None,
    reward_clip_range: tuple[float, float] | None = None,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    normalize: bool = False,
    return_std: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of `rloo_advantages` on validated inputs: the test oracle and the CPU fallback.

    Math runs in float32 (float64 for float64 rewards). Returns advantages [B], and with return_std also the [B] std
    of each completion's group (see rloo_advantages).
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    x = rewards.detach().to(dtype)
    B, R = x.shape
    weights = torch.ones(R, dtype=dtype, device=x.device) if reward_weights is None else reward_weights.to(dtype)
    total = _nan_weighted_sum(x, weights, torch.isnan(x).all(dim=1))
    if reward_clip_range is not None:
        total = total.clamp(min=reward_clip_range[0], max=reward_clip_range[1])
    if kl is not None:
        total = total - beta * kl.detach().to(dtype)
    grouped = total.view(-1, num_generations)
    scorable = ~torch.isnan(grouped)
    count = scorable.sum(dim=1, keepdim=True).to(dtype)
    group_sum = torch.where(scorable, grouped, 0.0).sum(dim=1, keepdim=True)
    advantages = (grouped - (group_sum - grouped) / (count - 1)).view(B)
    if normalize:
        mean, std = nan_mean_std(advantages)
        advantages = (advantages - mean) / (std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    if not return_std:
        return advantages
    return advantages, nan_mean_std(grouped, dim=1)[1].expand(-1, num_generations).reshape(B)


def _check_rloo_inputs(rewards, reward_clip_range, kl, beta) -> None:
    if reward_clip_range is not None:
        low, high = reward_clip_range
        if not (math.isfinite(low) and math.isfinite(high) and low <= high):
            raise ValueError(f"reward_clip_range must be (min, max) with finite min <= max, got {reward_clip_range!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta):
        raise ValueError(f"beta must be a finite number, got {beta!r}")
    if kl is None:
        return
    check_float("kl", kl, dim=1)
    if kl.shape[0] != rewards.shape[0]:
        raise ValueError(f"kl has shape {tuple(kl.shape)}, expected ({rewards.shape[0]},): one value per completion")
    check_same_device(rewards=rewards, kl=kl)


@torch.no_grad()
def rloo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    reward_clip_range: tuple[float, float] | None = None,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    normalize: bool = False,
    return_std: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RLOO advantages of a generation batch, exactly as TRL 1.16's RLOOTrainer computes them (not differentiable).

    Rows b*G .. b*G + G - 1 (G = num_generations) are the completions of one prompt. Per completion:

    r = sum_k w_k * rewards[:, k] (skipping NaN; NaN when every function returned None), clipped to
    reward_clip_range, minus beta * kl (TRL's KL penalty in the reward); advantage = r - the mean r of the group's
    other scorable completions. With `normalize` (TRL's normalize_advantages), advantages are then standardized over
    the whole batch: (a - mean) / (std + 1e-4), ignoring NaN. Unscorable completions, and groups with a single
    scorable completion, get advantage 0. Statistics cover the tensor given, so pass the whole generation batch (TRL
    gathers it across processes first).

    Args:
        rewards: [B, R] float, one column per reward function, NaN where a function returned None. B must be a
            multiple of num_generations.
        num_generations: completions per prompt, >= 2.
        reward_weights: [R] weights (a tensor or a list); default all ones.
        reward_clip_range: (min, max) to clamp the weighted rewards to, or None.
        kl: [B] float, each completion's summed per-token log-ratio log pi_old - log pi_ref (with beta), or None.
        beta: the KL penalty's coefficient.
        normalize: standardize the advantages over the batch.
        return_std: also return the [B] std (Bessel, NaN-aware) of each completion's group of clipped, penalized
            rewards (TRL's `std_rewards`, whose zeros it logs as frac_reward_zero_std).
        impl: "auto" (Triton on CUDA or under TRITON_INTERPRET=1, else torch), "triton" or "torch".

    Returns:
        float32 advantages [B] (float64 for float64 rewards with impl="torch"/"auto"), or (advantages, std).

    Example:
        >>> rewards = torch.tensor([[1.0], [0.0], [0.5], [2.0], [1.0], [0.0]])     # 2 prompts x 3 completions
        >>> rloo_advantages(rewards, num_generations=3)                            # [6] float32
        tensor([ 0.7500, -0.7500,  0.0000,  1.5000,  0.0000, -1.5000])
        >>> rloo_advantages(rewards, 3, kl=torch.rand(6), beta=0.05, normalize=True)
    """
    weights = _check_inputs(rewards, num_generations, reward_weights, "sum_then_normalize")
    _check_rloo_inputs(rewards, reward_clip_range, kl, beta)
    impl = "torch" if rewards.dtype == torch.float64 and impl == "auto" else impl
    impl = resolve_impl(impl, rewards.device)
    if impl == "torch":
        return rloo_advantages_ref(
            rewards, num_generations, reward_weights=weights, reward_clip_range=reward_clip_range, kl=kl, beta=beta,
            normalize=normalize, return_std=return_std,
        )  # fmt: skip
    from posttrain.kernels.grpo import rloo_advantages_fwd

    if weights is None:
        weights = torch.ones(rewards.shape[1], dtype=torch.float32, device=rewards.device)
    advantages, std = rloo_advantages_fwd(
        rewards, weights.contiguous(), kl.contiguous() if kl is not None else None, num_generations,
        reward_clip_range, beta, normalize, return_std, STD_EPS,
    )  # fmt: skip
    return (advantages, std) if return_std else advantages
