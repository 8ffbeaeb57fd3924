"""A tile sweep: each candidate tile of a kernel timed on its own, through the op that launches it.

Run it with POSTTRAIN_AUTOTUNE=1, under which every tiled kernel carries an autotuner holding its candidates. Kernels
are found among a kernel module's attributes, in either of two forms:
- a tiled kernel (kernels/_common.py's TiledKernel: a `pinned(dtype)` tile, and a `tuner`): its candidates are the
  tuner's configs, narrowed by the tuner's own pruning to those it would try for plain log-probs of this dtype (every
  flag off); it is pinned to each in turn, together with the module's `pinned_tile`, from which launchers size their
  grids and buffers;
- a plain triton.autotune kernel (possibly under triton.heuristics): given one config at a time.
A pinned kernel benchmarks nothing. A forward kernel ("fwd" in its name) is timed in forward mode, a backward one in
backward mode, any other forward + backward, while the module's other kernels stay at their default tile. A module
offering no kernel with several candidates leaves a note instead of rows.
"""

import contextlib
import functools
import importlib
import os
from typing import NamedTuple

import torch

from benchmarks.providers import importable
from benchmarks.registry import REGISTRY
from benchmarks.runner import input_sets, shape_label
from benchmarks.sink import Recorder, past
from benchmarks.timing import quantiles_ms, step_for_mode

# kernel module -> the benchmark whose posttrain provider launches its kernels
KERNEL_MODULES = {
    "posttrain.kernels.fused_linear_logprob": "fused_linear_logprob",
    "posttrain.kernels.fused_linear_loss": "fused_linear_loss_sft",
}


class Tunable(NamedTuple):
    """A kernel of a module: its candidate configs, its default, and pin(config), a context manager."""

    configs: list
    default: object
    pin: object


def _autotuner(obj):
    from triton.runtime.autotuner import Autotuner

    while obj is not None and not isinstance(obj, Autotuner):
        obj = getattr(obj, "fn", None)
    return obj


@contextlib.contextmanager
def _pin_autotuner(tuner, config):
    configs, cache = tuner.configs, dict(tuner.cache)
    tuner.configs = [config]  # a single-config autotuner skips benchmarking
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = configs
        tuner.cache.clear()
        tuner.cache.update(cache)


@contextlib.contextmanager
def _pin_tiled(kernel, module, config):
    saved = kernel.pinned, kernel.tuner, vars(module).get("pinned_tile")
    kernel.pinned, kernel.tuner = (lambda dtype: config), None
    if saved[2] is not None:
        module.pinned_tile = lambda dtype: config
    try:
        yield
    finally:
        kernel.pinned, kernel.tuner = saved[:2]
        if saved[2] is not None:
            module.pinned_tile = saved[2]


def _tiled_candidates(kernel, dtype) -> list:
    tuner = kernel.tuner
    if tuner is None:
        return []
    # what the tuner would try for plain log-probs of `dtype`: every pointer of that dtype, every flag off
    plain = {name: torch.empty(0, dtype=dtype) if name.endswith("_ptr") else False for name in kernel.fn.arg_names}
    prune = getattr(tuner, "early_config_prune", None)
    return list(prune(tuner.configs, plain) if prune else tuner.configs)


def tunables(module, dtype) -> dict[str, Tunable]:
    """The module's tiled or autotuned kernels by attribute name."""
    found = {}
    for name, obj in vars(module).items():
        if callable(getattr(obj, "pinned", None)) and hasattr(obj, "tuner"):
            found[name] = Tunable(
                _tiled_candidates(obj, dtype), obj.pinned(dtype), functools.partial(_pin_tiled, obj, module)
            )
        elif (tuner := _autotuner(obj)) is not None:
            found[name] = Tunable(list(tuner.configs), tuner.configs[0], functools.partial(_pin_autotuner, tuner))
    return found


def config_label(config) -> str:
    tile = ", ".join(f"{key}={value}" for key, value in config.kwargs.items())
    return f"{tile}, warps={config.num_warps}, stages={config.num_stages}"


def mode_for(kernel: str, modes: tuple[str, ...]) -> str:
    for part, mode in (("fwd", "forward"), ("bwd", "backward")):
        if part in kernel and mode in modes:
            return mode
    return "full"


def sweep(kernels: dict[str, Tunable], measure, recorder: Recorder, base: dict, deadline=None) -> bool:
    """Time every candidate of every kernel holding several, through `measure(kernel_name) -> (mode, Timing)`; one
    row each. Returns False when the deadline stopped it."""
    for name, kernel in kernels.items():
        if len(kernel.configs) < 2:
            continue
        with contextlib.ExitStack() as others:
            for other_name, other in kernels.items():
                if other_name != name:
                    others.enter_context(other.pin(other.default))
            for config in kernel.configs:
                if past(deadline):
                    recorder.note(f"tiles: deadline reached in {name}'s sweep at {base['shape']}")
                    return False
                row = {"kind": "tile", **base, "kernel": name, "config": config_label(config)}
                row["default"] = config is kernel.default
                with kernel.pin(config):
                    try:
                        row["mode"], timing = measure(name)
                        row.update(ms_p20=timing.p20, ms_p50=timing.p50, ms_p80=timing.p80, samples=timing.samples)
                    except Exception as err:  # a tile that fails to compile or run is a result too
                        row["error"] = f"{type(err).__name__}: {err}"[:300]
                recorder.record(row)
                recorder.log(f"[tiles] {name} {row['config']}: {row.get('ms_p50', row.get('error'))}")
    return True


def _measurer(bench, shape: dict, dtype, device):
    """measure(kernel) for sweep(): times the posttrain provider of `bench` in the kernel's mode (inputs made once)."""
    inputs = {}

    def measure(kernel: str):
        mode = mode_for(kernel, bench.modes)
        if mode not in inputs:
            inputs[mode] = input_sets(bench, shape, dtype, device, mode)
        step = step_for_mode(bench.providers["posttrain"].fn, inputs[mode], mode, bench.grad_names)
        return mode, quantiles_ms(step, device)

    return measure


def run_tiles(shapes, dtype, device, recorder: Recorder, deadline=None) -> None:
    """Every module's sweep at the first shape, then at the next (the small-H shape is where tiles matter most)."""
    modules = {}
    for module_name, op in KERNEL_MODULES.items():
        if not importable(module_name):
            recorder.note(f"tiles: {module_name} is not importable, nothing swept")
            continue
        kernels = tunables(importlib.import_module(module_name), dtype)
        if any(len(k.configs) > 1 for k in kernels.values()):
            modules[op] = kernels
        else:
            recorder.note(f"tiles: {module_name} offers no kernel with several candidate tiles here (POSTTRAIN_AUTOTUNE="
                          f"{os.environ.get('POSTTRAIN_AUTOTUNE', 'unset')}): nothing swept")  # fmt: skip
    for shape in shapes:
        for op, kernels in modules.items():
            base = {"op": op, "shape": shape_label(shape), "dtype": str(dtype).removeprefix("torch.")}
            if not sweep(kernels, _measurer(REGISTRY[op], shape, dtype, device), recorder, base, deadline):
                return
