"""The longest sequence that trains one step on one GPU (issue 17 §4), for SFT, DPO and GRPO on a Qwen2-0.5B-shaped
random model, with each variant: TRL 1.16's defaults, TRL + Liger, posttrain's defaults, posttrain + activation
offloading + tiled MLP, and QLoRA (4-bit NF4 base + LoRA adapters) with TRL and posttrain.

    python -m benchmarks.memory [--trainer sft dpo grpo] [--variant NAME ...] [--start N] [--limit N] [--smoke]
                                [--out DIR] [--deadline T]

One step: SFT one sequence (micro-batch 1), DPO one pair (two sequences of that length), GRPO one generation (prompt
plus completion, the training step without generation, as benchmarks/trainers.py). Each search doubles the length
from its start until a step runs out of GPU memory, then bisects between the longest fit and the shortest failure
until they are within 1/8 (or the step) of each other; lengths are multiples of `step`, capped at `limit`. A variant
starts at the longest fit already found for its trainer (TRL's, searched first), which saves the first doublings.

The probes run in worker subprocesses (python -m benchmarks.memory worker), one after another in the same worker
while the GPU memory returns to what it was before the probe; after an OOM that leaves memory behind, the worker
exits and a fresh one carries on. Liger patches transformers' modules process-wide: its searches get their own worker.
Every probe (kind "probe") and every search's result (kind "max_seq", with tokens/s and peak MB of its longest step)
is recorded as it arrives; report.py adds max_seq_len / trl_max_seq_len / <variant>_max_seq_len to the trainer rows.
--smoke: the tiny Qwen2 on the CPU, lengths 16 to 32 (nothing runs out of memory there: the search ends at the limit).
"""

import argparse
import dataclasses
import gc
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

from benchmarks.providers import importable
from benchmarks.sink import Recorder, past

# Lines of a worker's stdout that carry a probe's result (the trainers print other things)
ROW_MARK = "@@probe "
# A worker exits with this status when a probe left GPU memory allocated: a fresh worker continues
EXIT_DIRTY = 3
# Memory still allocated before a probe (MB) above which the worker hands over to a fresh one (< 0.5% of a GPU)
LEAK_MB = 256
RESOLUTION = 8  # a search ends when the longest fit and the shortest failure are within 1/RESOLUTION
JSONL = "memory.jsonl"


@dataclass(frozen=True)
class Bounds:
    """Where the search lengths lie: the first length, the granularity and the largest length tried."""

    start: int
    step: int
    limit: int


GPU_BOUNDS = Bounds(start=8192, step=1024, limit=131072)
SMOKE_BOUNDS = Bounds(start=16, step=8, limit=32)


@dataclass(frozen=True)
class Variant:
    """One column of the table: the library, config fields beyond its defaults, QLoRA or not, and what it needs."""

    name: str
    library: str
    config: dict = field(default_factory=dict)
    qlora: bool = False
    needs: str | None = None  # a module that must be importable
    devices: tuple[str, ...] = ("cuda", "cpu")
    isolated: bool = False  # it patches libraries process-wide: its own worker
    tier: int = 1  # searches run tier by tier (then trainer by trainer): the most wanted first


OFFLOAD_TILED = {"activation_offloading": True, "tiled_mlp": True}
VARIANTS = {
    v.name: v
    for v in (
        Variant("trl", "trl"),
        Variant("posttrain", "posttrain"),
        Variant("posttrain_offload_tiled", "posttrain", OFFLOAD_TILED),
        Variant("trl_qlora", "trl", qlora=True, needs="bitsandbytes", tier=2),
        Variant("posttrain_qlora", "posttrain", qlora=True, needs="bitsandbytes", tier=2),
        Variant("posttrain_qlora_offload_tiled", "posttrain", OFFLOAD_TILED, qlora=True, needs="bitsandbytes", tier=2),
        Variant("trl_liger", "trl", {"use_liger_kernel": True}, needs="liger_kernel", devices=("cuda",), tier=3,
                isolated=True),
    )
}  # fmt: skip
# The searches, most wanted first (issue 17's goals: posttrain's DPO and GRPO against TRL's, then offloading + tiling)
TRAINERS = ("dpo", "grpo", "sft")


def summary_prefix(variant: str) -> str:
    """The prefix of a variant's fields on the trainer rows: none for posttrain, as its other fields there."""
    return "" if variant == "posttrain" else variant.removeprefix("posttrain_") + "_"


