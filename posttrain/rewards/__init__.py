"""Reward functions for GRPOTrainer, with TRL's signature: f(prompts, completions, completion_ids, **columns).

Example:
    >>> from posttrain.rewards import accuracy_reward, think_format_reward, get_soft_overlong_punishment
    >>> get_reward_func("accuracy_reward") is accuracy_reward   # by name, as the CLI names them
    True
"""

from .accuracy import accuracy_reward
from .format import think_format_reward
from .length import SoftOverlongPunishment, get_soft_overlong_punishment
from .registry import REWARD_FACTORIES, REWARD_FUNCS, get_reward_func, resolve_reward_func

__all__ = [
    "REWARD_FACTORIES",
    "REWARD_FUNCS",
    "SoftOverlongPunishment",
    "accuracy_reward",
    "get_reward_func",
    "get_soft_overlong_punishment",
    "resolve_reward_func",
    "think_format_reward",
]
