"""Preference data for reward modelling: EOS, chat templates, tokenization, the max_length filter and the collators.

A prepared row holds `chosen_ids` and `rejected_ids`: each the whole sequence the reward model scores (prompt +
completion), and optionally a `margin`. The collators turn a list of rows into one batch of 2B sequences, the B
chosen ones first, then the B rejected ones: padded on the right (`DataCollatorForPreference`, TRL's layout) or
packed into one row (`DataCollatorForPackedPreference`).
"""

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset

from .common import check_formats, drop_rows, first_row, pad, template_kwargs, tokenize_one, with_eos

REQUIRED_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("chosen_ids", "rejected_ids")
# Before TRL 1.0 the tokenized columns had these names (deprecated there, renamed here as TRL does)
LEGACY_COLUMNS = {"chosen_input_ids": "chosen_ids", "rejected_input_ids": "rejected_ids"}


def tokenize_pair(example: dict, tokenizer) -> dict[str, list[int]]:
    """Token ids of one row's chosen and rejected sequences: `chosen_ids`, `rejected_ids`.

    An explicit `prompt` is prepended to each completion. Text is tokenized as is (append the EOS first: see
    `prepare_reward_dataset`); conversations go through the chat template without a generation prompt, with the
    row's `tools` (a list, or its JSON) and `chat_template_kwargs`.

    Example:
        >>> tokenize_pair({"prompt": "2+2=", "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}, tokenizer)
        {'chosen_ids': [17, 10, 17, 28, 19, 258], 'rejected_ids': [17, 10, 17, 28, 20, 258]}
    """
    kwargs = template_kwargs(example)
    prompt = example.get("prompt")
    return {
        f"{key}_ids": tokenize_one(tokenizer, example[key] if prompt is None else prompt + example[key], kwargs)
        for key in REQUIRED_COLUMNS
    }


def _prepare_row(example: dict, index: int, tokenizer, dataset_name: str) -> dict[str, list[int]]:
    for key in REQUIRED_COLUMNS:
        if not example[key]:
            raise ValueError(f"{dataset_name} dataset row {index}: the {key!r} sequence is empty ({example[key]!r})")
    chat = check_formats(example, ("prompt", *REQUIRED_COLUMNS), index, dataset_name)
    if not chat:
        # the reward is read at the last token: every text sequence ends with the same one, as TRL appends it
        example = {**example, **{key: with_eos(example[key], tokenizer.eos_token) for key in REQUIRED_COLUMNS}}
    return tokenize_pair(example, tokenizer)


def prepare_reward_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    *,
    max_length: int | None = None,
    num_proc: int | None = None,
    dataset_name: str = "train",
) -> Dataset | IterableDataset:
    """Tokenize a preference dataset for reward modelling, as TRL 1.16's RewardTrainer does, adding `chosen_ids` and
    `rejected_ids` columns.

    Rows need `chosen` and `rejected` (text or conversations) and optionally `prompt` (without it, the prompt is
    implicit: part of both sequences) and `margin`. Text sequences get the tokenizer's EOS appended unless they end
    with it; conversations go through the chat template. A dataset that already has `chosen_ids` / `rejected_ids`
    (or TRL's legacy `chosen_input_ids` / `rejected_input_ids`, renamed with a FutureWarning) is only filtered. With
    max_length, pairs whose chosen or rejected sequence has more tokens are dropped (not truncated: the reward is read
    at the last token), with a warning that counts them.

    Raises ValueError for an empty dataset, a missing chosen/rejected column, an empty sequence or a None prompt, a row
    mixing text and chat messages (each naming the row), and a dataset left empty by max_length.

    Example:
        >>> ds = Dataset.from_dict({"chosen": ["2+2=4"], "rejected": ["2+2=5"]})
        >>> prepare_reward_dataset(ds, tokenizer, max_length=64)[0]["chosen_ids"]   # "2+2=4" + EOS
        [17, 10, 17, 28, 19, 258]
    """
    first = first_row(dataset, dataset_name)
    dataset, first = _rename_legacy_columns(dataset, first)
    is_map_style = isinstance(dataset, Dataset)
    map_kwargs = {"num_proc": num_proc} if is_map_style else {}
    if not all(key in first for key in TOKENIZED_COLUMNS):
        _check_columns(first, dataset_name)
        if is_map_style:
            map_kwargs["desc"] = f"Tokenizing the {dataset_name} dataset"
        fn_kwargs = {"tokenizer": tokenizer, "dataset_name": dataset_name}
        dataset = dataset.map(_prepare_row, with_indices=True, fn_kwargs=fn_kwargs, **map_kwargs)
    if max_length is None:
        return dataset
    return _drop_long_pairs(dataset, max_length, dataset_name, num_proc if is_map_style else None)


def _rename_legacy_columns(dataset, first: dict):
    if all(key in first for key in TOKENIZED_COLUMNS) or not all(key in first for key in LEGACY_COLUMNS):
        return dataset, first
    warnings.warn(
        "the dataset columns chosen_input_ids / rejected_input_ids are deprecated (as in TRL 1.16): rename them to "
        "chosen_ids / rejected_ids",
        FutureWarning,
        stacklevel=4,
    )
    for old, new in LEGACY_COLUMNS.items():
        dataset = dataset.rename_column(old, new)
    return dataset, next(iter(dataset))


