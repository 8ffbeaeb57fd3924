"""What a run measured on: versions, the commit of the posttrain it imported, and the device's ceilings and GEMM
floors, each recorded as a row (sink.py)."""

import datetime
import importlib.metadata
import os
import subprocess
from pathlib import Path

import torch

from benchmarks.ceilings import copy_gbps, gemm_floor, matmul_tflops
from benchmarks.sink import Recorder


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_commit(path: Path) -> str:
    """The short commit of the checkout holding `path`, "-dirty" when tracked files differ from it; POSTTRAIN_COMMIT
    (or "unknown") where there is no git history (the device machine gets a copy of the working tree)."""
    git = ["git", "-C", str(path)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True)
    if head.returncode != 0:
        return os.environ.get("POSTTRAIN_COMMIT", "unknown")
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], check=False, capture_output=True, text=True
    )
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device) -> dict:
    import posttrain.kernels
    import transformers
    import triton

    package = Path(posttrain.__file__).resolve().parent
    return {
        "kind": "env",
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else f"{device.type} (smoke)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "trl": _version("trl"),
        "liger_kernel": _version("liger-kernel"),
        "commit": source_commit(package),
        "posttrain_path": str(package),
        "kernels_path": str(Path(posttrain.kernels.__file__).resolve().parent),
        "autotune": os.environ.get("POSTTRAIN_AUTOTUNE", "0"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
    }


def record_environment(recorder: Recorder, device) -> dict:
    env = recorder.record(environment(device))
    recorder.log(f"# {env['gpu']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    return env


def record_ceilings(recorder: Recorder, dtypes, device, smoke: bool) -> None:
    size, n_bytes = (256, 2**24) if smoke else (8192, 2**30)
    for dtype in dtypes:
        name = f"matmul_tflops_{str(dtype).removeprefix('torch.')}"
        recorder.record({"kind": "ceiling", "name": name, "value": matmul_tflops(dtype, device, size)})
    recorder.record({"kind": "ceiling", "name": "copy_gbps", "value": copy_gbps(device, n_bytes)})
    recorder.log(
        "# ceilings: " + ", ".join(f"{r['name']} {r['value']:.1f}" for r in recorder.rows if r["kind"] == "ceiling")
    )


def record_floor(recorder: Recorder, shape: dict, dtype, device) -> None:
    """The cuBLAS GEMMs of an LM head at `shape` (N, H, V), measured now (ceilings.gemm_floor)."""
    n, h, v = shape["N"], shape["H"], shape["V"]
    row = {"kind": "floor", "N": n, "H": h, "V": v, "dtype": str(dtype).removeprefix("torch.")}
    try:
        row.update(gemm_floor(n, h, v, dtype, device))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
    recorder.record(row)
    recorder.log(f"# GEMM floor {row}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
