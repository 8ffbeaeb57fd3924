"""Sampling GRPO's completions: transformers' `generate` (default) or a colocated vLLM engine (optional dependency)."""

import importlib.util
import os
import socket

import torch
from transformers import GenerationConfig

from posttrain.data.common import pad

from .base import no_grad_without_checkpointing


def truncate_after_eos(completion_ids: torch.Tensor, eos_token_ids: list[int]) -> list[list[int]]:
    """Each row of `completion_ids` [B, T] cut right after its first end-of-sequence token (kept), or whole if none.

    Example:
        >>> truncate_after_eos(torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8]]), eos_token_ids=[2])
        [[5, 2], [5, 6, 7, 8]]
    """
    is_eos = torch.isin(completion_ids, torch.tensor(eos_token_ids, device=completion_ids.device))
    lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completion_ids.shape[1])
    return [row[:n].tolist() for row, n in zip(completion_ids.cpu(), lengths.cpu().tolist())]


class TransformersGeneration:
    """Batched sampling with `model.generate` (KV cache, left-padded prompts), as TRL's GRPOTrainer does by default.

    The GenerationConfig holds GRPOConfig's sampling fields (max_completion_length, temperature, top_p, top_k, min_p,
    repetition_penalty, cache_implementation), then `generation_kwargs`, which override them.
    """

    def __init__(self, args, tokenizer, eos_token_ids: list[int]):
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
        self.config = GenerationConfig(**kwargs, disable_compile=True)
        self.pad_token_id = tokenizer.pad_token_id
        self.eos_token_ids = eos_token_ids
        self.pad_to_multiple_of = args.pad_to_multiple_of
        self.checkpointing_kwargs = args.gradient_checkpointing_kwargs

    def generate(self, model, prompt_ids: list[list[int]], device: torch.device) -> list[list[int]]:
        """Sample one completion per prompt. `model` is the unwrapped policy; returns token ids up to and including
        the first end-of-sequence token (or max_completion_length tokens)."""
        prompts = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(prompts, self.pad_token_id, "left", self.pad_to_multiple_of).to(device)
        attention_mask = pad([torch.ones_like(p) for p in prompts], 0, "left", self.pad_to_multiple_of).to(device)
        with no_grad_without_checkpointing(model, self.checkpointing_kwargs):
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=self.config)
        return truncate_after_eos(output[:, input_ids.shape[1] :], self.eos_token_ids)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _set_distributed_env(accelerator) -> None:
    # vLLM's external_launcher executor joins the torch.distributed group these variables describe; a launcher
    # (torchrun, accelerate) sets the rendezvous address, a single plain process gets a free local port
    os.environ["RANK"] = str(accelerator.process_index)
    os.environ["LOCAL_RANK"] = str(accelerator.local_process_index)
    os.environ["WORLD_SIZE"] = str(accelerator.num_processes)
    os.environ.setdefault("MASTER_ADDR", "localhost")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


class VLLMColocateGeneration:
    """Sampling with a vLLM engine in the training process (vllm_mode="colocate", one engine per process).

    The engine loads the policy's checkpoint (model.name_or_path) and receives the policy's current weights before
    each generation after an optimizer step. Supported: tensor_parallel_size 1, no sleep mode, no structured outputs.
    """

    def __init__(self, model, args, accelerator):
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("use_vllm=True but vllm is not installed: pip install 'posttrain[vllm]'")
        from vllm import LLM

        if not model.name_or_path:
            raise ValueError("use_vllm=True needs a policy with a name_or_path (a hub id or a saved directory)")
        _set_distributed_env(accelerator)
        self.llm = LLM(
            model=model.name_or_path,
            tensor_parallel_size=1,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_len=args.vllm_max_model_length,
            max_num_seqs=args.per_device_train_batch_size * args.steps_per_generation,
            model_impl=args.vllm_model_impl,
            distributed_executor_backend="external_launcher",
            seed=accelerator.process_index,
            trust_remote_code=args.trust_remote_code,
        )
        self.sampling_kwargs = {
            "n": 1,
            "repetition_penalty": args.repetition_penalty,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "min_p": 0.0 if args.min_p is None else args.min_p,
            "max_tokens": args.max_completion_length,
            **(args.generation_kwargs or {}),
        }
        self.loaded_step = -1

    def sync_weights(self, model, step: int) -> None:
        """Copy the policy's weights into the engine, once per optimizer step."""
        if step == self.loaded_step:
            return
        runner_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        runner_model.load_weights(model.state_dict().items())
        self.llm.reset_prefix_cache()
        self.loaded_step = step

    def generate(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        from vllm import SamplingParams

        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            sampling_params=SamplingParams(**self.sampling_kwargs),
            use_tqdm=False,
        )
        return [list(out.token_ids) for request in outputs for out in request.outputs]
