"""Helpers shared by the kernel launchers: interpreter detection and matmul precision."""

import os

import torch


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (TRITON_INTERPRET=1) instead of compiling for a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for `dtype` inputs, following torch's own matmul setting.

    Triton defaults fp32 dots to tf32; torch only does so when asked (torch.backends.cuda.matmul.allow_tf32), and the
    kernels must give torch's numbers.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
