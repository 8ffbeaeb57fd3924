"""GRPO's tensor math below the trainer: TRL 1.16's policy-term weights (high-entropy token mask, off-policy sequence
mask), the entropy bonus and its adaptive coefficient, and the NaN-aware std of the logged rewards.

The loss itself is `posttrain.ops.grpo_loss`. Every function here also takes a chunk of whole sequences (the fused
linear loss calls the loss chunk by chunk): what depends on the whole batch (a token count, the entropy quantile over
every process) is an explicit argument or a gather function.
"""

import math
from collections.abc import Callable

import torch

from posttrain.ops.grpo_advantages import nan_mean_std


def nanstd(x: torch.Tensor) -> torch.Tensor:
    """Bessel-corrected std of the non-NaN elements of x, NaN with fewer than two (TRL's reward_std).

    Example:
        >>> nanstd(torch.tensor([1.0, float("nan"), 3.0]))
        tensor(1.4142)
    """
    return nan_mean_std(x)[1].reshape(())


def entropy_threshold(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    quantile: float,
    *,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The `quantile` of the completion tokens' entropies over every process (TRL's top_entropy_quantile cut-off).

    Args:
        entropies: [B, T] float per-token entropies (>= 0).
        mask: [B, T] bool / int completion tokens.
        quantile: in [0, 1]; TRL passes 1 - top_entropy_quantile.
        gather: maps this process's 1-D float32 entropies to the concatenation of every process's (of different
            lengths). None: this process only. With accelerate, pad with a value no entropy takes and drop it after
            the gather: `lambda t: (g := gather(pad_across_processes(t, dim=0, pad_index=-1e9)))[g != -1e9]`.

    Returns:
        The 0-d float32 threshold, or None when no process has a completion token.

    Example:
        >>> entropy_threshold(torch.tensor([[0.1, 0.5, 2.0]]), torch.ones(1, 3), 0.5)
        tensor(0.5000)
    """
    local = entropies.detach()[mask.bool()].float()
    gathered = local if gather is None else gather(local)
    return torch.quantile(gathered, quantile) if gathered.numel() else None


def high_entropy_mask(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    quantile: float,
    *,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    threshold: torch.Tensor | None = None,
) -> torch.Tensor:
    """Completion tokens whose entropy reaches the `quantile` of all completion tokens' entropies (TRL's
    get_high_entropy_mask).

    Args:
        entropies, mask, quantile, gather: as `entropy_threshold`.
        threshold: the cut-off itself, when already known (e.g. computed over the whole batch before its chunks);
            then quantile and gather are not used.

    Returns:
        [B, T] bool, False outside the mask (and everywhere when there is no completion token).

    Example:
        >>> high_entropy_mask(torch.tensor([[0.1, 0.5, 2.0]]), torch.ones(1, 3), 0.5)
        tensor([[False,  True,  True]])
    """
    valid = mask.bool()
    if threshold is None:
        threshold = entropy_threshold(entropies, mask, quantile, gather=gather)
    if threshold is None:
        return torch.zeros_like(valid)
    return valid & (entropies.detach() >= threshold)


@torch.no_grad()
def off_policy_mask(
    logps: torch.Tensor,
    sampling_logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (TRL's off_policy_mask_threshold): a sequence with a negative
    advantage is dropped when its mean per-token KL(sampler || policy) exceeds `threshold`.

    Tokens the sampler could not score (NaN) are no evidence either way: they count as KL 0. Tokens outside the mask
    are selected away.

    Args:
        logps: [B, T] float policy log-probs (read without gradient).
        sampling_logps: [B, T] float log-probs of the sampler (vLLM's, else the old policy's).
        mask: [B, T] bool / int completion tokens.
        advantages: [B] float.
        threshold: the largest mean KL a negative-advantage sequence may have.

    Returns:
        [B, 1] in logps' dtype: 1 keep, 0 drop.

    Example:
        >>> logps, sampler = torch.full((2, 2), -1.0), torch.full((2, 2), -0.2)      # KL 0.8 per token
        >>> off_policy_mask(logps, sampler, torch.ones(2, 2), torch.tensor([1.0, -1.0]), threshold=0.5)
        tensor([[1.],
                [0.]])
    """
    valid = mask.bool()
    kl = torch.nan_to_num(sampling_logps - logps, nan=0.0)
    kl = torch.where(valid, kl, torch.zeros((), dtype=kl.dtype, device=kl.device))
    mean_kl = kl.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)
    keep = (advantages.unsqueeze(1) >= 0) | (mean_kl <= threshold)
    return keep.to(logps.dtype)


