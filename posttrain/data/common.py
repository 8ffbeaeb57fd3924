"""Dataset helpers shared by the trainers: formats, chat-template tokenization, the prompt / completion split,
row filters that report what they drop, and padding."""

import functools
import json
import warnings
from collections.abc import Callable

import torch
from datasets import Dataset
from transformers.utils import logging

logger = logging.get_logger(__name__)

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


def first_row(dataset, dataset_name: str) -> dict:
    """The first row of a Dataset or IterableDataset; a ValueError naming the dataset when it is empty.

    Example:
        >>> first_row(Dataset.from_dict({"chosen": [], "rejected": []}), "eval")
        ValueError: the eval dataset is empty
    """
    first = next(iter(dataset), None)
    if first is None:
        raise ValueError(f"the {dataset_name} dataset is empty")
    return first


def check_formats(example: dict, keys: tuple[str, ...], index: int, dataset_name: str) -> bool:
    """Whether row `index` holds chat messages under `keys` (those it has); a ValueError naming the row when its
    'prompt' is None, or when some of those columns are chat messages and others text (a plain prompt cannot be
    followed by chat-message completions, nor the other way round).

    Example:
        >>> check_formats({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, ("prompt", "chosen", "rejected"), 0, "train")
        False
    """
    if "prompt" in example and example["prompt"] is None:
        raise ValueError(f"{dataset_name} dataset row {index}: the 'prompt' is None")
    present = [key for key in keys if key in example]
    chat = conversation_keys(example, present)
    if chat and len(chat) < len(present):
        text = [key for key in present if key not in chat]
        raise ValueError(
            f"{dataset_name} dataset row {index}: {', '.join(map(repr, chat))} "
            f"{'is a list' if len(chat) == 1 else 'are lists'} of chat messages but {', '.join(map(repr, text))} "
            f"{'is' if len(text) == 1 else 'are'} {type(example[text[0]]).__name__}: the formats must match (all text, "
            "or all chat messages)"
        )
    return bool(chat)


def with_eos(text: str, eos_token: str | None) -> str:
    """`text` ending with `eos_token` (appended unless it is already there, or there is none).

    Example:
        >>> with_eos("4", "<|im_end|>"), with_eos("4<|im_end|>", "<|im_end|>")
        ('4<|im_end|>', '4<|im_end|>')
    """
    return text if eos_token is None or text.endswith(eos_token) else text + eos_token


def template_kwargs(example: dict) -> dict | None:
    """The chat template's keyword arguments for a conversational row (its `tools`, a list or its JSON, and its
    `chat_template_kwargs` dict), or None for a text row (tokenized without a template).

    Example:
        >>> template_kwargs({"prompt": [{"role": "user", "content": "hi"}], "completion": [...], "tools": "[]"})
        {'tools': []}
    """
    if not is_conversational(example):
        return None
    tools = example.get("tools")
    kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools}
    kwargs.update(example.get("chat_template_kwargs") or {})
    return kwargs


def tokenize_one(tokenizer, value, kwargs: dict | None, add_generation_prompt: bool = False) -> list[int]:
    """Token ids of a text (`kwargs` None: the tokenizer alone) or of chat messages (the chat template, with `kwargs`
    from `template_kwargs`), with no special tokens beyond what the template writes.

    Example:
        >>> tokenize_one(tokenizer, "2+2=", None)
        [17, 10, 17, 28]
    """
    if kwargs is None:
        return list(tokenizer(text=value)["input_ids"])
    encoded = tokenizer.apply_chat_template(
        value, tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt, **kwargs
    )
    return list(encoded["input_ids"])


