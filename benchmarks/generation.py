"""Generation rows: the online trainers' sampling backends (posttrain.trainers.generation) on the random
Qwen2-0.5B-shaped model in bf16, generated tokens per second and peak memory.

    python -m benchmarks.generation [--provider NAME ...] [--smoke] [--out DIR] [--deadline EPOCH_S]

Workload: 8 prompts of 128 random tokens, each 8 times in a row (as GRPO's sampler lays them out: 64 sequences), at
most 512 completion tokens, sampled at GRPOConfig's defaults (temperature 1, no top-k / top-p). Providers, each the
backend create_generation builds from GRPOConfig fields:

transformers           TransformersGeneration: `model.generate` (TRL's default)
transformers_logprobs  the same with transformers_sampling_logprobs=True: the sampled tokens' log-probs read from
                       generate's processed scores, which it keeps ([tokens, 64, vocabulary] float32) until it returns
continuous_batching    ContinuousBatchingGeneration, its default config (paged KV cache of max_memory_percent 0.5)
vllm_colocate          VLLMColocateGeneration (when vllm is importable; else dropped with a note), its weights synced
                       once before the runs, outside the timing

Metric: generated tokens (up to and including each completion's EOS) / wall time of one generate call, the device
synchronized at both ends; the median of 3 runs after one warm-up run (each run's seconds are kept), and the peak
memory allocated through PyTorch over the timed runs (the model's weights included; vLLM's KV cache is sized by
vllm_gpu_memory_utilization, the continuous-batching engine's by max_memory_percent). Rows (kind "generation") are
written as they are measured, one per provider; no run starts that the deadline would cut (the longest run so far
must fit before it), and a provider cut short keeps the runs it finished. --smoke: the tiny Qwen2 in fp32 on the CPU,
2 prompts x 2 generations of at most 8 tokens, the continuous-batching cache cut to 8 blocks (its default sizes the
cache from half the host's memory there).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from benchmarks.providers import importable
from benchmarks.sink import Recorder, past

JSONL = "generation.jsonl"
RUNS = 3  # timed runs per provider, after one warm-up run


@dataclass(frozen=True)
class Workload:
    prompts: int
    generations: int
    prompt_len: int
    max_completion_length: int

    @property
    def sequences(self) -> int:
        return self.prompts * self.generations


WORKLOAD = Workload(prompts=8, generations=8, prompt_len=128, max_completion_length=512)
SMOKE_WORKLOAD = Workload(prompts=2, generations=2, prompt_len=8, max_completion_length=8)


@dataclass(frozen=True)
class Provider:
    """A backend, as the GRPOConfig fields that select it; `smoke_config` replaces fields in smoke runs only."""

    name: str
    config: dict = field(default_factory=dict)
    needs: str | None = None  # a module that must be importable
    devices: tuple[str, ...] = ("cuda", "cpu")
    smoke_config: dict = field(default_factory=dict)


PROVIDERS = (
    Provider("transformers"),
    Provider("transformers_logprobs", {"transformers_sampling_logprobs": True}),
    Provider("continuous_batching", {"use_transformers_continuous_batching": True},
             smoke_config={"transformers_continuous_batching_config": {"num_blocks": 8}}),
    Provider("vllm_colocate", {"use_vllm": True, "vllm_mode": "colocate"}, needs="vllm", devices=("cuda",)),
)  # fmt: skip


def prompt_ids(workload: Workload) -> list[list[int]]:
    """`workload.prompts` random byte-token prompts, each repeated `generations` times in a row."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (workload.prompts, workload.prompt_len), generator=gen).tolist()
    return [ids for ids in prompts for _ in range(workload.generations)]


def _args(provider: Provider, workload: Workload, device_type: str, output_dir: str, smoke: bool):
    from posttrain import GRPOConfig

    config = {**provider.config, **(provider.smoke_config if smoke else {})}
    return GRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=workload.sequences, num_generations=workload.generations,
        max_completion_length=workload.max_completion_length, bf16=device_type == "cuda", use_cpu=device_type != "cuda",
        vllm_max_model_length=workload.prompt_len + workload.max_completion_length, report_to="none", seed=0,
        **config,
    )  # fmt: skip


def _backend(provider: Provider, model, tokenizer, workload: Workload, device_type: str, output_dir: str, smoke: bool):
    from accelerate import Accelerator

    from posttrain.trainers.generation import create_generation

    args = _args(provider, workload, device_type, output_dir, smoke)
    # created after the config, whose construction resets accelerate's state
    accelerator = Accelerator(cpu=device_type != "cuda")
    backend = create_generation(model, args, tokenizer, [tokenizer.eos_token_id], accelerator)
    backend.sync_weights(model, step=0)  # a colocated engine loads the policy's weights (no-op for the others)
    return backend


