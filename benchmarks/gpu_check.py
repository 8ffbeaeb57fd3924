"""Forward+backward time and peak memory of fused_linear_logprob against the torch reference, TRL's fused head and
Liger's fused linear cross entropy, in bf16, at the shapes of a Qwen2-0.5B head and a 7B-class head.

    python -m benchmarks.gpu_check [--shapes 16384x4096x151936 8192x896x151936]
"""

import argparse
import subprocess

import torch
import triton
import triton.testing

from benchmarks.providers import FUSED_LINEAR_LOGPROB, available, fused_linear_logprob_inputs

DEFAULT_SHAPES = ["16384x4096x151936", "8192x896x151936"]


def measure(fn, hidden, weight, targets):
    """Median / p20 / p80 ms of forward+backward (after warm-up, L2 flushed by do_bench) and peak MB above inputs."""

    def step():
        out = fn(hidden, weight, targets)
        torch.autograd.grad(out.sum(), (hidden, weight))

    step()  # compile and autotune outside the measurement
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    p50, p20, p80 = triton.testing.do_bench(step, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
    return {"ms": p50, "p20": p20, "p80": p80, "peak_mb": peak_mb}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="NxHxV")
    args = parser.parse_args(argv)
    providers, notes = available(FUSED_LINEAR_LOGPROB)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | {commit}")
    for note in notes:
        print(f"# {note}")
    print(f"{'shape':>22} {'provider':>10} {'ms p50':>9} {'p20':>9} {'p80':>9} {'peak MB':>9}")
    for shape in args.shapes:
        n, h, v = (int(x) for x in shape.split("x"))
        inputs = fused_linear_logprob_inputs(n, h, v)
        for name, fn in providers.items():
            try:
                r = measure(fn, *inputs)
            except torch.cuda.OutOfMemoryError:
                print(f"{shape:>22} {name:>10} {'OOM':>9}")
                torch.cuda.empty_cache()
                continue
            print(f"{shape:>22} {name:>10} {r['ms']:9.2f} {r['p20']:9.2f} {r['p80']:9.2f} {r['peak_mb']:9.0f}")
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
