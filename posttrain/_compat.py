"""Everything that depends on a library's version or private API, in one place.

CI runs the newest transformers (5.2x); the GPU image has 5.17. Each function below says which versions it bridges.
"""

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import transformers
from packaging.version import Version

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
TRANSFORMERS_VERSION = Version(transformers.__version__)


def unshadow_pypi_kernels() -> None:
    """Drop a source checkout's root from sys.path (`python -m ...` and `python -c` from the root put it there).

    Its kernels/ folder is installed as posttrain.kernels, but from the root it would shadow the PyPI package
    `kernels`, which transformers (a dependency since 5.25) imports when it loads a model.
    """
    if not (_SOURCE_ROOT / "kernels").is_dir() or not (_SOURCE_ROOT / "pyproject.toml").is_file():
        return
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _SOURCE_ROOT]


# ---- Trainer: who scales the loss for gradient accumulation ----


def declare_loss_scaling(trainer, loss_is_scaled_for_ga: bool | None) -> None:
    """transformers >= 5.19 reads `trainer.loss_is_scaled_for_ga` (a class attribute of ours); older versions decide
    from `model_accepts_loss_kwargs` and `compute_loss_func`, which this sets to the same effect."""
    if TRANSFORMERS_VERSION >= Version("5.19.0") or loss_is_scaled_for_ga is None:
        return
    trainer.model_accepts_loss_kwargs = False
    if loss_is_scaled_for_ga:
        trainer.compute_loss_func = "set: the loss is already scaled for gradient accumulation"


def end_training(trainer) -> None:
    """Trainer.end() (transformers >= 5.18: finish the trackers, destroy the process group); nothing before."""
    if hasattr(trainer, "end"):
        trainer.end()


# ---- Gradient (activation) checkpointing: renamed in transformers 5.2x ----


def sync_checkpointing_alias(args) -> None:
    """Before TrainingArguments.__post_init__: TRL's field `gradient_checkpointing` (default True) is a deprecated
    alias of `activation_checkpointing` in transformers 5.2x, which warns whenever only the old name is set. Set the
    new name from it so a posttrain config warns about nothing its user can change."""
    for old, new in (
        ("gradient_checkpointing", "activation_checkpointing"),
        ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"),
    ):
        if hasattr(args, new) and getattr(args, new) is None and getattr(args, old) is not None:
            setattr(args, new, getattr(args, old))


def _renamed(model) -> bool:
    return hasattr(model, "activation_checkpointing_disable")


def is_checkpointing(model) -> bool:
    """Whether `model` has gradient (activation) checkpointing on."""
    if _renamed(model):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


def disable_checkpointing(model) -> None:
    model.activation_checkpointing_disable() if _renamed(model) else model.gradient_checkpointing_disable()


def enable_checkpointing(model, checkpointing_kwargs: dict | None) -> None:
    """Turn checkpointing on as Trainer does: every_n_layers and offload are options of the enable call, the rest go
    to torch's checkpoint."""
    kwargs = dict(checkpointing_kwargs or {})
    options = {key: kwargs.pop(key) for key in ("every_n_layers", "offload") if key in kwargs}
    if _renamed(model):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs or None, **options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None, **options)


@contextlib.contextmanager
def checkpointing_disabled(model, checkpointing_kwargs: dict | None = None):
    """`model` without checkpointing inside the block, back as it was after."""
    enabled = is_checkpointing(model)
    if enabled:
        disable_checkpointing(model)
    try:
        yield
    finally:
        if enabled:
            enable_checkpointing(model, checkpointing_kwargs)


# ---- Mixture-of-Experts: each modeling module's own load-balancing loss ----


def module_load_balancing_loss(model) -> Callable:
    """The `load_balancing_loss_func` of `model`'s modeling module (the first one along its class hierarchy), or
    Mixtral's, which the MoE families without their own copy share. Not a public API of transformers."""
    for cls in type(model).__mro__:
        func = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if func is not None:
            return func
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func
