"""The interface every generation backend implements, and what it returns."""

from dataclasses import dataclass

import torch

from posttrain.data.common import pad


@dataclass
class Completions:
    """One sampled completion per prompt, in the prompts' order.

    ids: each completion's token ids, up to and including its first end-of-sequence token (or the whole
        max_completion_length tokens when it has none).
    logprobs: the sampler's log-prob of each of those tokens, from the distribution it sampled from (temperature,
        top-k, top-p, min-p and repetition penalty applied: vLLM's "processed_logprobs"); NaN where the engine had
        none. None when the backend does not report them.
    """

    ids: list[list[int]]
    logprobs: list[list[float]] | None = None

    def padded_logprobs(self, pad_to_multiple_of: int | None, device) -> torch.Tensor | None:
        """The logprobs as a right-padded float32 [B, C] tensor (0.0 past each completion's end), or None."""
        if self.logprobs is None:
            return None
        rows = [torch.tensor(row, dtype=torch.float32) for row in self.logprobs]
        return pad(rows, 0.0, "right", pad_to_multiple_of).to(device)


class GenerationBackend:
    """Samples completions of tokenized prompts for an online trainer (GRPO; RLOO and Distillation alike).

    `generate` gets this process's prompts, where each prompt appears num_generations times in a row (as the trainers'
    RepeatSampler lays them out), and the trainer's (wrapped) model. Backends with an engine of their own (vLLM) hold
    a copy of the weights: `sync_weights` loads the policy's current ones, once per optimizer step.

    reports_logprobs: whether `generate` fills Completions.logprobs.
    """

    reports_logprobs = False

    def generate(self, model, prompt_ids: list[list[int]], num_generations: int) -> Completions:
        raise NotImplementedError

    def sync_weights(self, model, step: int) -> None:
        """Load `model`'s weights into the engine unless they were loaded at this optimizer `step` already."""


def truncate_after_eos(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> list[list[int]]:
    """Each row of `completion_ids` [B, T] cut right after its first end-of-sequence token (kept), or whole if none.

    Example:
        >>> truncate_after_eos(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), eos_token_ids=[2])
        [[5, 2], [5, 6, 7, 8]]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completion_ids.shape[1])
    return [row[:n].tolist() for row, n in zip(completion_ids.cpu(), lengths.cpu().tolist())]
