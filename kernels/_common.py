"""Helpers shared by the kernel launchers: interpreter detection and matmul precision."""

import os

import torch
import triton
import triton.language as tl


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


@triton.jit
def divide_by_temperature(x, temperature, SCALED: tl.constexpr):
    """x / temperature with IEEE rounding, as torch's `logits / T` (identity when not SCALED, i.e. T == 1).

    Multiplying by a rounded 1/T would shift every logit by the same relative error; at |z| ~ 1e2 that alone exceeds
    twice torch's own error, and div.full (Triton's default fp32 division) is not correctly rounded either.
    """
    if SCALED:
        return tl.math.div_rn(x, temperature)
    return x
