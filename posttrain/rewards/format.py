"""think_format_reward: does the completion open with one <think> ... </think> reasoning block."""

from ._text import completion_text

OPEN, CLOSE = "<think>", "</think>"


def _has_think_block(text: str) -> bool:
    if not text.startswith(OPEN):
        return False
    rest = text[len(OPEN) :]
    return OPEN not in rest and CLOSE in rest


def think_format_reward(completions: list, **kwargs) -> list[float]:
    """1.0 for a completion that starts with "<think>", closes it with "</think>" and opens no second "<think>";
    0.0 otherwise. Other keyword arguments (the dataset's columns, passed by GRPOTrainer) are ignored.

    Args:
        completions: B completions, each a string or a list of one assistant message {"role", "content"}.

    Returns:
        A list of B floats, 1.0 or 0.0.

    Example:
        >>> think_format_reward(["<think>\\n2+2 is 4\\n</think>\\n4", "4 <think>late</think>"])
        [1.0, 0.0]
    """
    return [1.0 if _has_think_block(completion_text(c)) else 0.0 for c in completions]
