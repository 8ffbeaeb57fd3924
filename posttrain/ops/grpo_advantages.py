"""GRPO advantages: per-completion rewards normalized within each prompt's group of generations, as TRL's GRPOTrainer."""

import math
from collections.abc import Sequence

import torch

from ._common import check_float, check_same_device, resolve_impl

SCALE_REWARDS = ("group", "batch", "none")
MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
# Added to every standard deviation before dividing by it, as TRL
STD_EPS = 1e-4


def nan_mean_std(x: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-ignoring mean and Bessel-corrected std along `dim` (all elements when None), dimensions kept.

    Both are NaN without any value; the std is NaN with a single value (no spread can be estimated from one sample).
    The one NaN-aware std of posttrain: GRPO's advantages and its logged reward_std.

    Args:
        x: float tensor, NaN where there is no value.
        dim: the dimension to reduce, or None for all of them.

    Returns:
        (mean, std) in x's dtype, with size 1 along the reduced dimension(s).

    Example:
        >>> nan_mean_std(torch.tensor([1.0, float("nan"), 3.0]))
        (tensor([2.]), tensor([1.4142]))
    """
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    valid = ~torch.isnan(x)
    count = valid.sum(dim=dims, keepdim=True).to(x.dtype)
    mean = torch.where(valid, x, 0.0).sum(dim=dims, keepdim=True) / count
    sq_dev = torch.where(valid, (x - mean) ** 2, 0.0).sum(dim=dims, keepdim=True)
    std = torch.where(count > 1, (sq_dev / (count - 1)).sqrt(), math.nan)
    return mean, std


def _nan_weighted_sum(x: torch.Tensor, weights: torch.Tensor, unscorable: torch.Tensor) -> torch.Tensor:
    """sum_k x[:, k] * weights[k], skipping NaN products (0 when all are NaN); NaN for the `unscorable` rows."""
    weighted = x * weights
    total = torch.where(torch.isnan(weighted), 0.0, weighted).sum(dim=1)
    return torch.where(unscorable, math.nan, total)


def grpo_advantages_ref(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_weights: torch.Tensor | None = None,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    return_std: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference of `grpo_advantages` on validated inputs: the test oracle and the CPU fallback.

    Math runs in float32 (float64 for float64 rewards). scale_rewards must already be one of SCALE_REWARDS.
    Returns advantages [B], and with return_std also the std each advantage is divided by (see grpo_advantages).
    """
    dtype = torch.promote_types(rewards.dtype, torch.float32)
    x = rewards.detach().to(dtype)
    B, R = x.shape
    weights = torch.ones(R, dtype=dtype, device=x.device) if reward_weights is None else reward_weights.to(dtype)
    # every reward function returned None: no baseline contribution, advantage 0
    unscorable = torch.isnan(x).all(dim=1)
    if multi_objective_aggregation == "normalize_then_sum":
        per_group = x.view(-1, num_generations, R)
        mean_k, std_k = nan_mean_std(per_group, dim=1)
        normalized = ((per_group - mean_k) / (std_k + STD_EPS)).view(B, R)
        # a scored completion whose functions all normalize to NaN (one value in its group) still sums to 0
        combined = _nan_weighted_sum(normalized, weights, unscorable)
        mean, std = nan_mean_std(combined)
        advantages = (combined - mean) / (std + STD_EPS)
        std = std.expand(B)
    else:
        combined = _nan_weighted_sum(x, weights, unscorable)
        group_mean, group_std = nan_mean_std(combined.view(-1, num_generations), dim=1)
        advantages = combined - group_mean.repeat_interleave(num_generations)
        if scale_rewards == "batch":
            std = nan_mean_std(combined)[1].expand(B)
        else:
            std = group_std.repeat_interleave(num_generations)
        if scale_rewards != "none":
            advantages = advantages / (std + STD_EPS)
    advantages = torch.nan_to_num(advantages, nan=0.0)
    return (advantages, std) if return_std else advantages


def _resolve_scale_rewards(scale_rewards) -> str:
    # GRPOConfig accepts the booleans of older TRL versions: True is "group", False is "none"
    if scale_rewards is True:
        return "group"
    if scale_rewards is False:
        return "none"
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards {scale_rewards!r} is not one of: {', '.join(SCALE_REWARDS)} (or True, False)")
    return scale_rewards


def _check_inputs(rewards, num_generations, reward_weights, multi_objective_aggregation):
    check_float("rewards", rewards, dim=2)
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 2:
        raise ValueError(f"num_generations must be an integer >= 2, got {num_generations!r}")
    if rewards.shape[0] % num_generations != 0:
        raise ValueError(
            f"rewards has {rewards.shape[0]} rows (shape {tuple(rewards.shape)}), which is not a multiple of "
            f"num_generations ({num_generations}): each prompt's completions must form a whole group"
        )
    if multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
        raise ValueError(
            f"multi_objective_aggregation {multi_objective_aggregation!r} is not one of: "
            f"{', '.join(MULTI_OBJECTIVE_AGGREGATIONS)}"
        )
    if reward_weights is None:
        return None
    weights = torch.as_tensor(reward_weights, dtype=torch.float32, device=rewards.device)
    if weights.dim() != 1 or weights.shape[0] != rewards.shape[1]:
        raise ValueError(
            f"reward_weights has shape {tuple(weights.shape)}, expected ({rewards.shape[1]},): one weight per reward "
            f"function (rewards is {tuple(rewards.shape)})"
        )
    if isinstance(reward_weights, torch.Tensor):
        check_same_device(rewards=rewards, reward_weights=reward_weights)
    return weights


@torch.no_grad()
def grpo_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    *,
    reward_weights: torch.Tensor | Sequence[float] | None = None,
    scale_rewards: str | bool = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    return_std: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages of a generation batch, exactly as TRL 1.16's GRPOTrainer computes them (not differentiable).

    Rows b*G .. b*G + G - 1 (G = num_generations) are the completions of one prompt. Per completion, the rewards are
    combined into one number, centred on the group's mean and scaled:

    - "sum_then_normalize" (default): r = sum_k w_k * rewards[:, k], skipping NaN; advantage = (r - mean of r over
      the group) / (std + 1e-4), where std is the group's (scale_rewards="group"), the whole batch's ("batch"), or
      no division at all ("none").
    - "normalize_then_sum" (GDPO): each reward function is first normalized within each group, (x - mean) / (std +
      1e-4); r = sum_k w_k * normalized_k, skipping NaN; advantage = (r - batch mean) / (batch std + 1e-4).
      scale_rewards is ignored (as in TRL).

    Means and standard deviations ignore NaN; stds are Bessel-corrected (NaN for fewer than two values). A
    completion whose rewards are all NaN (every reward function returned None) is left out of every statistic and
    gets advantage 0; so does every completion of a group whose std is undefined. Statistics cover the tensor given,
    so pass the whole generation batch (TRL gathers it across processes first).

    Args:
        rewards: [B, R] float, one column per reward function, NaN where a function returned None. B must be a
            multiple of num_generations.
        num_generations: completions per prompt, >= 2.
        reward_weights: [R] weights (a tensor or a list); default all ones.
        scale_rewards: "group", "batch" or "none"; True and False mean "group" and "none", as in GRPOConfig.
        multi_objective_aggregation: "sum_then_normalize" or "normalize_then_sum".
        return_std: also return the [B] std behind each advantage (TRL's `std_rewards`, whose zeros it logs as
            frac_reward_zero_std); with scale_rewards="none" it is the group std that would have been used.
        impl: "auto" (the fastest available on CUDA: Triton or the CUDA extension; Triton under TRITON_INTERPRET=1;
            else torch), "triton", "cuda" (csrc/, when built) or "torch".

    Returns:
        float32 advantages [B] (float64 for float64 rewards with impl="torch"/"auto"), or (advantages, std).

    Example:
        >>> rewards = torch.tensor([[1.0, 0.5], [0.0, 0.5], [1.0, float("nan")], [0.0, 1.0]])  # 2 prompts x 2
        >>> grpo_advantages(rewards, num_generations=2)                      # [4] float32
        >>> grpo_advantages(rewards, 2, reward_weights=[1.0, 0.1], scale_rewards="batch")
    """
    scale_rewards = _resolve_scale_rewards(scale_rewards)
    weights = _check_inputs(rewards, num_generations, reward_weights, multi_objective_aggregation)
    impl = "torch" if rewards.dtype == torch.float64 and impl == "auto" else impl
    impl = resolve_impl(impl, rewards.device, ("auto", "triton", "cuda", "torch"), op="grpo_advantages")
    normalize_then_sum = multi_objective_aggregation == "normalize_then_sum"
    if impl == "torch":
        return grpo_advantages_ref(
            rewards, num_generations, reward_weights=weights, scale_rewards=scale_rewards,
            multi_objective_aggregation=multi_objective_aggregation, return_std=return_std,
        )  # fmt: skip
    if weights is None:
        weights = torch.ones(rewards.shape[1], dtype=torch.float32, device=rewards.device)
    args = (rewards, weights.contiguous(), num_generations, scale_rewards, normalize_then_sum, return_std, STD_EPS)
    if impl == "cuda":
        from ._cuda import grpo_advantages_cuda

        advantages, std = grpo_advantages_cuda(*args)
    else:
        from posttrain.kernels.grpo import grpo_advantages_fwd

        advantages, std = grpo_advantages_fwd(*args)
    return (advantages, std) if return_std else advantages