# ---- the search (pure: the parent and the workers run the same one) ----


@dataclass
class Search:
    trainer: str
    variant: str
    best: int | None = None  # the longest length that trained a step
    fail: int | None = None  # the shortest length that ran out of memory
    error: str | None = None  # a failure other than running out of memory: the search stops
    start: int | None = None  # where the doubling starts (the bounds' start when None)
    probes: int = 0

    def apply(self, probe: dict) -> None:
        self.probes += 1
        if probe["fits"]:
            self.best = max(self.best or 0, probe["seq_len"])
        elif probe.get("oom"):
            self.fail = min(self.fail or probe["seq_len"], probe["seq_len"])
        else:
            self.error = probe.get("error", "failed")


def _floor_to(length: int, step: int) -> int:
    return length // step * step


def next_length(search: Search, bounds: Bounds) -> int | None:
    """The next length to try, or None when the search is over (found, at the limit, nothing fits, or an error)."""
    if search.error is not None:
        return None
    if search.best is None:
        if search.fail is None:
            return min(search.start or bounds.start, bounds.limit)
        below = _floor_to(search.fail // 2, bounds.step)
        return below if below >= bounds.step else None
    if search.fail is None:
        return min(2 * search.best, bounds.limit) if search.best < bounds.limit else None
    if search.fail - search.best <= max(bounds.step, search.best // RESOLUTION):
        return None
    middle = _floor_to((search.best + search.fail) // 2, bounds.step)
    return middle if search.best < middle < search.fail else None


def status_of(search: Search, bounds: Bounds) -> str:
    if search.error is not None:
        return "error"
    if next_length(search, bounds) is not None:
        return "cut by the deadline"
    if search.best is None:
        return "nothing fits"
    return "at the limit" if search.fail is None else "found"


# ---- one probe (in a worker) ----


def _quantization_config(dtype):
    from transformers import BitsAndBytesConfig

    # TRL's CLI defaults for --load_in_4bit: NF4, no nested quantization, compute in the model's dtype
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def setup_of(variant: Variant, dtype):
    from benchmarks.trainers import Setup

    config = dict(variant.config)
    trainer_kwargs = {}
    if variant.qlora:
        config["model_init_kwargs"] = {"quantization_config": _quantization_config(dtype)}
        trainer_kwargs["peft_config"] = _lora_config()
    return Setup(batch=1, config=config, trainer_kwargs=trainer_kwargs)


def _step(trainer: str, variant: Variant, model_path: str, seq_len: int, device_type: str, dtype):
    from benchmarks.trainers import GRPO_PROMPT_LEN, STEPS, grpo_step

    setup = setup_of(variant, dtype)
    if trainer == "grpo":
        prompt = min(GRPO_PROMPT_LEN, seq_len // 2)
        return grpo_step(variant.library, model_path, seq_len - prompt, 1, 0, device_type, setup, prompt_len=prompt)
    if trainer == "sft":  # one sequence, unpacked (TRL's default)
        setup = dataclasses.replace(setup, config={"packing": False, **setup.config})
    return STEPS[trainer](variant.library, model_path, seq_len, 1, 0, device_type, setup)


def _allocated_mb() -> float:
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def probe(trainer: str, variant: Variant, model_path: str, seq_len: int, device_type: str, dtype) -> dict:
    """One training step at `seq_len`: whether it fits, its tokens/s and peak MB; never raises."""
    row = {"kind": "probe", "trainer": trainer, "variant": variant.name, "seq_len": seq_len,
           "allocated_before_mb": _allocated_mb()}  # fmt: skip
    start = time.perf_counter()
    try:
        tokens_per_s, peak_mb = _step(trainer, variant, model_path, seq_len, device_type, dtype)
        row.update(fits=True, tokens_per_s=tokens_per_s, peak_mb=peak_mb)
    except torch.cuda.OutOfMemoryError:
        row.update(fits=False, oom=True)
    except Exception as err:  # noqa: BLE001 - a broken variant must not sink the others
        text = f"{type(err).__name__}: {err}"
        # an allocation failure outside the caching allocator (pinned host memory, a library's own) also counts
        row.update(fits=False, oom="out of memory" in text.lower(), error=text[:300])
    _release()
    row["seconds"] = time.perf_counter() - start
    row["allocated_after_mb"] = _allocated_mb()
    return row


# ---- the worker: runs its queue of searches until done, the deadline, or memory left behind ----


def worker(state: dict, model_path: str, smoke: bool, deadline) -> int:
    """Run the searches in `state` (as the parent serialized them), printing each probe on a ROW_MARK line.
    Returns EXIT_DIRTY when a probe left memory allocated (the parent starts a fresh worker), else 0."""
    from benchmarks.trainers import model_config

    bounds = Bounds(**state["bounds"])
    dtype = model_config(smoke)[1]
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    done = [Search(**fields) for fields in state["done"]]
    for fields in state["searches"]:
        search = Search(**fields)
        warm_start(search, done)
        done.append(search)
        variant = VARIANTS[search.variant]
        while (length := next_length(search, bounds)) is not None and not past(deadline):
            if _allocated_mb() > LEAK_MB:
                return EXIT_DIRTY
            row = probe(search.trainer, variant, model_path, length, device_type, dtype)
            print(ROW_MARK + json.dumps(row), flush=True)
            search.apply(row)
            if row["allocated_after_mb"] > LEAK_MB or (row.get("oom") and "error" in row):
                return EXIT_DIRTY  # memory left behind, or a failed allocation outside PyTorch's caching allocator
    return 0


# ---- the parent: plans the searches, feeds workers, records rows ----


def _plan(trainers, variants, device_type: str, recorder: Recorder) -> list[list[Search]]:
    """The searches in order, grouped by the worker that runs them (isolated variants apart); a note for each variant
    that cannot run here."""
    shared, isolated = [], {}
    for name in variants:
        variant = VARIANTS[name]
        if variant.needs is not None and not importable(variant.needs):
            recorder.note(f"memory: {name}: dropped, {variant.needs} is not importable")
            continue
        if device_type not in variant.devices:
            recorder.note(f"memory: {name}: dropped, does not run on {device_type}")
            continue
        for trainer in trainers:
            (isolated.setdefault(name, []) if variant.isolated else shared).append(Search(trainer, name))
    shared.sort(key=lambda s: (VARIANTS[s.variant].tier, TRAINERS.index(s.trainer)))
    return [group for group in (shared, *isolated.values()) if group]


def warm_start(search: Search, done: list[Search]) -> None:
    """Start a search that has not probed yet at the longest fit of its trainer among `done` (when there is one)."""
    fits = [s.best for s in done if s.trainer == search.trainer and s.best is not None and s is not search]
    if search.start is None and search.best is None and search.fail is None and fits:
        search.start = max(fits)


def _spawn(searches: list[Search], done: list[Search], bounds: Bounds, model_path: str, smoke: bool, deadline,
           on_row) -> int:  # fmt: skip
    """One worker over `searches` (`done`: those finished, for warm starts); on_row(probe) for each probe it prints.
    Returns its exit status (killed at the deadline: -9)."""
    state = {"bounds": bounds.__dict__, "searches": [s.__dict__ for s in searches],
             "done": [s.__dict__ for s in done]}  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(state, f)
    command = [sys.executable, "-m", "benchmarks.memory", "worker", "--state", f.name, "--model", model_path]
    command += ["--smoke"] * smoke + (["--deadline", str(deadline)] if deadline is not None else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    timer = None
    if deadline is not None:  # a step that outlasts the deadline is killed with its worker
        timer = threading.Timer(max(0.0, deadline - time.time()), proc.kill)
        timer.start()
    try:
        for line in proc.stdout:
            if line.startswith(ROW_MARK):
                on_row(json.loads(line[len(ROW_MARK) :]))
            else:
                print(line, end="")
        return proc.wait()
    finally:
        if timer is not None:
            timer.cancel()
        proc.kill()  # stopped early (SIGTERM): the worker must not hold the GPU after this process
        os.unlink(f.name)


def search_all(groups: list[list[Search]], bounds: Bounds, spawn, recorder: Recorder, deadline) -> list[Search]:
    """Run the searches of each group through workers from spawn(searches, done, on_row) -> exit status, starting a
    fresh one whenever a worker stops early; record each probe as it arrives and each search's result (max_seq) as
    soon as it is over, the unfinished ones' too when stopped (a deadline, SIGTERM). Returns the searches."""
    done: list[Search] = []
    try:
        for group in groups:
            _search_group(list(group), bounds, spawn, recorder, deadline, done)
    finally:
        for search in (s for group in groups for s in group if not any(s is d for d in done)):
            _finish(search, bounds, recorder, done)
    return done


def _search_group(queue: list[Search], bounds: Bounds, spawn, recorder: Recorder, deadline, done: list) -> None:
    while queue and not past(deadline):
        probed = []

        def on_row(row, probed=probed):
            recorder.record(row)
            recorder.log(_probe_line(row))
            search = next(s for s in queue if (s.trainer, s.variant) == (row["trainer"], row["variant"]))
            search.apply(row)
            probed.append(row)
            while queue[0] is not search:  # the worker has moved on: the searches before this one are over
                _finish(queue.pop(0), bounds, recorder, done)

        status = spawn(queue, done, on_row)
        while queue and next_length(queue[0], bounds) is None:
            _finish(queue.pop(0), bounds, recorder, done)
        if queue and not probed and not past(deadline):
            # a fresh worker that probed nothing could not start this search: give it up, go on with the others
            queue[0].error = f"the worker exited with status {status} before its first probe"
            _finish(queue.pop(0), bounds, recorder, done)


def _finish(search: Search, bounds: Bounds, recorder: Recorder, done: list[Search]) -> None:
    done.append(search)
    row = {"kind": "max_seq", "trainer": search.trainer, "variant": search.variant, "max_seq_len": search.best,
           "status": status_of(search, bounds), "first_oom_len": search.fail, "probes": search.probes,
           "limit": bounds.limit}  # fmt: skip
    best = next((r for r in recorder.rows if r.get("kind") == "probe" and r["trainer"] == search.trainer and
                 r["variant"] == search.variant and r["fits"] and r["seq_len"] == search.best), None)  # fmt: skip
    if best is not None:
        row.update(tokens_per_s=best["tokens_per_s"], peak_mb=best["peak_mb"])
    if search.error is not None:
        row["error"] = search.error
    recorder.record(row)
    recorder.log(f"[memory] {search.trainer:<5} {search.variant:<30} max {search.best} ({row['status']})")


def _probe_line(row: dict) -> str:
    what = f"[memory] {row['trainer']:<5} {row['variant']:<30} {row['seq_len']:>7}"
    if row["fits"]:
        peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:,.0f} MB"
        return f"{what} fits: {row['tokens_per_s']:,.0f} tokens/s, peak {peak}, {row['seconds']:.1f} s"
    return f"{what} {'out of memory' if row.get('oom') else row.get('error', 'failed')[:120]}"


def run_memory(recorder: Recorder, smoke: bool = False, deadline=None, trainers=TRAINERS, variants=None,
               bounds: Bounds | None = None) -> None:  # fmt: skip
    """The longest-sequence table into `recorder`: probes and max_seq rows, until `deadline`."""
    from benchmarks.trainers import model_config, save_model

    if not importable("trl"):
        recorder.note("memory: skipped, trl is not installed (pip install 'posttrain[dev]')")
        return
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    bounds = bounds or (SMOKE_BOUNDS if smoke else GPU_BOUNDS)
    recorder.log(f"# memory: lengths {bounds.start} doubling to at most {bounds.limit}, in steps of {bounds.step}")
    groups = _plan(list(trainers), list(variants or VARIANTS), device_type, recorder)
    with tempfile.TemporaryDirectory() as root:
        path = save_model(*model_config(smoke), root)

        def spawn(searches, done, on_row):
            return _spawn(searches, done, bounds, path, smoke, deadline, on_row)

        search_all(groups, bounds, spawn, recorder, deadline)


def _length(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of tokens")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", choices=("run", "worker"), default="run")
    parser.add_argument("--trainer", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--variant", nargs="+", choices=list(VARIANTS), help="default: all (most wanted first)")
    parser.add_argument("--start", type=_length, help="the first length tried (default 8192; 16 with --smoke)")
    parser.add_argument("--limit", type=_length, help="the longest length tried (default 131072; 32 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="the tiny model on the CPU, lengths 16 to 32")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--deadline", type=float, default=os.environ.get("BENCH_DEADLINE") or None,
                        help="seconds since the epoch after which no new probe starts")  # fmt: skip
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.command == "worker":
        return worker(json.loads(Path(args.state).read_text()), args.model, args.smoke, args.deadline)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to exercise the search here", file=sys.stderr)
        return 2
    from benchmarks.report import run_and_report

    default = SMOKE_BOUNDS if args.smoke else GPU_BOUNDS
    bounds = dataclasses.replace(default, start=args.start or default.start, limit=args.limit or default.limit)

    def body(recorder):
        run_memory(recorder, args.smoke, args.deadline, args.trainer, args.variant, bounds)

    run_and_report(args.out, JSONL, "memory", body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