def policy_weights(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    entropy_mask: torch.Tensor | None = None,
    off_policy_threshold: float | None = None,
    sampling_logps: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """TRL's weights on the policy term (not the KL), for grpo_loss's policy_weights: the high-entropy token mask
    times the off-policy sequence mask, whichever are on.

    Args:
        logps: [B, T] float policy log-probs (only read without gradient).
        mask: [B, T] bool / int completion tokens.
        advantages: [B] float.
        entropy_mask: [B, T] bool from `high_entropy_mask` (top_entropy_quantile < 1), or None.
        off_policy_threshold: TRL's off_policy_mask_threshold, or None (off).
        sampling_logps: [B, T] the sampler's log-probs for the off-policy mask (default logps: nothing is dropped).

    Returns:
        [B, T] or [B, 1] in logps' dtype, or None when neither mask is on.

    Example:
        >>> entropy_mask = torch.tensor([[True, False], [True, True]])
        >>> policy_weights(torch.full((2, 2), -1.0), torch.ones(2, 2), torch.tensor([1.0, -1.0]),
        ...                entropy_mask=entropy_mask, off_policy_threshold=0.5, sampling_logps=torch.full((2, 2), -0.2))
        tensor([[1., 0.],
                [0., 0.]])
    """
    weights = None if entropy_mask is None else entropy_mask.to(logps.dtype)
    if off_policy_threshold is not None:
        sampling = logps.detach() if sampling_logps is None else sampling_logps
        keep = off_policy_mask(logps.detach(), sampling, mask, advantages, off_policy_threshold)
        weights = keep if weights is None else weights * keep
    return weights


def entropy_bonus(
    entropies: torch.Tensor,
    mask: torch.Tensor,
    coef: float,
    *,
    accumulation: float = 1.0,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """coef x the mean per-token entropy over the mask, divided by the gradient-accumulation steps; the trainer
    subtracts it from the loss (TRL's entropy bonus: L = L_policy - coef * H).

    Args:
        entropies: [B, T] float per-token entropies (differentiable).
        mask: [B, T] bool / int / float tokens the bonus acts on (TRL: the completion mask times the entropy mask).
        coef: the coefficient to apply (`AdaptiveEntropy.applied_coef` with use_adaptive_entropy).
        accumulation: gradient-accumulation steps of this micro-step (1 in evaluation).
        num_tokens: the token count of the mean (default max(mask.sum(), 1)); a chunk's bonus with the batch's
            count is its share of the batch's.

    Returns:
        The 0-d bonus, in entropies' dtype (at least float32).

    Example:
        >>> entropy_bonus(torch.tensor([[1.0, 3.0, 9.0]]), torch.tensor([[1, 1, 0]]), 0.1, accumulation=2)
        tensor(0.1000)
    """
    dtype = torch.promote_types(entropies.dtype, torch.float32)
    valid = mask != 0
    weights = mask.to(dtype)
    total = torch.where(valid, entropies.to(dtype) * weights, torch.zeros((), dtype=dtype, device=weights.device)).sum()
    count = weights.sum().clamp(min=1.0) if num_tokens is None else num_tokens
    return coef * (total / count / accumulation)


class AdaptiveEntropy:
    """TRL's adaptive entropy coefficient (use_adaptive_entropy): each optimizer step, the token-weighted mean entropy
    of the whole accumulation window over every process moves the coefficient by `delta` towards more entropy
    (when the entropy is at or below `target`) or less, within [coef_min, coef_max]. The bonus applies, at the
    coefficient of the previous step's end, only while the last measured entropy is at or below `target`.

    State for checkpoints: `state_dict()` / `load_state_dict()` (the window in progress is not saved: checkpoints are
    taken at optimizer-step boundaries, where it is empty).

    Example:
        >>> control = AdaptiveEntropy(coef=0.01, coef_min=0.0, coef_max=1.0, delta=0.005, target=0.2)
        >>> bonus = entropy_bonus(entropies, mask, control.applied_coef)
        >>> control.update((entropies * mask).sum(), mask.sum(), step_end=accelerator.sync_gradients,
        ...                reduce=lambda t: accelerator.reduce(t, reduction="sum"))
    """

    def __init__(self, coef: float, *, coef_min: float, coef_max: float, delta: float, target: float):
        self.coef = coef
        self.coef_min, self.coef_max, self.delta, self.target = coef_min, coef_max, delta, target
        self.last_entropy = math.inf  # no bonus until the first optimizer step measured the entropy
        self._window = None

    @property
    def applied_coef(self) -> float:
        """The coefficient this micro-step's bonus uses: coef while the last entropy is <= target, else 0."""
        return self.coef if self.last_entropy <= self.target else 0.0

    def update(
        self,
        entropy_sum: torch.Tensor,
        count: torch.Tensor,
        *,
        step_end: bool,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> float | None:
        """Add a micro-step's entropy sum and token count to the window; at the step's end (step_end), reduce the
        window over processes (reduce sums a tensor over them; None: this process only), move the coefficient and
        start a new window. Returns the window's mean entropy at a step end, else None.
        """
        stats = torch.stack([entropy_sum.detach().float(), count.detach().float()])
        self._window = stats if self._window is None else self._window + stats
        if not step_end:
            return None
        totals = self._window if reduce is None else reduce(self._window)
        entropy = (totals[0] / totals[1].clamp(min=1.0)).item()
        if entropy <= self.target:
            self.coef = min(self.coef + self.delta, self.coef_max)
        else:
            self.coef = max(self.coef - self.delta, self.coef_min)
        self.last_entropy = entropy
        self._window = None
        return entropy

    def state_dict(self) -> dict[str, float]:
        """{"entropy_coef", "last_world_entropy"}: JSON-serializable (inf included), the keys of GRPOTrainer's
        entropy_ctrl_state.json."""
        return {"entropy_coef": self.coef, "last_world_entropy": self.last_entropy}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coef, self.last_entropy = float(state["entropy_coef"]), float(state["last_world_entropy"])
        self._window = None
