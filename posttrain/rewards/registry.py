"""Reward functions by name: the built-in ones, or any function given as a dotted import path."""

import importlib
import inspect
from collections.abc import Callable

from .accuracy import accuracy_reward
from .format import think_format_reward
from .length import get_soft_overlong_punishment

REWARD_FUNCS: dict[str, Callable] = {
    "accuracy_reward": accuracy_reward,
    "think_format_reward": think_format_reward,
}
# Names that build a reward function from options (e.g. the length budget)
REWARD_FACTORIES: dict[str, Callable[..., Callable]] = {
    "soft_overlong_punishment": get_soft_overlong_punishment,
}


def _import_dotted(path: str) -> Callable | None:
    module_name, _, attribute = path.rpartition(".")
    if not module_name or not all(part.isidentifier() for part in path.split(".")):
        return None
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    func = getattr(module, attribute, None)
    return func if callable(func) else None


def resolve_reward_func(spec: str, **factory_kwargs) -> Callable | None:
    """The reward function `spec` names, or None when it names none (GRPOTrainer then loads `spec` as a reward model).

    A registered name ("accuracy_reward", "think_format_reward"), a factory name ("soft_overlong_punishment", built
    with the factory_kwargs it accepts), or a dotted import path ("my_package.rewards.my_reward").
    """
    if spec in REWARD_FUNCS:
        return REWARD_FUNCS[spec]
    if spec in REWARD_FACTORIES:
        factory = REWARD_FACTORIES[spec]
        params = inspect.signature(factory).parameters
        missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in factory_kwargs]
        if missing:
            raise ValueError(f"reward function {spec!r} is built from options; missing: {', '.join(missing)}")
        return factory(**{k: v for k, v in factory_kwargs.items() if k in params})
    return _import_dotted(spec)


def get_reward_func(spec: str, **factory_kwargs) -> Callable:
    """The reward function named by `spec`: a built-in name, a factory name, or a dotted import path.

    Args:
        spec: "accuracy_reward", "think_format_reward", "soft_overlong_punishment" (needs max_completion_len), or
            "package.module.function".
        factory_kwargs: options for factory names, e.g. max_completion_len=512, soft_punish_cache=128 (options a
            factory does not take are ignored, so callers may pass a common set).

    Returns:
        A callable with the reward-function signature `f(prompts, completions, completion_ids, **columns)`.

    Example:
        >>> get_reward_func("accuracy_reward")
        <function accuracy_reward ...>
        >>> get_reward_func("soft_overlong_punishment", max_completion_len=250)(completion_ids=[[1] * 225])
        [-0.5]
    """
    if not isinstance(spec, str):
        raise TypeError(f"a reward function name must be a string, got {type(spec).__name__}")
    func = resolve_reward_func(spec, **factory_kwargs)
    if func is None:
        names = ", ".join([*REWARD_FUNCS, *REWARD_FACTORIES])
        raise ValueError(f"reward function {spec!r} is neither one of: {names}, nor an importable dotted path")
    return func
