"""Calling reward functions and reward models on a batch of completions, with TRL's conventions and clear errors."""

import asyncio
import concurrent.futures
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable

import torch

# What a reward function is called with besides the dataset's columns: the samples, and (from GRPOTrainer) the
# trainer's state and logging hooks. A dataset column of the same name would replace one or be replaced by it.
SAMPLE_ARGUMENTS = ("prompts", "completions", "completion_ids")
TRAINER_ARGUMENTS = ("trainer_state", "log_extra", "log_metric")
RESERVED_COLUMNS = SAMPLE_ARGUMENTS + TRAINER_ARGUMENTS


def check_reward_columns(column_names, name: str) -> None:
    """Raise if a dataset column of `name` would collide with an argument reward functions are called with.

    Example:
        >>> check_reward_columns(["prompt", "completions"], "train_dataset")
        ValueError: train_dataset has a column named 'completions', ...
    """
    for column in column_names:
        if column in RESERVED_COLUMNS:
            raise ValueError(
                f"{name} has a column named {column!r}, which is also an argument reward functions are called with "
                f"({', '.join(RESERVED_COLUMNS)}): the two would collide, and the rewards be computed on the wrong "
                f"values. Rename the column, e.g. dataset.rename_column({column!r}, {column + '_column'!r})"
            )


def reward_func_name(func) -> str:
    """The name a reward source is logged under: the model's name for a reward model (last part of its path),
    else the function's __name__ (functools.partial unwrapped; a callable object's class name)."""
    if isinstance(func, torch.nn.Module):
        return getattr(func.config, "_name_or_path", "").split("/")[-1] or type(func).__name__
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", type(func).__name__)


def is_async_reward(func) -> bool:
    """Whether calling `func` returns a coroutine (async def functions, partials of them, async __call__)."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or (callable(func) and inspect.iscoroutinefunction(func.__call__))


def check_rewards(name: str, output, expected: int) -> list[float]:
    """A reward function's output as floats (NaN for None), or a clear error for a wrong length or a non-number."""
    if isinstance(output, torch.Tensor):
        output = output.tolist()
    if isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__"):
        raise TypeError(
            f"reward function {name!r} must return a list of {expected} floats (or None), got {type(output).__name__}"
        )
    if len(output) != expected:
        raise ValueError(
            f"reward function {name!r} returned {len(output)} rewards for {expected} completions: it must return one "
            "reward (or None) per completion"
        )
    rewards = []
    for i, value in enumerate(output):
        if value is None:
            rewards.append(math.nan)
        elif isinstance(value, numbers.Real) or _is_scalar_tensor(value):
            rewards.append(float(value))
        else:
            raise TypeError(
                f"reward function {name!r} returned {value!r} ({type(value).__name__}) for completion {i}: rewards "
                "must be numbers or None"
            )
    return rewards


def _is_scalar_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex()


def _call(name: str, func: Callable, kwargs: dict):
    try:
        return func(**kwargs)
    except Exception as err:
        raise RuntimeError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err


async def _gather_async(calls: list[tuple[str, Callable]], kwargs: dict):
    async def one(name, func):
        try:
            return await func(**kwargs)
        except Exception as err:
            raise RuntimeError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err

    return await asyncio.gather(*(one(name, func) for name, func in calls))


def _run_async(calls: list[tuple[str, Callable]], kwargs: dict) -> list:
    # A fresh event loop on a worker thread runs whether or not the caller is inside one (e.g. a notebook)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, _gather_async(calls, kwargs)).result()


def reward_model_scores(model, processing_class, texts: list[str], device) -> torch.Tensor:
    """Scores [B] of a sequence-classification reward model (logit 0) on full prompt + completion texts."""
    inputs = processing_class(
        text=texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False
    ).to(device)
    with torch.inference_mode():
        return model(**inputs).logits[:, 0].float()


def score_completions(
    reward_funcs: list,
    names: list[str],
    *,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict,
    model_scores: Callable[[int], torch.Tensor],
    device,
) -> torch.Tensor:
    """Rewards [B, R] float32 of B completions under R reward sources, NaN where a function returned None.

    Reward functions are called as f(prompts=, completions=, completion_ids=, **columns) (async ones concurrently);
    reward models (torch modules) are scored by `model_scores(i)`, i their index in reward_funcs. Errors name the
    function: a raising function, a wrong number of rewards, a value that is neither a number nor None, and a column
    named like one of SAMPLE_ARGUMENTS. Warns, naming the function, about infinite rewards, and about completions
    that no function scored (None or NaN from each).
    """
    check_reward_columns([column for column in columns if column in SAMPLE_ARGUMENTS], "the batch")
    B = len(prompts)
    rewards = torch.full((B, len(reward_funcs)), math.nan, dtype=torch.float32, device=device)
    kwargs = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids, **columns}
    pending = []
    for i, (func, name) in enumerate(zip(reward_funcs, names)):
        if isinstance(func, torch.nn.Module):
            rewards[:, i] = model_scores(i)
        elif is_async_reward(func):
            pending.append((i, name, func))
        else:
            rewards[:, i] = torch.tensor(check_rewards(name, _call(name, func, kwargs), B), device=device)
    if pending:
        outputs = _run_async([(name, func) for _, name, func in pending], kwargs)
        for (i, name, _), output in zip(pending, outputs):
            rewards[:, i] = torch.tensor(check_rewards(name, output, B), device=device)
    warn_unusable_rewards(rewards, names, prompts, completions)
    return rewards


def warn_unusable_rewards(rewards: torch.Tensor, names: list[str], prompts: list, completions: list) -> None:
    """Warn about the rewards [B, R] that give no advantage: an infinite reward (its group has no finite mean, so the
    advantages of the whole group are lost), and a completion that no function scored (None or NaN from each: it gets
    advantage 0 and is left out of the statistics). Each warning shows one such prompt and completion."""

    def example(row: int) -> str:
        return f"e.g. prompt {prompts[row]!r:.200}, completion {completions[row]!r:.200}"

    for i, name in enumerate(names):
        infinite = torch.isinf(rewards[:, i])
        if infinite.any():
            row = int(infinite.nonzero()[0])
            warnings.warn(
                f"reward function {name!r} returned an infinite reward ({rewards[row, i].item()}) for "
                f"{int(infinite.sum())} of {len(prompts)} completions ({example(row)}): each one's group has no finite "
                "mean reward, so the advantages of the whole group are lost; return finite rewards",
                stacklevel=3,
            )
    unscored = torch.isnan(rewards).all(dim=1)
    if unscored.any():
        warnings.warn(
            f"every reward function returned None or NaN for {int(unscored.sum())} of {len(prompts)} completions "
            f"({example(int(unscored.nonzero()[0]))}): they get advantage 0 and are left out of the reward statistics",
            stacklevel=3,
        )
