"""KTO's tensor math below the trainer: the reference point z0 (the batch's KL estimate) and TRL 1.16's unpaired
losses ("kto", "apo_zero_unpaired") of each example, desirable or undesirable.

An example's implied reward is beta * (log pi(y|x) - log pi_ref(y|x)), its completion's summed log-probs under the
policy and the reference. KTO compares it with z0, an estimate of KL(pi || pi_ref) from mismatched (prompt,
completion) pairs of the same batch; APO-zero compares it with 0.
"""

from collections.abc import Callable

import torch

# loss type -> whether it reads the KL estimate (and so needs the mismatched pairs and the sequential sampling that
# keeps each batch's mismatched pairs together)
ESTIMATES_KL = {"kto": True, "apo_zero_unpaired": False}
LOSS_TYPES = tuple(ESTIMATES_KL)


def check_loss_type(loss_type: str) -> None:
    """ValueError naming `loss_type` when it is not one of LOSS_TYPES."""
    if loss_type not in ESTIMATES_KL:
        raise ValueError(f"loss_type {loss_type!r} is not one of: {', '.join(LOSS_TYPES)}")


def kl_estimate(
    kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> torch.Tensor:
    """KTO's reference point z0: the mean over the mismatched pairs of log pi - log pi_ref, averaged over processes
    (`gather` stacks each process's mean), clamped at 0, without gradient.

    Args:
        kl_logps: [B] float, the mismatched completions' summed log-probs under the policy.
        ref_kl_logps: [B] float, the same under the reference.
        gather: a process's [1] tensor -> [P] tensor of every process's (None: one process).

    Returns:
        a 0-dim tensor >= 0 in kl_logps' dtype.

    Example:
        >>> kl_estimate(torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -5.5]))
        tensor(0.7500)
    """
    local = (kl_logps - ref_kl_logps).mean().detach().reshape(1)
    return (local if gather is None else gather(local)).mean().clamp(min=0)


def kto_losses(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float = 0.0,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Each example's weighted loss, as TRL 1.16's KTOTrainer (its batch loss is their mean).

    With r = beta * (logps - ref_logps) and z = beta * kl:
        "kto":               desirable 1 - sigmoid(r - z),   undesirable 1 - sigmoid(z - r)   (KTO paper, eq. 7)
        "apo_zero_unpaired": desirable 1 - sigmoid(r),       undesirable sigmoid(r)           (APO paper, eq. 7)
    times desirable_weight or undesirable_weight. 1 - sigmoid(x) is computed as sigmoid(-x) (no cancellation).

    Args:
        logps: [B] float, the completions' summed log-probs under the policy (differentiable).
        ref_logps: [B] float, the same under the reference (no gradient is taken through it).
        desirable: [B] bool, the examples' labels (True: desirable).
        kl: the reference point, a 0-dim tensor or a float (read by "kto" only).
        beta, loss_type, desirable_weight, undesirable_weight: as KTOConfig's fields.

    Returns:
        [B] in logps' dtype, in the examples' order.

    Example:
        >>> kto_losses(torch.tensor([-3.0, -4.0]), torch.tensor([-3.0, -4.0]), torch.tensor([True, False]))
        tensor([0.5000, 0.5000])
    """
    check_loss_type(loss_type)
    if desirable.dtype != torch.bool:
        raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}")
    margin = beta * (logps - ref_logps)
    if ESTIMATES_KL[loss_type]:
        margin = margin - beta * kl
    # Both types: desirable 1 - sigmoid(margin) = sigmoid(-margin); undesirable sigmoid(margin), KTO's 1 - sigmoid(z - r)
    losses = torch.sigmoid(torch.where(desirable, -margin, margin))
    return losses * torch.full_like(losses, undesirable_weight).masked_fill(desirable, desirable_weight)