def _check_columns(example: dict, dataset_name: str) -> None:
    missing = [key for key in REQUIRED_COLUMNS if key not in example]
    if missing:
        raise ValueError(
            f"the {dataset_name} dataset has no {' or '.join(repr(m) for m in missing)} column (found: "
            f"{', '.join(sorted(example))}); a reward dataset needs 'chosen' and 'rejected' (and optionally 'prompt' "
            "and 'margin'), or the tokenized 'chosen_ids' and 'rejected_ids'"
        )


def _drop_long_pairs(dataset, max_length: int, dataset_name: str, num_proc: int | None):
    return drop_rows(
        dataset, functools.partial(_fits, max_length=max_length), num_proc=num_proc,
        desc=f"Dropping pairs of the {dataset_name} dataset over {max_length} tokens",
        dropped=lambda count, total: (
            f"dropped {count} of {total} pairs of the {dataset_name} dataset whose chosen or rejected sequence has "
            f"more than max_length={max_length} tokens"
        ),
        dropped_row=lambda row: (
            f"dropped a pair of the {dataset_name} dataset with more than max_length={max_length} tokens in its chosen "
            "or rejected sequence"
        ),
        none_left=lambda total: (
            f"every pair of the {dataset_name} dataset ({total}) has a chosen or rejected sequence of more than "
            f"max_length={max_length} tokens, and such pairs are dropped: raise max_length or set it to None"
        ),
    )  # fmt: skip


def _fits(example: dict, max_length: int) -> bool:
    return len(example["chosen_ids"]) <= max_length and len(example["rejected_ids"]) <= max_length


def _sequences(examples: list[dict]) -> list[torch.Tensor]:
    """The 2B sequences of a batch, the chosen ones first."""
    return [torch.tensor(example[key], dtype=torch.long) for key in TOKENIZED_COLUMNS for example in examples]


def _margins(examples: list[dict]) -> dict[str, torch.Tensor]:
    if "margin" not in examples[0]:
        return {}
    margins = [example["margin"] for example in examples]
    if any(margin is None for margin in margins):
        raise ValueError(f"the 'margin' column holds None in this batch ({margins}): every pair needs a number")
    return {"margin": torch.tensor(margins, dtype=torch.float)}


@dataclass
class DataCollatorForPreference:
    """Pads a list of prepared rows into one batch of 2B sequences (chosen first), right-padded as TRL's collator.

    Returns input_ids [2B, T] int64 (pad_token_id after each sequence), attention_mask [2B, T] int64, and margin
    [B] float32 when the rows carry one. `return_tensors` is TRL's argument; only "pt" exists.

    Example:
        >>> collate = DataCollatorForPreference(pad_token_id=0)
        >>> collate([{"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5}])
        {'input_ids': tensor([[1, 2, 3], [4, 5, 0]]), 'attention_mask': tensor([[1, 1, 1], [1, 1, 0]]),
         'margin': tensor([0.5000])}
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.return_tensors != "pt":
            raise ValueError(f"return_tensors {self.return_tensors!r} is not supported: only 'pt'")

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = _sequences(examples)
        return {
            "input_ids": pad(sequences, self.pad_token_id, "right", self.pad_to_multiple_of),
            "attention_mask": pad([torch.ones_like(s) for s in sequences], 0, "right", self.pad_to_multiple_of),
            **_margins(examples),
        }


@dataclass
class DataCollatorForPackedPreference:
    """Packs the 2B sequences of a list of prepared rows (chosen first) into one row, without padding.

    position_ids restart at 0 for every sequence, which is what packing-aware attention uses to keep the sequences
    apart (see posttrain.models.attention). Returns input_ids and position_ids [1, L] int64, sequence_lengths [2B]
    int64 (each sequence's length in the row, in order), and margin [B] float32 when the rows carry one. With
    pad_to_multiple_of, the row ends with a segment of pad tokens (its own positions from 0) not counted in
    sequence_lengths.

    Example:
        >>> collate = DataCollatorForPackedPreference(pad_token_id=0)
        >>> collate([{"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5]}])["position_ids"]
        tensor([[0, 1, 2, 0, 1]])
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = _sequences(examples)
        lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
        total = int(lengths.sum())
        padding = (-total) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        filler = torch.full((padding,), self.pad_token_id, dtype=torch.long)
        positions = [torch.arange(n) for n in [*lengths.tolist(), *([padding] if padding else [])]]
        return {
            "input_ids": torch.cat([*sequences, filler])[None],
            "position_ids": torch.cat(positions)[None],
            "sequence_lengths": lengths,
            **_margins(examples),
        }


def score_positions(input_ids: torch.Tensor, sequence_lengths: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """Where each sequence of a packed row is scored: its rightmost token that is not `pad_token_id` (its first
    token if all are), the position a transformers sequence classifier reads in the padded layout.

    Args:
        input_ids: [1, L] int64, the packed row (sequences first, then any trailing padding).
        sequence_lengths: [N] int64, the lengths of the row's sequences, in order.
        pad_token_id: the model config's pad token id.

    Returns:
        [N] int64 positions in the row.

    Example:
        >>> score_positions(torch.tensor([[5, 6, 0, 7, 0, 0]]), torch.tensor([3, 1, 2]), pad_token_id=0)
        tensor([1, 3, 4])
    """
    starts = torch.cumsum(sequence_lengths, 0) - sequence_lengths
    segment = torch.repeat_interleave(torch.arange(len(sequence_lengths), device=input_ids.device), sequence_lengths)
    offsets = torch.arange(segment.numel(), device=input_ids.device) - starts[segment]
    keyed = offsets * (input_ids[0, : segment.numel()] != pad_token_id)
    last = torch.zeros_like(sequence_lengths).scatter_reduce(0, segment, keyed, reduce="amax")
    return starts + last
