"""A deterministic stand-in for a vLLM engine, on the CPU with transformers: it loads a checkpoint, samples with
vLLM's sampling parameters in vLLM's order (repetition penalty, temperature, min-p, top-k, top-p) from its own seeded
generator, and reports each sampled token's log-prob, raw or processed. Shared by the fake `vllm` package and the
in-test vLLM server.

Its logits are the model's times LOGIT_GAP: a smooth stand-in for the gap between an inference engine's kernels and
the trainer's (vLLM's bfloat16 log-probs differ from the trainer's by ~1e-3 to 1e-2), so that the importance-sampling
correction has something to correct. Smooth, unlike rounding to bfloat16: two trainers whose weights agree to 1e-6
still sample the same tokens from it."""

import math
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

LOGIT_GAP = 1.02


@dataclass
class Sample:
    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]
    finish_reason: str


class Engine:
    def __init__(self, model_path: str, *, seed: int = 0, processed_logprobs: bool = True):
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        declared = GenerationConfig.from_pretrained(model_path).eos_token_id
        declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
        self.eos_token_ids = {AutoTokenizer.from_pretrained(model_path).eos_token_id, *declared}
        self.generator = torch.Generator().manual_seed(seed)
        self.processed_logprobs = processed_logprobs
        self.loaded = []  # the names of each load_weights call

    @torch.no_grad()
    def sample(self, prompt_ids: list[int], *, n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0,
               repetition_penalty=1.0, max_tokens=16, ignore_eos=False) -> list[Sample]:  # fmt: skip
        return [
            self._sample_one(prompt_ids, temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, ignore_eos)
            for _ in range(n)
        ]

    def _sample_one(self, prompt_ids, temperature, top_p, top_k, min_p, repetition_penalty, max_tokens, ignore_eos):
        ids, out = list(prompt_ids), Sample([], [], [], "length")
        for _ in range(max_tokens):
            raw = self.model(torch.tensor([ids])).logits[0, -1] * LOGIT_GAP
            processed = _process(raw, ids, temperature, top_p, top_k, min_p, repetition_penalty)
            token = torch.multinomial(processed.softmax(-1), 1, generator=self.generator).item()
            reported = (processed if self.processed_logprobs else raw).log_softmax(-1)
            out.token_ids.append(token)
            out.logprobs.append(reported[token].item())
            out.ranks.append(int((reported > reported[token]).sum().item()) + 1)
            ids.append(token)
            if token in self.eos_token_ids and not ignore_eos:
                out.finish_reason = "stop"
                break
        return out

    def load_weights(self, weights) -> set[str]:
        """vLLM's model.load_weights: (name, tensor) pairs under the checkpoint's names; a tied lm_head is skipped."""
        params = dict(self.model.named_parameters())
        tied = self.model.config.get_text_config().tie_word_embeddings
        names = []
        for name, tensor in weights:
            if name not in params:
                if name == "lm_head.weight" and tied:
                    continue
                raise KeyError(f"fake vLLM engine: no weight named {name!r}")
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(f"fake vLLM engine: {name} has shape {tuple(params[name].shape)}, got {tensor.shape}")
            params[name].data.copy_(tensor.detach().to(params[name].device))
            names.append(name)
        self.loaded.append(names)
        return set(names)

    def discard_weights(self) -> None:
        for param in self.model.parameters():
            param.data.fill_(math.nan)


def _process(logits, ids, temperature, top_p, top_k, min_p, repetition_penalty):
    logits = logits.clone()
    if repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(ids)))
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / repetition_penalty, values * repetition_penalty)
    logits = logits / temperature
    if min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p * probs.max(), -math.inf)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p  # keep the tokens up to and including the one reaching p
        logits[order[drop]] = -math.inf
    return logits
