"""Sampling with vLLM, as TRL 1.16 does: an engine in each training process (vllm_mode="colocate") or a vLLM server
(vllm_mode="server"). Both report the sampled tokens' log-probs (processed: after temperature and the logit
filters), which the importance-sampling correction compares with the trainer's.

The calls target vLLM 0.30's Python API, the ones TRL 1.16 makes (it supports vLLM 0.22 to 0.31): LLM(...,
distributed_executor_backend="external_launcher", logprobs_mode="processed_logprobs"), LLM.generate with
SamplingParams(logprobs=0), LLM.sleep(level=2) / wake_up(tags=...), reset_prefix_cache(), and the model runner's
load_weights for the weight sync.
"""

import os
import socket
import warnings

import torch
from accelerate.utils import broadcast_object_list, gather_object, is_peft_model

from posttrain._optional import require

from .base import Completions, GenerationBackend
from .vllm_client import VLLMClient
from .weights import engine_weights


def sampling_fields(args) -> dict:
    """GRPOConfig's sampling fields as vLLM SamplingParams fields (logprobs=0: the sampled token's log-prob only)."""
    return {
        "repetition_penalty": args.repetition_penalty,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": 0.0 if args.min_p is None else args.min_p,
        "max_tokens": args.max_completion_length,
        "logprobs": 0,
    }


class VLLMColocateGeneration(GenerationBackend):
    """An engine in each training process, sharing its accelerator (vllm_mode="colocate").

    The engine loads the policy's checkpoint (model.name_or_path; 4-bit bitsandbytes models with
    quantization="bitsandbytes") and receives the policy's weights before the first generation of each optimizer step.
    With vllm_tensor_parallel_size = k > 1, each group of k consecutive processes runs one engine over their k devices:
    the group's prompts are gathered, every member generates all of them (same seed) and keeps its own. With
    vllm_enable_sleep_mode the engine sleeps (level 2: weights and KV cache freed) outside generation, so its weights
    are loaded again before each generation.
    """

    reports_logprobs = True

    def __init__(self, model, args, accelerator):
        require("vllm", "use_vllm=True")
        from vllm import LLM

        if not model.name_or_path:
            raise ValueError("use_vllm=True needs a policy with a name_or_path (a hub id or a saved directory)")
        tp = args.vllm_tensor_parallel_size
        if accelerator.num_processes % tp != 0:
            raise ValueError(
                f"vllm_tensor_parallel_size ({tp}) must divide the number of processes ({accelerator.num_processes})"
            )
        self.accelerator = accelerator
        self.tensor_parallel_size = tp
        self.tp_group = _tensor_parallel_group(accelerator.num_processes, tp) if tp > 1 else None
        self.sleep_mode = args.vllm_enable_sleep_mode
        self.is_peft = is_peft_model(model)
        self.sampling = {"n": 1, **sampling_fields(args), **(args.generation_kwargs or {})}
        self.structured_outputs_regex = args.vllm_structured_outputs_regex
        _set_distributed_env(accelerator)
        self.llm = LLM(
            model=model.name_or_path,
            tensor_parallel_size=tp,
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            max_model_len=args.vllm_max_model_length,
            max_num_seqs=args.per_device_train_batch_size * tp * args.steps_per_generation,
            enable_sleep_mode=self.sleep_mode,
            model_impl=args.vllm_model_impl,
            distributed_executor_backend="external_launcher",
            seed=accelerator.process_index // tp,  # one seed per engine: its processes sample the same tokens
            max_num_batched_tokens=4096,  # vLLM's memory profiler misjudges the KV cache under its large default
            logprobs_mode="processed_logprobs",  # the log-probs the correction needs (after temperature, filters)
            quantization=_quantization(model),
            trust_remote_code=args.trust_remote_code,
        )
        self.weights_asleep = False
        if self.sleep_mode:
            self.sleep()
        self.loaded_step = -1
        accelerator.wait_for_everyone()  # processes desynchronized by the engine's start-up hang DeepSpeed's init

    def sync_weights(self, model, step: int) -> None:
        """Load the policy's weights (merged PEFT adapters, gathered shards) once per optimizer step, and whenever
        sleep mode discarded them."""
        if step == self.loaded_step and not self.weights_asleep:
            return
        if self.weights_asleep:
            self.wake_up("weights")
        self.llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights(engine_weights(model))
        self.llm.reset_prefix_cache()
        self.loaded_step = step

    def generate(self, model, prompt_ids: list[list[int]], num_generations: int) -> Completions:
        from vllm import SamplingParams

        local = len(prompt_ids)
        if self.tp_group is not None:
            gathered = [None] * self.tensor_parallel_size
            torch.distributed.all_gather_object(gathered, prompt_ids, group=self.tp_group)
            prompt_ids = [ids for part in gathered for ids in part]
        if self.sleep_mode:
            self.wake_up("kv_cache")
        if self.is_peft and self.tp_group is not None and torch.distributed.get_backend() == "nccl":
            # with LoRA the gradient all-reduce is short enough for vLLM's TP collectives to race NCCL's channel
            # cleanup on non-NVLink GPUs and hang (trl#3671); a barrier drains it first
            torch.distributed.barrier(device_ids=[self.accelerator.local_process_index])
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params=SamplingParams(**self._sampling_params()),
            use_tqdm=False,
        )  # fmt: skip
        if self.sleep_mode:
            self.sleep()
        completions = [out for request in outputs for out in request.outputs]
        if self.tp_group is not None:
            rank = torch.distributed.get_rank(group=self.tp_group)
            completions = completions[rank * local : (rank + 1) * local]
        return Completions([list(c.token_ids) for c in completions], [_sampled_logprobs(c) for c in completions])

    def sleep(self) -> None:
        """Free the engine's weights and KV cache (vLLM's sleep level 2) until the next generation needs them."""
        self.llm.sleep(level=2)
        self.weights_asleep = True

    def wake_up(self, tag: str) -> None:
        """Allocate the engine's "weights" again (sync_weights then loads them) or its "kv_cache"."""
        if tag == "weights":
            _empty_device_cache()  # the optimizer step's freed blocks, or vLLM's allocation may run out of memory
        self.llm.wake_up(tags=[tag])
        if tag == "weights":
            self.weights_asleep = False

    def _sampling_params(self) -> dict:
        from vllm.sampling_params import StructuredOutputsParams

        params = dict(self.sampling)
        if self.structured_outputs_regex is not None:
            params["structured_outputs"] = StructuredOutputsParams(regex=self.structured_outputs_regex)
        elif isinstance(params.get("structured_outputs"), dict):
            params["structured_outputs"] = StructuredOutputsParams(**params["structured_outputs"])
        return params