def tokenize_prompt_completions(example: dict, tokenizer, completion_keys: tuple[str, ...]) -> dict[str, list[int]]:
    """Token ids of one row with an explicit prompt and one or more completions: `prompt_ids` and `<key>_ids` for each
    key of `completion_keys`.

    Conversations go through the chat template (the prompt with the generation prompt; `tools` and
    `chat_template_kwargs` columns are honoured), text through the tokenizer. The completions start where the
    tokenized prompt and the tokenized prompt + completions first differ, which is after the prompt unless the
    template renders the prompt alone differently or tokens merge across the boundary (a warning, shown once, then
    shows the prompt tokens left out).

    Example:
        >>> tokenize_prompt_completions({"prompt": "2+2=", "completion": "4"}, tokenizer, ("completion",))
        {'prompt_ids': [17, 10, 17, 28], 'completion_ids': [19]}
    """
    kwargs = template_kwargs(example)
    prompt = example["prompt"]
    prompt_ids = tokenize_one(tokenizer, prompt, kwargs, add_generation_prompt=True)
    full = {key: tokenize_one(tokenizer, prompt + example[key], kwargs) for key in completion_keys}
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full.values())
    if prompt_len < len(prompt_ids):
        logger.warning_once(
            "The tokenized prompt is not a prefix of the tokenized prompt + completion (the chat template renders the "
            "prompt alone differently, or tokens merge across the boundary). The completion starts where they differ "
            f"and these prompt tokens are left out of the training sequence: {tokenizer.decode(prompt_ids[prompt_len:])!r}"
            ". Shown once; it likely applies to every example."
        )
    return {"prompt_ids": prompt_ids[:prompt_len], **{f"{key}_ids": ids[prompt_len:] for key, ids in full.items()}}


def drop_rows(
    dataset,
    keep: Callable[[dict], bool],
    *,
    num_proc: int | None = None,
    desc: str,
    dropped: Callable[[int, int], str],
    dropped_row: Callable[[dict], str],
    none_left: Callable[[int], str],
):
    """`dataset` without the rows for which `keep(row)` is False, telling the user what went.

    A Dataset is filtered at once (`num_proc` processes, progress bar `desc`): a UserWarning `dropped(count, total)`
    counts the rows dropped, and a ValueError `none_left(total)` is raised when no row is left. An IterableDataset
    cannot be counted up front: each row dropped warns `dropped_row(row)` as it streams by. `keep` is pickled for
    num_proc > 1: a module-level function (or a functools.partial of one).

    Example:
        >>> drop_rows(Dataset.from_dict({"x": [1, 20]}), lambda row: row["x"] < 10, desc="Dropping long rows",
        ...           dropped=lambda n, total: f"dropped {n} of {total} rows", dropped_row=lambda row: "dropped a row",
        ...           none_left=lambda total: f"all {total} rows are too long")["x"]     # warns "dropped 1 of 2 rows"
        [1]
    """
    if not isinstance(dataset, Dataset):
        return dataset.filter(_keep_or_warn, fn_kwargs={"keep": keep, "message": dropped_row})
    total = len(dataset)
    dataset = dataset.filter(keep, num_proc=num_proc, desc=desc)
    count = total - len(dataset)
    if count == total:
        raise ValueError(none_left(total))
    if count:
        warnings.warn(dropped(count, total), stacklevel=4)  # the caller of the prepare_* function
    return dataset


def drop_fully_truncated(dataset, max_length: int, dataset_name: str, num_proc: int | None = None):
    """`dataset` (with a `prompt_ids` column) without the rows whose prompt has at least `max_length` tokens, which
    truncation (keep_start) would leave with no completion token; see `drop_rows` for the warnings and the
    error when none is left.

    Example:
        >>> drop_fully_truncated(Dataset.from_dict({"prompt_ids": [[1], [1, 2, 3]]}), 2, "train")["prompt_ids"]
        [[1]]
    """
    return drop_rows(
        dataset, functools.partial(_keeps_completion, max_length=max_length), num_proc=num_proc,
        desc=f"Dropping fully truncated rows of the {dataset_name} dataset",
        dropped=lambda count, total: (
            f"dropped {count} of {total} rows of the {dataset_name} dataset whose prompt has at least "
            f"max_length={max_length} tokens: truncation (keep_start) would leave them no completion token"
        ),
        dropped_row=lambda row: (
            f"dropped a row of the {dataset_name} dataset whose prompt has {len(row['prompt_ids'])} >= "
            f"max_length={max_length} tokens (truncation would leave it no completion token)"
        ),
        none_left=lambda total: (
            f"every row of the {dataset_name} dataset ({total}) has a prompt of at least max_length={max_length} "
            "tokens, so truncation would leave no completion token: raise max_length or shorten the prompts"
        ),
    )  # fmt: skip


def _keeps_completion(example: dict, max_length: int) -> bool:
    return len(example["prompt_ids"]) < max_length


def _keep_or_warn(example: dict, keep: Callable[[dict], bool], message: Callable[[dict], str]) -> bool:
    if keep(example):
        return True
    warnings.warn(message(example), stacklevel=2)
    return False


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