def _timed_run(backend, model, prompts: list[list[int]], generations: int) -> tuple[float, int]:
    from benchmarks.trainers import sync_device

    sync_device()
    start = time.perf_counter()
    completions = backend.generate(model, prompts, generations)
    sync_device()
    return time.perf_counter() - start, sum(len(ids) for ids in completions.ids)


def measure(provider: Provider, model, tokenizer, workload: Workload, device_type: str, smoke: bool, deadline) -> dict:
    """One provider's row: tokens/s of each timed run and their median, peak MB; an error instead when it fails."""
    from transformers import set_seed

    from benchmarks.trainers import free_memory, peak_allocated_mb, reset_peak

    row = {"kind": "generation", "provider": provider.name, "prompts": workload.prompts,
           "generations": workload.generations, "prompt_len": workload.prompt_len,
           "max_completion_length": workload.max_completion_length}  # fmt: skip
    prompts = prompt_ids(workload)
    seconds, tokens = [], []
    try:
        with tempfile.TemporaryDirectory() as out:
            backend = _backend(provider, model, tokenizer, workload, device_type, out, smoke)
            set_seed(0)
            warmup_s, _ = _timed_run(backend, model, prompts, workload.generations)
            reset_peak()
            # no run starts that the deadline would cut: the longest so far must still fit
            while len(seconds) < RUNS and not past(deadline, margin_s=max([warmup_s, *seconds])):
                elapsed, count = _timed_run(backend, model, prompts, workload.generations)
                seconds.append(elapsed)
                tokens.append(count)
            row["peak_mb"] = peak_allocated_mb()
            row["reports_logprobs"] = backend.reports_logprobs
            del backend
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as err:  # noqa: BLE001 - one broken backend must not sink the others' rows
        row["error"] = f"{type(err).__name__}: {err}"[:300]
    free_memory()
    rates = [count / elapsed for count, elapsed in zip(tokens, seconds)]
    row.update(runs=len(seconds), seconds=seconds, generated_tokens=tokens,
               tokens_per_s=statistics.median(rates) if rates else None)  # fmt: skip
    if "error" not in row and len(seconds) < RUNS:
        row["error"] = f"cut by the deadline after {len(seconds)} of {RUNS} timed runs"
    return row


def _load_model(path: str, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def run_generation(recorder: Recorder, smoke: bool = False, deadline=None, providers=None) -> None:
    """Generation rows into `recorder`, provider by provider (PROVIDERS' order, or the names in `providers`), until
    `deadline`; a note for each provider that cannot run here."""
    from benchmarks.trainers import model_config, model_label, save_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    workload = SMOKE_WORKLOAD if smoke else WORKLOAD
    chosen = [p for p in PROVIDERS if providers is None or p.name in providers]
    runnable = []
    for provider in chosen:
        if provider.needs is not None and not importable(provider.needs):
            recorder.note(f"generation: {provider.name}: dropped, {provider.needs} is not importable")
        elif device.type not in provider.devices:
            recorder.note(f"generation: {provider.name}: dropped, does not run on {device.type}")
        else:
            runnable.append(provider)
    config, dtype = model_config(smoke)
    with tempfile.TemporaryDirectory() as root:
        model, tokenizer = _load_model(save_model(config, dtype, root), dtype, device)
        for provider in runnable:
            if past(deadline):
                recorder.note(f"generation: deadline reached before {provider.name}")
                return
            row = measure(provider, model, tokenizer, workload, device.type, smoke, deadline)
            recorder.record({**row, "model": model_label(smoke)})
            recorder.log(_line(row))


def _line(row: dict) -> str:
    what = f"[generation] {row['provider']:<22}"
    if row["tokens_per_s"] is None:
        return f"{what} {row.get('error', 'failed')[:160]}"
    peak = "n/a" if row.get("peak_mb") is None else f"{row['peak_mb']:,.0f} MB"
    runs = ", ".join(f"{s:.2f}" for s in row["seconds"])
    return f"{what} {row['tokens_per_s']:,.0f} tokens/s (runs {runs} s), peak {peak}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", nargs="+", choices=[p.name for p in PROVIDERS], help="default: all")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, 2 x 2 sequences of 8 tokens")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--deadline", type=float, default=os.environ.get("BENCH_DEADLINE") or None,
                        help="seconds since the epoch after which no new run starts")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to exercise the generation rows here", file=sys.stderr)
        return 2
    from benchmarks.report import run_and_report

    run_and_report(args.out, JSONL, "generation",
                   lambda recorder: run_generation(recorder, args.smoke, args.deadline, args.provider))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
