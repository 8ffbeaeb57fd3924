"""DPO's tensor math below the trainer: per-sequence views of per-token values, sequence log-probs (LD-DPO), WPO
weights and the combination of TRL 1.16's loss types into one loss.

Batches follow TRL's layout: 2B sequences, the B chosen completions first, then the B rejected ones in the same pair
order. Every function also takes a chunk of whole pairs in that layout (the fused linear loss calls the loss chunk by
chunk); what depends on the whole batch (the pair count, the sft token count) is an explicit argument.
"""

from collections.abc import Sequence

import torch

from posttrain.ops.dpo_loss import LOSS_SEMANTICS, LOSS_TYPES, dpo_loss


def per_sequence(values: torch.Tensor, sequence_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token values aligned with labels[:, 1:] -> one row per sequence.

    The padded layout already is one row per sequence and comes back as is. A packed row (padding_free) holds the
    sequences back to back: each gets its own row with its next-token values from the left, then zeros (False).

    Args:
        values: [R, T - 1] any dtype: padded rows, or R = 1 packed row.
        sequence_lengths: [S] int, the packed sequences' lengths (None: padded layout).

    Returns:
        values itself, or [S, max(sequence_lengths) - 1] in values' dtype.

    Example:
        >>> per_sequence(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.tensor([3, 2]))  # tokens 0-2 | 3-4
        tensor([[1., 2.],
                [4., 0.]])
    """
    if sequence_lengths is None:
        return values
    starts = torch.cumsum(sequence_lengths, 0) - sequence_lengths
    cols = torch.arange(max(int(sequence_lengths.max()) - 1, 0), device=values.device)
    index = (starts[:, None] + cols).clamp(max=values.shape[1] - 1)
    valid = cols < (sequence_lengths[:, None] - 1)
    return torch.where(valid, values[0][index], torch.zeros((), dtype=values.dtype, device=values.device))


def completion_lengths(completion_mask: torch.Tensor, sequence_lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Completion tokens per sequence, counted on completion_mask itself (unshifted), as TRL's ipo and sigmoid_norm
    normalize.

    Args:
        completion_mask: [R, T] int / bool, 1 on completion tokens: padded rows, or R = 1 packed row.
        sequence_lengths: [S] int, the packed sequences' lengths (None: padded layout).

    Returns:
        [R] (padded) or [S] (packed) counts in completion_mask's dtype.

    Example:
        >>> completion_lengths(torch.tensor([[0, 1, 1, 0, 0, 1]]), torch.tensor([4, 2]))
        tensor([2, 1])
    """
    if sequence_lengths is None:
        return completion_mask.sum(1)
    device = sequence_lengths.device
    segment = torch.repeat_interleave(torch.arange(len(sequence_lengths), device=device), sequence_lengths)
    counts = torch.zeros(len(sequence_lengths), dtype=completion_mask.dtype, device=completion_mask.device)
    return counts.index_add_(0, segment, completion_mask[0, : segment.numel()])


def sequence_logps(per_token: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None = None) -> torch.Tensor:
    """Each completion's summed log-prob; with LD-DPO's ld_alpha, the tokens past the shorter completion of its pair
    (counted from the completion's start) weigh ld_alpha: shared part + ld_alpha * tail, as TRL sums them.

    Tokens outside the mask are selected away (they may hold anything, NaN included).

    Args:
        per_token: [2B, T'] float per-token log-probs, chosen rows then rejected rows (differentiable).
        mask: [2B, T'] bool / int, the completion tokens (the labels' mask).
        ld_alpha: None (plain sums) or the weight in [0, 1] of the tail tokens.

    Returns:
        [2B] in per_token's dtype.

    Example:
        >>> logps = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, 0.0, 0.0]])     # chosen 3 tokens, rejected 1
        >>> sequence_logps(logps, torch.tensor([[1, 1, 1], [1, 0, 0]]), ld_alpha=0.5)
        tensor([-2., -2.])
    """
    valid = mask.bool()
    zero = torch.zeros((), dtype=per_token.dtype, device=per_token.device)
    if ld_alpha is None:
        return torch.where(valid, per_token, zero).sum(1)
    position = valid.long().cumsum(1)
    chosen_counts, rejected_counts = valid.sum(1).chunk(2)
    shared = torch.minimum(chosen_counts, rejected_counts).repeat(2)[:, None]
    shared_logps = torch.where(valid & (position <= shared), per_token, zero).sum(1)
    tail_logps = torch.where(valid & (position > shared), per_token, zero).sum(1)
    return shared_logps + ld_alpha * tail_logps


@torch.no_grad()
def wpo_weights(logprobs: torch.Tensor, log_sum_sq_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """WPO's per-pair weight (no gradient): exp(mean over the chosen completion of log p(token) - log sum_v p_v^2)
    times the same for the rejected completion.

    Args:
        logprobs: [2B, T'] float per-token log-probs, chosen rows then rejected rows.
        log_sum_sq_probs: [2B, T'] float, log sum_v p_v^2 at each position.
        mask: [2B, T'] bool / int completion tokens; tokens outside it are selected away.

    Returns:
        [B] float weights in logprobs' dtype.

    Example:
        >>> logps = torch.tensor([[-0.1, -0.2], [-1.0, -2.0]])              # one pair: chosen row, rejected row
        >>> wpo_weights(logps, torch.tensor([[-0.1, -0.2], [-0.5, -0.5]]), torch.ones(2, 2))
        tensor([0.3679])
    """
    valid = mask.bool()
    aligned = torch.where(
        valid, logprobs - log_sum_sq_probs, torch.zeros((), dtype=logprobs.dtype, device=valid.device)
    )
    weights = torch.exp(aligned.sum(1) / valid.sum(1).clamp_min(1))
    chosen_weights, rejected_weights = weights.chunk(2)
    return chosen_weights * rejected_weights


def dpo_preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_types: Sequence[str] = ("sigmoid",),
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    sft_logps: torch.Tensor | None = None,
    sft_tokens: torch.Tensor | None = None,
    pair_weights: torch.Tensor | None = None,
    num_pairs: float | torch.Tensor | None = None,
    num_sft_tokens: float | torch.Tensor | None = None,
    mean_pair_weight: float | torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """The DPO loss of TRL 1.16's DPOTrainer: sum over loss_types of loss_weight * the mean over pairs.

    For a pair loss type k (every type but "sft"), with per-pair losses L_k (`posttrain.ops.dpo_loss`) and pair
    weights w (WPO; 1 without): weight_k * sum_i w_i L_k,i / num_pairs.
    "sft" is the NLL of the chosen completions, a token mean over the batch, unweighted by ld_alpha:
    weight * -mean_pair_weight * sum_i sft_logps_i / num_sft_tokens (TRL expands its batch mean to every pair and
    multiplies by w before the pair mean, hence the factor mean(w)).

    Chunks: the defaults (num_pairs = B, num_sft_tokens = max(sum(sft_tokens), 1), mean_pair_weight = mean(w)) are
    those of the pairs given. Given the whole batch's values instead, a chunk of whole pairs returns its share of the
    batch loss, and the chunks' losses add up to it, except for aot / aot_unpaired, which sort across the pairs given.

    Args:
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps: [B] float summed completion log-probs
            (with LD-DPO's weighting when the trainer uses it), differentiable.
        loss_types: TRL loss types (see posttrain.ops.dpo_loss.LOSS_TYPES), one or more.
        loss_weights: one weight per loss type, default 1.0 each.
        beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef, discopop_tau: as DPOConfig's fields.
        chosen_lengths, rejected_lengths: [B] completion token counts (`completion_lengths`); ipo and sigmoid_norm
            need both.
        sft_logps: [B] float, each chosen completion's raw summed per-token log-probs (no ld_alpha); "sft" needs it.
        sft_tokens: [B] int, the tokens behind sft_logps (the labels' count); "sft" needs it.
        pair_weights: [B] float constant per-pair weights (`wpo_weights`), or None.
        num_pairs: the pair count of the mean over pairs (default B).
        num_sft_tokens: the token count of sft's mean (default max(sum(sft_tokens), 1)).
        mean_pair_weight: sft's factor mean(w) (default the mean of pair_weights given, 1 without).
        impl: dpo_loss's impl ("auto", "triton" or "torch").

    Returns:
        The scalar loss, float32 (float64 with float64 log-probs and impl="torch"), differentiable w.r.t. the
        log-prob inputs.

    Example:
        >>> loss = dpo_preference_loss(c, r, rc, rr, loss_types=["sigmoid", "sft"], loss_weights=[1.0, 0.5],
        ...                            sft_logps=c, sft_tokens=torch.tensor([12, 30]))
    """
    weights = [1.0] * len(loss_types) if loss_weights is None else list(loss_weights)
    if len(weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(weights)} weights for {len(loss_types)} loss types ({list(loss_types)!r})"
        )
    unknown = [name for name in loss_types if name not in LOSS_TYPES]
    if unknown or not loss_types:
        raise ValueError(f"loss_types {list(loss_types)!r}: each must be one of: {', '.join(LOSS_TYPES)}")
    options = dict(
        beta=beta, label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, impl=impl,
    )  # fmt: skip
    logps = (chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss = 0.0
    for loss_type, weight in zip(loss_types, weights, strict=True):
        if LOSS_SEMANTICS[loss_type].kernel_mode is None:
            term = _sft_term(sft_logps, sft_tokens, num_sft_tokens, pair_weights, mean_pair_weight)
        else:
            per_pair = dpo_loss(*logps, loss_type=loss_type, **options)
            if pair_weights is not None:
                per_pair = per_pair * pair_weights
            term = per_pair.mean() if num_pairs is None else per_pair.sum() / num_pairs
        loss = loss + term * weight
    return loss


def _sft_term(sft_logps, sft_tokens, num_sft_tokens, pair_weights, mean_pair_weight) -> torch.Tensor:
    for name, value in (("sft_logps", sft_logps), ("sft_tokens", sft_tokens)):
        if value is None:
            raise ValueError(f"loss_type 'sft' needs {name} (the chosen completions' raw summed log-probs and counts)")
    dtype = torch.promote_types(sft_logps.dtype, torch.float32)
    if num_sft_tokens is None:
        num_sft_tokens = sft_tokens.to(dtype).sum().clamp(min=1.0)
    loss = -sft_logps.to(dtype).sum() / num_sft_tokens
    if mean_pair_weight is None and pair_weights is not None:
        mean_pair_weight = pair_weights.mean()
    return loss if mean_pair_weight is None else loss * mean_pair_weight
