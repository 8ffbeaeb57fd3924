"""The reward model's loss (TRL 1.16's RewardTrainer): Bradley-Terry on the scores of chosen and rejected sequences,
with an optional margin and the reward-centering term, and its pair statistics."""

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """mean(-log sigmoid(r_chosen - r_rejected - margin)) + coefficient * mean((r_chosen + r_rejected)^2).

    The centering term (Eisenstein et al. 2023, Eq. 2) pulls each pair's rewards towards a zero sum, which keeps the
    reward's scale anchored; it is added only when the coefficient is not None. Computed in float32 whatever the
    input dtype.

    Args:
        chosen_rewards: [B] scores of the chosen sequences (differentiable).
        rejected_rewards: [B] scores of the rejected sequences.
        margin: [B] or None: how much the chosen score should exceed the rejected one (the dataset's `margin`).
        center_rewards_coefficient: weight of the centering term, or None.

    Returns:
        a 0-d float32 tensor.

    Example:
        >>> bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))   # (-log s(1) - log s(0)) / 2
        tensor(0.5032)
    """
    _check_pair_shapes(chosen_rewards, rejected_rewards)
    chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
    difference = chosen - rejected
    if margin is not None:
        if margin.shape != chosen.shape:
            raise ValueError(
                f"margin must have the shape of the rewards {tuple(chosen.shape)}, got {tuple(margin.shape)}"
            )
        difference = difference - margin.to(difference)
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * (chosen + rejected).square().mean()
    return loss


def pair_statistics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(accuracy, margin) of a batch of pairs, without gradient: the fraction of pairs whose chosen score is strictly
    above the rejected one, and the mean of r_chosen - r_rejected (the dataset's margin is not subtracted).

    Args:
        chosen_rewards, rejected_rewards: [B] scores.

    Returns:
        two 0-d float32 tensors.

    Example:
        >>> pair_statistics(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
        (tensor(0.5000), tensor(0.5000))
    """
    _check_pair_shapes(chosen_rewards, rejected_rewards)
    with torch.no_grad():
        chosen, rejected = chosen_rewards.float(), rejected_rewards.float()
        return (chosen > rejected).float().mean(), (chosen - rejected).mean()


def _check_pair_shapes(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            "chosen_rewards and rejected_rewards must be 1-D tensors of the same length, got shapes "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
