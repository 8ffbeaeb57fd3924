"""python -m benchmarks [--op OP ...] [--mode MODE ...] [--dtype bf16 ...] [--shape N=..,H=..] [--provider NAME ...]
                        [--smoke] [--trainers] [--base REF] [--out DIR]

Times every registered op's providers (posttrain, torch reference, torch.compile, TRL, Liger), measures the device's
matmul and copy ceilings and the LM heads' cuBLAS GEMM floors in the same run, and writes results.jsonl (each row as it
is measured), then results.csv, report.md, report.png and summary.json under --out. --smoke runs tiny shapes on
whatever device there is (the CPU and Triton's interpreter included) in seconds. --base REF times the same rows for
another commit (a git worktree, its own posttrain) side by side with this checkout: OUT/head, OUT/base, OUT/compare.md.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _parse_shape(text: str) -> dict:
    try:
        return {key: int(value) for key, value in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r} is not of the form N=8192,H=896,V=151936") from None


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.registry import REGISTRY
    from benchmarks.timing import MODES

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--op", nargs="+", choices=sorted(REGISTRY), help="ops to run (default: all)")
    parser.add_argument("--mode", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), help="default: bf16 (fp32 with --smoke)")
    parser.add_argument(
        "--shape", nargs="+", type=_parse_shape, help="override the shape sweep, e.g. N=8192,H=896,V=151936"
    )
    parser.add_argument("--provider", nargs="+", help="only these providers (e.g. posttrain trl)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks that everything runs")
    parser.add_argument("--trainers", action="store_true", help="also the trainer-step rows (needs a GPU)")
    parser.add_argument("--base", metavar="REF", help="also time the git commit REF (a worktree), side by side")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    return parser


def forwarded_args(args) -> list[str]:
    """The command line of `args` without --base and --out (what --base runs for each commit)."""
    argv = ["--mode", *args.mode]
    for flag, values in (("--op", args.op), ("--dtype", args.dtype), ("--provider", args.provider)):
        argv += [flag, *values] if values else []
    if args.shape:
        argv += ["--shape", *(",".join(f"{k}={v}" for k, v in shape.items()) for shape in args.shape)]
    return argv + ["--smoke"] * args.smoke + ["--trainers"] * args.trainers


def measure(args, device, recorder) -> None:
    from benchmarks.environment import record_ceilings, record_floor
    from benchmarks.registry import REGISTRY
    from benchmarks.runner import run_op

    dtypes = [DTYPES[d] for d in (args.dtype or (["fp32"] if args.smoke else ["bf16"]))]
    record_ceilings(recorder, dtypes, device, args.smoke)
    floors = set()
    for name in args.op or list(REGISTRY):
        bench = REGISTRY[name]
        shapes = args.shape or (bench.smoke_shapes if args.smoke else bench.shapes)
        run_op(bench, shapes, dtypes, args.mode, device, recorder, only=args.provider)
        if bench.floor is None or "full" not in args.mode:
            continue
        for shape in shapes:
            for dtype in dtypes:
                for (n, h, v), _ in bench.floor(shape):
                    if (n, h, v, dtype) not in floors:
                        floors.add((n, h, v, dtype))
                        record_floor(recorder, {"N": n, "H": h, "V": v}, dtype, device)
    if args.trainers:
        from benchmarks.trainers import run_trainers

        run_trainers(device, recorder, smoke=args.smoke)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.base:
        from benchmarks.base import run_base

        return run_base(args.base, forwarded_args(args), args.out)
    from benchmarks.environment import record_environment
    from benchmarks.report import write_all
    from benchmarks.sink import Recorder, stop_on_sigterm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print(
            "no CUDA device: the full sweep needs a GPU; run with --smoke to exercise the suite here", file=sys.stderr
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.jsonl").unlink(missing_ok=True)
    recorder = Recorder(args.out / "results.jsonl")
    stop_on_sigterm()
    try:
        record_environment(recorder, device)
        measure(args, device, recorder)
    finally:
        write_all(args.out, recorder.rows)
        print(f"# wrote {args.out}/results.jsonl, results.csv, report.md, report.png and summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
