"""SFT's loss of the label tokens' log-probs (TRL 1.16's "nll" and "dft")."""

import torch

SFT_LOSS_TYPES = ("nll", "dft")


def sft_loss(logprobs: torch.Tensor, num_tokens: torch.Tensor | int, loss_type: str = "nll") -> torch.Tensor:
    """Sum of the tokens' losses over `num_tokens` (the label tokens of the whole batch: on a chunk of tokens, this is
    the chunk's share of the batch loss). nll: -log p; dft: -p * log p with p detached (Dynamic Fine-Tuning).

    Args:
        logprobs: [N] float log-probabilities of the label tokens (differentiable).
        num_tokens: the normalizer (a number or a 0-d tensor); clamped to >= 1, so a batch without label tokens gives 0.
        loss_type: "nll" or "dft".

    Example:
        >>> logps = torch.tensor([-0.5, -2.0], requires_grad=True)
        >>> sft_loss(logps, 4)          # (0.5 + 2.0) / 4
        tensor(0.6250, grad_fn=<DivBackward0>)
    """
    if loss_type not in SFT_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of: {', '.join(SFT_LOSS_TYPES)}")
    per_token = -logprobs
    if loss_type == "dft":
        per_token = per_token * logprobs.detach().exp()
    return per_token.sum() / torch.as_tensor(num_tokens, device=logprobs.device).clamp(min=1)
