"""Dataset helpers shared by the trainers."""

import torch

CONVERSATIONAL_KEYS = ("prompt", "chosen", "rejected", "completion", "messages")


def is_conversational(example: dict) -> bool:
    """Whether `example` holds chat messages (lists of {"role", "content"} dicts) under one of the known keys.

    Example:
        >>> is_conversational({"prompt": [{"role": "user", "content": "2+2?"}], "completion": [...]})
        True
        >>> is_conversational({"text": "2+2=4"})
        False
    """
    return bool(conversation_keys(example, CONVERSATIONAL_KEYS))


def conversation_keys(example: dict, keys) -> list[str]:
    """The keys among `keys` (in their order) under which `example` holds chat messages.

    Example:
        >>> conversation_keys({"prompt": "2+2=", "chosen": [{"role": "assistant", "content": "4"}]}, ("prompt", "chosen"))
        ['chosen']
    """
    return [key for key in keys if _is_messages(example.get(key))]


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def pad(
    sequences: list[torch.Tensor],
    padding_value: int | float,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = None,
) -> torch.Tensor:
    """Stack 1-D tensors of different lengths into [len(sequences), max_len], padding on `padding_side`.

    Example:
        >>> pad([torch.tensor([1, 2, 3]), torch.tensor([4])], padding_value=0, padding_side="left")
        tensor([[1, 2, 3],
                [0, 0, 4]])
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side {padding_side!r} is not one of: left, right")
    length = max(len(s) for s in sequences)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    out = sequences[0].new_full((len(sequences), length), padding_value)
    for row, seq in zip(out, sequences):
        if padding_side == "right":
            row[: len(seq)] = seq
        else:
            row[length - len(seq) :] = seq
    return out


def common_prefix_length(a: list, b: list) -> int:
    """How many leading items `a` and `b` share.

    Example:
        >>> common_prefix_length([1, 2, 3, 4], [1, 2, 9])
        2
    """
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
