"""Argument checks and implementation dispatch shared by the ops."""

import importlib.util
import math
import os

import torch
from torch.utils.checkpoint import checkpoint

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on `device`: a CUDA device, or any device under TRITON_INTERPRET=1."""
    if not _HAS_TRITON:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


# impl="auto" tries these in order and falls back to torch. The order follows the committed GPU benchmark results
# (benchmarks/results/); until an op's CUDA kernel has been measured against its Triton kernel, Triton comes first.
PREFERRED_IMPLS = {op: ("triton", "cuda") for op in ("selective_log_softmax", "grpo_advantages", "grpo_loss")}


def _usable(impl: str, device: torch.device) -> bool:
    if impl == "triton":
        return triton_usable(device)
    if impl == "cuda":
        from ._cuda import cuda_ops_available

        return device.type == "cuda" and cuda_ops_available()
    return impl == "torch"


def resolve_impl(
    impl: str, device: torch.device, choices: tuple[str, ...] = ("auto", "triton", "torch"), op: str | None = None
) -> str:
    """Turn `impl` into the implementation to run on `device`.

    "auto" takes the first usable one of PREFERRED_IMPLS[op] (default: Triton), else torch. An explicit choice that
    cannot run here is an error that says why.
    """
    if impl not in choices:
        raise ValueError(f"impl {impl!r} is not one of: {', '.join(choices)}")
    if impl == "auto":
        return next((c for c in PREFERRED_IMPLS.get(op, ("triton",)) if _usable(c, device)), "torch")
    if impl == "triton" and not triton_usable(device):
        reason = "triton is not installed" if not _HAS_TRITON else f"the inputs are on {device.type}"
        raise RuntimeError(f"impl='triton' needs a CUDA device or TRITON_INTERPRET=1, but {reason}")
    if impl == "cuda" and not _usable("cuda", device):
        from ._cuda import BUILD_HINT

        raise RuntimeError(f"impl='cuda' needs CUDA inputs (got {device.type}) and {BUILD_HINT}")
    return impl


def check_float(name: str, tensor: torch.Tensor, dim: int | None = None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES and tensor.dtype != torch.float64:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 (float64 with impl='torch'), got {tensor.dtype}")
    if dim is not None and tensor.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(tensor.shape)}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"inputs must be on one device, got {listed}")


def check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def check_targets(targets: torch.Tensor, expected_shape: torch.Size, vocab_size: int, ignore_index: int) -> None:
    """Targets must be integers in [0, vocab_size) or ignore_index; the range check syncs with the device once."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.shape != expected_shape:
        raise ValueError(f"targets has shape {tuple(targets.shape)}, expected {tuple(expected_shape)}")
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if targets.numel() and bool(bad.any()):
        first = bad.flatten().nonzero()[0].item()
        value = targets.flatten()[first].item()
        raise ValueError(
            f"targets (flattened) [{first}] = {value} is outside [0, {vocab_size}) and is not ignore_index "
            f"({ignore_index})"
        )


def map_row_chunks(fn, row_tensors: tuple[torch.Tensor, ...], other_args: tuple, chunk_rows: int):
    """Apply `fn(*row_chunks, *other_args)` to `chunk_rows` rows at a time and concatenate its tuple of outputs.

    While autograd records, each chunk runs under activation checkpointing, so the backward recomputes one chunk's
    intermediates at a time instead of keeping every chunk's (the references' [rows, V] logits) alive at once.
    """
    params = [t for t in other_args if isinstance(t, torch.Tensor)]
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (*row_tensors, *params))
    pieces = []
    for start in range(0, max(row_tensors[0].shape[0], 1), chunk_rows):
        rows = tuple(t[start : start + chunk_rows] for t in row_tensors)
        if track:
            pieces.append(checkpoint(fn, *rows, *other_args, use_reentrant=False))
        else:
            pieces.append(fn(*rows, *other_args))
    return tuple(torch.cat(column) for column in zip(*pieces))
