"""Helpers shared by the kernel launchers: interpreter detection, matmul precision, the persistent grid's size and the
pinned-or-autotuned launch of tiled kernels."""

import functools
import os
from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

# POSTTRAIN_AUTOTUNE=1 autotunes the tiled kernels instead of launching their pinned tile. Read once, at import: the
# choice decides how each kernel module wraps its kernels.
AUTOTUNE = os.environ.get("POSTTRAIN_AUTOTUNE", "0") == "1"
# Programs of a persistent grid under the interpreter: a few, so that each one loops over several tiles in the tests.
INTERPRETER_PROGRAMS = 3


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


@functools.cache
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device) -> int:
    """Programs of a persistent grid on `device`: one per streaming multiprocessor (INTERPRETER_PROGRAMS on the CPU)."""
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS
    return _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


class TiledKernel:
    """A @triton.jit kernel whose tile (a triton.Config) is pinned per input dtype, or autotuned when AUTOTUNE.

    pinned(dtype) -> Config: the tile launched by default; dtype_arg names the tensor argument whose dtype decides.
    tiles: every Config the autotuner may try; usable(args) -> the subset it tries for these named arguments (e.g. per
    dtype, or without the tiles that spill under some flags). key: the autotune key, which must name every argument
    that changes the compiled code's register use (its flags), not only the shapes; Triton adds the tensors' dtypes.
    derived: constexprs computed from the named arguments and the tile (triton.heuristics' rules).

    Call as kernel(grid, *args, config=None, **kwargs); `config` forces a tile (a benchmark's sweep).
    """

    def __init__(
        self,
        fn: triton.JITFunction,
        *,
        pinned: Callable[[torch.dtype], triton.Config],
        tiles: Sequence[triton.Config],
        usable: Callable[[dict], Sequence[triton.Config]],
        key: list[str],
        derived: dict[str, Callable[[dict], object]],
        dtype_arg: str,
    ):
        self.fn = fn
        self.pinned = pinned
        self.key = key
        self.derived = derived
        self._dtype_index = fn.arg_names.index(dtype_arg)
        self.tuner = None
        if AUTOTUNE:
            prune = {"early_config_prune": lambda configs, named, **kwargs: list(usable({**named, **kwargs}))}
            self.tuner = triton.autotune(list(tiles), key=key, prune_configs_by=prune)(triton.heuristics(derived)(fn))

    def __call__(self, grid, *args, config: triton.Config | None = None, **kwargs):
        if config is None and self.tuner is not None:
            return self.tuner[grid](*args, **kwargs)
        config = config or self.pinned(args[self._dtype_index].dtype)
        named = {**dict(zip(self.fn.arg_names, args)), **kwargs, **config.kwargs}
        extra = {name: rule(named) for name, rule in self.derived.items()}
        return self.fn[grid](
            *args, **kwargs, **config.kwargs, **extra, num_warps=config.num_warps, num_stages=config.num_stages
        )


@triton.jit
def divide_by_temperature(x, temperature, SCALED: tl.constexpr):
    """x / temperature with IEEE rounding, as torch's `logits / T` (identity when not SCALED, i.e. T == 1).

    Multiplying by a rounded 1/T would shift every logit by the same relative error; at |z| ~ 1e2 that alone exceeds
    twice torch's own error, and div.full (Triton's default fp32 division) is not correctly rounded either.
    """
    if SCALED:
        return tl.math.div_rn(x, temperature)
    return x