def _sampled_logprobs(completion) -> list[float]:
    """The sampled token's log-prob at each position of a vLLM CompletionOutput (asked with logprobs=0, each
    position's dict holds the sampled token, plus top ones when more were asked)."""
    if completion.logprobs is None:
        raise RuntimeError("vLLM returned no log-probs although SamplingParams(logprobs=0) asked for them")
    return [position[token].logprob for token, position in zip(completion.token_ids, completion.logprobs)]


class VLLMServerGeneration(GenerationBackend):
    """A vLLM server shared by every training process (vllm_mode="server"; TRL 1.16's protocol, see vllm_client).

    The main process gathers every process's prompts, asks the server for num_generations completions of each
    distinct prompt and hands each process its share; before the first generation of each optimizer step it
    streams the policy's weights to the server (every process takes part in the gathers of sharded weights).
    """

    reports_logprobs = True

    def __init__(self, args, accelerator):
        self.accelerator = accelerator
        self.sampling = sampling_fields(args)
        self.structured_outputs_regex = args.vllm_structured_outputs_regex
        self.generation_kwargs = args.generation_kwargs or {}
        self.client = None
        if accelerator.is_main_process:
            base_url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
            self.client = VLLMClient(
                base_url, group_port=args.vllm_group_port, connection_timeout=args.vllm_server_timeout
            )
            self.client.init_weight_transfer(accelerator.device)
            logprobs_mode = self.client.server_info()["model_config"].get("logprobs_mode")
            if args.vllm_importance_sampling_correction and logprobs_mode != "processed_logprobs":
                warnings.warn(
                    f"the vLLM server runs with --logprobs-mode {logprobs_mode}: its log-probs ignore temperature and "
                    "the logit filters, which biases vllm_importance_sampling_correction; restart it with "
                    "--logprobs-mode processed_logprobs (as `trl vllm-serve` does)",
                    stacklevel=2,
                )
        self.metadata = None
        self.loaded_step = -1
        accelerator.wait_for_everyone()

    def sync_weights(self, model, step: int) -> None:
        if step == self.loaded_step:
            return
        if self.metadata is None:  # the server is told every tensor before the first is sent
            self.metadata = [(n, str(t.dtype).removeprefix("torch."), list(t.shape)) for n, t in engine_weights(model)]
        if self.client is not None:
            self.client.update_weights(self.metadata, engine_weights(model))
            self.client.reset_prefix_cache()
        else:
            for _ in engine_weights(model):  # the gathers are collectives
                pass
        self.loaded_step = step

    def generate(self, model, prompt_ids: list[list[int]], num_generations: int) -> Completions:
        everyone = gather_object(prompt_ids)
        payload = [None]
        if self.client is not None:
            # each prompt appears num_generations times in a row: ask once for num_generations samples of it
            payload[0] = self.client.generate(
                everyone[::num_generations], n=num_generations, structured_outputs_regex=self.structured_outputs_regex,
                generation_kwargs=self.generation_kwargs, **self.sampling,
            )  # fmt: skip
        broadcast_object_list(payload, from_process=0)
        completion_ids, logprobs = payload[0]
        start = self.accelerator.process_index * len(prompt_ids)
        mine = slice(start, start + len(prompt_ids))
        return Completions(completion_ids[mine], logprobs[mine] if logprobs is not None else None)


def _tensor_parallel_group(world_size: int, tp: int):
    """This process's group of tp consecutive ranks ([0, 1], [2, 3], ... for tp=2); every process creates them all."""
    group, _ = torch.distributed.new_subgroups_by_enumeration(
        [list(range(start, start + tp)) for start in range(0, world_size, tp)]
    )
    return group


def _quantization(model) -> str | None:
    """vLLM's quantization for a bitsandbytes-quantized policy: 4-bit loads as "bitsandbytes"; vLLM cannot quantize
    to 8 bits on the fly."""
    for module in model.modules():
        name = type(module).__name__
        if name == "Linear4bit":
            return "bitsandbytes"
        if name == "Linear8bitLt":
            raise ValueError("use_vllm=True with an 8-bit bitsandbytes policy: vLLM cannot load 8-bit weights")
    return None


def _empty_device_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
