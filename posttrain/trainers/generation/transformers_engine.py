"""Sampling with the policy itself: transformers' `generate` (TRL's default) or its continuous-batching engine
(`generate_batch`, use_transformers_continuous_batching)."""

import torch
from packaging.version import Version
from transformers import GenerationConfig

from posttrain._compat import TRANSFORMERS_VERSION
from posttrain.data.common import pad

from .base import Completions, GenerationBackend, truncate_after_eos
from .weights import model_for_generation


def generation_config(args, tokenizer, eos_token_ids: list[int]) -> GenerationConfig:
    """TRL's GenerationConfig for GRPO-style sampling: GRPOConfig's sampling fields (max_completion_length,
    temperature, top_p, top_k, min_p, repetition_penalty, cache_implementation), then `generation_kwargs`, which
    override them."""
    kwargs = {
        "max_new_tokens": args.max_completion_length,
        "do_sample": True,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": eos_token_ids,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
        "cache_implementation": args.cache_implementation,
        **(args.generation_kwargs or {}),
    }
    return GenerationConfig(**kwargs, disable_compile=True)


class TransformersGeneration(GenerationBackend):
    """Batched sampling with `model.generate` (KV cache, left-padded prompts), as TRL's GRPOTrainer does by default.

    With `report_logprobs` (GRPOConfig.transformers_sampling_logprobs), each sampled token's log-prob is read from
    generate's processed scores (after temperature, top-k, top-p, min-p and repetition penalty: what vLLM reports as
    processed_logprobs). generate then keeps those scores, [completion length, batch, vocabulary] float32, until it
    returns.
    """

    def __init__(self, args, tokenizer, eos_token_ids: list[int], accelerator, *, report_logprobs: bool = False):
        self.config = generation_config(args, tokenizer, eos_token_ids)
        self.reports_logprobs = report_logprobs
        self.accelerator = accelerator
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids
        self.pad_to_multiple_of = args.pad_to_multiple_of
        self.gather_zero3 = args.ds3_gather_for_generation
        self.checkpointing_kwargs = args.gradient_checkpointing_kwargs

    def generate(self, model, prompt_ids: list[list[int]], num_generations: int) -> Completions:
        device = self.accelerator.device
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, self.pad_token_id, "left", self.pad_to_multiple_of).to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], 0, "left", self.pad_to_multiple_of).to(device)
        scores = {"output_scores": True, "return_dict_in_generate": True} if self.reports_logprobs else {}
        with model_for_generation(
            model, self.accelerator, gather_zero3=self.gather_zero3, checkpointing_kwargs=self.checkpointing_kwargs
        ) as unwrapped:
            output = unwrapped.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=self.config, **scores
            )
        sequences = output.sequences if self.reports_logprobs else output
        completion_ids = truncate_after_eos(sequences[:, input_ids.shape[1] :], self.eos_token_ids)
        if not self.reports_logprobs:
            return Completions(completion_ids)
        logprobs = _sampled_logprobs(output.scores, sequences[:, input_ids.shape[1] :])
        return Completions(completion_ids, [row[: len(ids)] for row, ids in zip(logprobs.tolist(), completion_ids)])


def _sampled_logprobs(scores: tuple[torch.Tensor, ...], tokens: torch.Tensor) -> torch.Tensor:
    """[B, T] log-prob of tokens[:, t] under the processed scores of step t ([B, V] each), one step at a time (no
    [B, T, V] copy)."""
    steps = [s.float().log_softmax(-1).gather(1, tokens[:, t, None]) for t, s in enumerate(scores)]
    return torch.cat(steps, dim=1)


class ContinuousBatchingGeneration(GenerationBackend):
    """Sampling with transformers' continuous-batching engine (`model.generate_batch`: paged KV cache, requests
    scheduled as they finish), as TRL 1.16 wires use_transformers_continuous_batching: the same GenerationConfig as
    `generate`, a ContinuousBatchingConfig from transformers_continuous_batching_config with max_memory_percent 0.5
    unless set (transformers' 0.9 leaves too little for the backward), and, as TRL, with bf16 / fp16 the policy is
    cast to that dtype for generation (and stays in it).

    The engine computes each sampled token's log-prob from the processed scores itself (return_logprobs);
    `report_logprobs` passes them on.
    """

    def __init__(self, args, tokenizer, eos_token_ids: list[int], accelerator, *, report_logprobs: bool = False):
        if TRANSFORMERS_VERSION < Version("5.8.0"):
            raise ImportError(
                f"use_transformers_continuous_batching=True needs transformers >= 5.8.0, found {TRANSFORMERS_VERSION}"
            )
        from transformers.generation import ContinuousBatchingConfig

        self.config = generation_config(args, tokenizer, eos_token_ids)
        kwargs = {"max_memory_percent": 0.5, **(args.transformers_continuous_batching_config or {})}
        if report_logprobs:
            kwargs["return_logprobs"] = True
        self.batching_config = ContinuousBatchingConfig(**kwargs)
        self.reports_logprobs = report_logprobs
        self.accelerator = accelerator
        self.dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        self.gather_zero3 = args.ds3_gather_for_generation
        self.checkpointing_kwargs = args.gradient_checkpointing_kwargs

    def generate(self, model, prompt_ids: list[list[int]], num_generations: int) -> Completions:
        with model_for_generation(
            model, self.accelerator, gather_zero3=self.gather_zero3, checkpointing_kwargs=self.checkpointing_kwargs
        ) as unwrapped:
            training = unwrapped.training
            if self.dtype is not None:
                unwrapped.to(self.dtype)
            outputs = unwrapped.generate_batch(
                prompt_ids, generation_config=self.config, continuous_batching_config=self.batching_config,
                progress_bar=False,
            )  # fmt: skip
            unwrapped.train(training)
        results = list(outputs.values())  # in the prompts' order
        if len(results) != len(prompt_ids) or any(r.error is not None for r in results):
            errors = [r.error for r in results if r.error is not None]
            raise RuntimeError(
                f"continuous batching returned {len(results)} of {len(prompt_ids)} completions: {errors[:3]}"
            )
        completion_ids = [list(r.generated_tokens) for r in results]
        logprobs = [list(r.logprobs) for r in results] if self.reports_logprobs else None
        return Completions(completion_ids, logprobs)
