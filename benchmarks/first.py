"""The phases of the first GPU run (benchmarks/gpu_check.sh OUT first runs them in order, each under its own deadline):

    python -m benchmarks.first PHASE --out DIR [--deadline EPOCH_S] [--smoke]

verify      posttrain and torch at bf16, each against an fp32 reference, at the headline shapes
headline    the ceilings and cuBLAS GEMM floors, then fused_linear_logprob (posttrain, TRL's head, Liger, torch) and the
            fused linear loss rows (SFT NLL, GRPO) at both headline shapes, torch.compile last (its compiles are slow)
tiles       one row per candidate tile of the LM-head kernels, each pinned in turn (with POSTTRAIN_AUTOTUNE=1: tiles.py)
trainers    SFT, DPO, GRPO, KTO and Reward steps against TRL: tokens/s and peak memory
memory      the longest sequence that trains one step, per trainer and variant (benchmarks/memory.py), until the
            deadline
generation  the sampling backends' generated tokens/s and peak memory (benchmarks/generation.py)
report      report.md, summary.json, results.csv and report.png from DIR/first.jsonl (and DIR/tests.log); prints
            report.md

Every row is appended to DIR/first.jsonl and flushed as it is measured. A phase stops starting measurements once its
deadline (--deadline, else $BENCH_DEADLINE) has passed; --smoke runs tiny shapes in fp32 on the CPU.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

PHASES = ("verify", "headline", "tiles", "trainers", "memory", "generation", "report")
# The memory phase's smoke run: the cheapest search that still fills max_seq_len and trl_max_seq_len
SMOKE_MEMORY = {"trainers": ("dpo",), "variants": ("trl", "posttrain")}
JSONL = "first.jsonl"


def _setting(smoke: bool):
    """(device, low-precision dtype, reference dtype, shapes): bf16 / fp32 at the headline shapes on a GPU; fp32 /
    fp64 at the smoke shape elsewhere (the interpreter's bf16 is broken)."""
    from benchmarks.registry import HEADLINE_SHAPES, REGISTRY

    if smoke:
        return torch.device("cpu"), torch.float32, torch.float64, REGISTRY["fused_linear_logprob"].smoke_shapes
    return torch.device("cuda"), torch.bfloat16, torch.float32, HEADLINE_SHAPES


def headline(recorder, smoke: bool, deadline) -> None:
    from benchmarks.environment import record_ceilings, record_floor
    from benchmarks.registry import REGISTRY
    from benchmarks.runner import run_op

    device, dtype, _, shapes = _setting(smoke)
    record_ceilings(recorder, [dtype], device, smoke)
    for shape in shapes:
        record_floor(recorder, shape, dtype, device)
    logprob = REGISTRY["fused_linear_logprob"]
    cheap = [name for name in logprob.providers if name != "torch_compile"]
    jobs = [(logprob, shape, cheap) for shape in shapes]
    jobs += [
        (REGISTRY[op], shape, None) for op in ("fused_linear_loss_sft", "fused_linear_loss_grpo") for shape in shapes
    ]
    jobs += [(logprob, shape, ["torch_compile"]) for shape in shapes]
    for bench, shape, only in jobs:
        run_op(bench, [shape], [dtype], ["full"], device, recorder, only=only, deadline=deadline)


def run_phase(phase: str, out: Path, smoke: bool, deadline) -> None:
    from benchmarks.environment import record_environment
    from benchmarks.sink import Recorder

    recorder = Recorder(out / JSONL, phase=phase)
    device, dtype, exact, shapes = _setting(smoke)
    record_environment(recorder, device)
    if phase == "verify":
        from benchmarks.verify import run_verify

        run_verify(shapes, dtype, exact, device, recorder, deadline)
    elif phase == "headline":
        headline(recorder, smoke, deadline)
    elif phase == "tiles":
        from benchmarks.tiles import run_tiles

        run_tiles(shapes, dtype, device, recorder, deadline)
    elif phase == "trainers":
        from benchmarks.trainers import run_trainers

        run_trainers(device, recorder, smoke=smoke, deadline=deadline)
    elif phase == "memory":
        from benchmarks.memory import run_memory
        from benchmarks.sink import stop_on_sigterm

        stop_on_sigterm()  # its workers are killed and its unfinished searches recorded as cut
        run_memory(recorder, smoke, deadline, **(SMOKE_MEMORY if smoke else {}))
    elif phase == "generation":
        from benchmarks.generation import run_generation

        run_generation(recorder, smoke, deadline)


def report(out: Path) -> None:
    from benchmarks.report import write_all
    from benchmarks.sink import read_rows

    write_all(out, read_rows(out / JSONL), tests_log=out / "tests.log")
    print((out / "report.md").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.first", description=__doc__.split("\n\n")[0])
    parser.add_argument("phase", choices=PHASES)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, default=os.environ.get("BENCH_DEADLINE") or None,
                        help="seconds since the epoch after which no new measurement starts")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in fp32 on the CPU (Triton's interpreter)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "report":
        report(args.out)
        return 0
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to exercise the phases here", file=sys.stderr)
        return 2
    run_phase(args.phase, args.out, args.smoke, args.deadline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
