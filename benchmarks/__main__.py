"""python -m benchmarks [--op OP ...] [--mode MODE ...] [--dtype bf16 ...] [--shape N=..,H=..] [--smoke] [--out DIR]

Times every registered op's providers (posttrain, torch reference, torch.compile, TRL, Liger), measures the device's
matmul and copy ceilings in the same run, and writes results.csv, report.md, <op>.png and summary.json under --out.
--smoke runs tiny shapes on whatever device there is (the CPU and Triton's interpreter included) in seconds.
"""

import argparse
import datetime
import os
import subprocess
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
    parser.add_argument("--shape", nargs="+", type=_parse_shape, help="override the shape sweep, e.g. N=8192,H=896,V=151936")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device: checks that everything runs")
    parser.add_argument("--trainers", action="store_true", help="also the trainer-step rows (needs a GPU)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    return parser


def environment(device) -> dict:
    import transformers
    import triton

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return {
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else f"{device.type} (smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "commit": commit.stdout.strip() or "unknown",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


def measure_ceilings(dtypes, device, smoke: bool) -> dict:
    from benchmarks.ceilings import copy_gbps, matmul_tflops

    size, n_bytes = (256, 2**24) if smoke else (8192, 2**30)
    ceilings = {f"matmul_tflops_{str(d).removeprefix('torch.')}": matmul_tflops(d, device, size) for d in dtypes}
    ceilings["copy_gbps"] = copy_gbps(device, n_bytes)
    return ceilings


def main(argv=None) -> int:
    from benchmarks.ceilings import gemm_floor_ms
    from benchmarks.registry import REGISTRY
    from benchmarks.report import write_all
    from benchmarks.runner import run_op

    args = build_parser().parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("no CUDA device: the full sweep needs a GPU; run with --smoke to exercise the suite here", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in (args.dtype or (["fp32"] if args.smoke else ["bf16"]))]
    env = environment(device)
    print(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    ceilings = measure_ceilings(dtypes, device, args.smoke)
    print("# ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items()))
    rows, notes, gemm_floors = [], [], {}
    for name in args.op or list(REGISTRY):
        bench = REGISTRY[name]
        shapes = args.shape or (bench.smoke_shapes if args.smoke else bench.shapes)
        rows += run_op(bench, shapes, dtypes, args.mode, device, log=print)
        if name == "fused_linear_logprob" and "full" in args.mode:
            for shape in shapes:
                for dtype in dtypes:
                    key = (shape["N"], shape["H"], shape["V"], str(dtype).removeprefix("torch."))
                    gemm_floors[key] = gemm_floor_ms(shape["N"], shape["H"], shape["V"], dtype, device)
    trainer_rows = []
    if args.trainers:
        from benchmarks.trainers import run_trainers

        trainer_rows = run_trainers(device, smoke=args.smoke, log=print)
    write_all(args.out, rows, env, ceilings, notes, gemm_floors, trainer_rows)
    print(f"# wrote {args.out}/results.csv, report.md, summary.json and plots")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
