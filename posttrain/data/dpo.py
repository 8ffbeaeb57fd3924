"""Preference data for DPO: prompt extraction, chat templates, EOS, tokenization, truncation and the collators.

A prepared row holds `prompt_ids`, `chosen_ids` and `rejected_ids` (token lists). The collators turn a list of rows
into one batch of 2B sequences, the B chosen ones (prompt + chosen) first, then the B rejected ones: padded
(`DataCollatorForPreference`, TRL's layout) or packed into a single row (`DataCollatorForPackedPreference`).
"""

import warnings
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, IterableDataset

from .common import check_formats, drop_fully_truncated, first_row, pad, tokenize_prompt_completions, with_eos

REQUIRED_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def extract_prompt(example: dict) -> dict:
    """Split the prompt shared by `chosen` and `rejected` (an implicit prompt) off both of them.

    The prompt is their longest common prefix (characters for text, whole messages for conversations); for text, a
    space just before the point where they differ goes with the completions. When one is a prefix of the other, the
    prompt stops one element short of the shorter one, so neither completion is empty (TRL's rule).

    Example:
        >>> extract_prompt({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"})
        {'prompt': 'Q: 2+2? A:', 'chosen': ' 4', 'rejected': ' 5'}
    """
    chosen, rejected = example["chosen"], example["rejected"]
    shortest = min(len(chosen), len(rejected))
    if shortest == 0:
        raise ValueError("cannot extract a prompt: 'chosen' or 'rejected' is empty")
    split = next((i for i in range(shortest) if chosen[i] != rejected[i]), shortest - 1)
    if 0 < split < shortest and chosen[split] != rejected[split] and chosen[split - 1] == " ":
        split -= 1
    return {"prompt": chosen[:split], "chosen": chosen[split:], "rejected": rejected[split:]}


def tokenize_preference(example: dict, tokenizer) -> dict[str, list[int]]:
    """Token ids of one example with an explicit prompt: `prompt_ids`, `chosen_ids`, `rejected_ids`; the prompt is
    split off both completions where its tokens and theirs first differ (see `common.tokenize_prompt_completions`).

    Example:
        >>> tokenize_preference({"prompt": "2+2=", "chosen": "4<|im_end|>", "rejected": "5<|im_end|>"}, tokenizer)
        {'prompt_ids': [17, 10, 17, 28], 'chosen_ids': [19, 258], 'rejected_ids': [20, 258]}
    """
    return tokenize_prompt_completions(example, tokenizer, REQUIRED_COLUMNS)


def _check_columns(example: dict, dataset_name: str) -> None:
    if all(key in example for key in TOKENIZED_COLUMNS):
        return
    missing = [key for key in REQUIRED_COLUMNS if key not in example]
    if missing:
        raise ValueError(
            f"the {dataset_name} dataset has no {' or '.join(repr(m) for m in missing)} column (found: "
            f"{', '.join(sorted(example))}); a preference dataset needs 'chosen' and 'rejected' (and optionally "
            "'prompt'), or the tokenized 'prompt_ids', 'chosen_ids' and 'rejected_ids'"
        )


def _prepare_row(example: dict, index: int, tokenizer, extract: bool, dataset_name: str):
    for key in REQUIRED_COLUMNS:
        if not example[key]:
            raise ValueError(f"{dataset_name} dataset row {index}: the {key!r} completion is empty ({example[key]!r})")
    chat = check_formats(example, ("prompt", *REQUIRED_COLUMNS), index, dataset_name)
    if extract:
        example = {**example, **extract_prompt(example)}
    if not chat:
        example = {**example, **{key: with_eos(example[key], tokenizer.eos_token) for key in REQUIRED_COLUMNS}}
    ids = tokenize_preference(example, tokenizer)
    for key in ("chosen_ids", "rejected_ids"):
        if not ids[key]:
            raise ValueError(
                f"{dataset_name} dataset row {index}: the tokenized {key[:-4]!r} completion is empty (the chat "
                "template renders prompt + completion no longer than the prompt alone)"
            )
    return ids


def prepare_preference_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    *,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    dataset_name: str = "train",
) -> Dataset | IterableDataset:
    """Tokenize a preference dataset for DPO, as TRL 1.16's DPOTrainer does, adding prompt_ids / chosen_ids /
    rejected_ids columns.

    Rows need `chosen` and `rejected` (text or conversations) and optionally `prompt`; without a `prompt` column the
    shared prefix is split off (`extract_prompt`). Text completions get the tokenizer's EOS appended (unless they end
    with it); conversations go through the chat template. A dataset that already has the three *_ids columns is only
    filtered. With max_length and truncation_mode="keep_start", rows whose prompt alone has >= max_length tokens would
    keep no completion token: they are dropped with a warning that counts them (the collators truncate the rest).
    Rows whose chosen and rejected completions are the same tokens are kept, with a warning that counts them.

    Raises ValueError for a missing chosen/rejected column, an empty completion or a None prompt, a row mixing text
    and chat messages (each naming the row), and a dataset left empty by the drop.

    Example:
        >>> ds = Dataset.from_dict({"prompt": ["2+2="], "chosen": ["4"], "rejected": ["5"]})
        >>> prepare_preference_dataset(ds, tokenizer, max_length=64)[0]["chosen_ids"]   # "4" + EOS
        [19, 258]
    """
    is_map_style = isinstance(dataset, Dataset)
    map_kwargs = {"num_proc": num_proc} if is_map_style else {}
    first = first_row(dataset, dataset_name)
    _check_columns(first, dataset_name)
    if not all(key in first for key in TOKENIZED_COLUMNS):
        fn_kwargs = {"tokenizer": tokenizer, "extract": "prompt" not in first, "dataset_name": dataset_name}
        if is_map_style:
            map_kwargs["desc"] = f"Tokenizing the {dataset_name} dataset"
        dataset = dataset.map(_prepare_row, with_indices=True, fn_kwargs=fn_kwargs, **map_kwargs)
    if max_length is not None and truncation_mode == "keep_start":
        dataset = drop_fully_truncated(dataset, max_length, dataset_name, num_proc if is_map_style else None)
    return _warn_identical_pairs(dataset, dataset_name)


def _warn_identical_pairs(dataset, dataset_name: str):
    """Warn about rows whose chosen and rejected completions are the same tokens: their loss is a constant (log 2 for
    sigmoid) with no gradient, so they dilute the batch and teach nothing."""
    if not isinstance(dataset, Dataset):
        return dataset.filter(_warn_if_identical, fn_kwargs={"dataset_name": dataset_name})
    table = dataset.with_format("arrow").select_columns(["chosen_ids", "rejected_ids"])[:]
    count = count_identical_lists(table["chosen_ids"], table["rejected_ids"])
    if count:
        warnings.warn(
            f"{count} of {len(dataset)} rows of the {dataset_name} dataset have the same chosen and rejected "
            "completion: they carry no preference (their loss is a constant with no gradient)",
            stacklevel=3,
        )
    return dataset


def _warn_if_identical(example: dict, dataset_name: str) -> bool:
    # A streamed dataset cannot be counted up front: a row warns as it streams by (shown once)
    if example["chosen_ids"] == example["rejected_ids"]:
        warnings.warn(
            f"a row of the {dataset_name} dataset has the same chosen and rejected completion: it carries no "
            "preference (its loss is a constant with no gradient)",
            stacklevel=2,
        )
    return True


def count_identical_lists(a: pa.ChunkedArray | pa.Array, b: pa.ChunkedArray | pa.Array) -> int:
    """How many rows of two list columns of the same length hold equal lists, computed in Arrow (no Python lists).

    Example:
        >>> count_identical_lists(pa.array([[1, 2], [3], []]), pa.array([[1, 2], [4], []]))
        2
    """
    if isinstance(a, pa.ChunkedArray):
        a, b = a.combine_chunks(), b.combine_chunks()
    same_length = pc.equal(pc.list_value_length(a), pc.list_value_length(b))
    a, b = pc.filter(a, same_length), pc.filter(b, same_length)
    # equal lengths row by row: the flattened values line up, and a row differs where one of its values does
    differs = pc.invert(pc.equal(pc.list_flatten(a), pc.list_flatten(b)))
    differing_rows = pc.count_distinct(pc.filter(pc.list_parent_indices(a), differs)).as_py()
    return len(a) - differing_rows


def _truncate(sequences: list[list[int]], max_length: int | None, truncation_mode: str) -> list[list[int]]:
    if max_length is None:
        return sequences
    if truncation_mode == "keep_start":
        return [seq[:max_length] for seq in sequences]
    if truncation_mode == "keep_end":
        return [seq[-max_length:] for seq in sequences]
    raise ValueError(f"truncation_mode {truncation_mode!r} is not one of: keep_start, keep_end")


def _sequences(examples: list[dict], max_length: int | None, truncation_mode: str):
    """The 2B token lists (chosen ones first) and their completion masks, truncated."""
    ids, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for example in examples:
            ids.append(example["prompt_ids"] + example[side])
            masks.append([0] * len(example["prompt_ids"]) + [1] * len(example[side]))
    return _truncate(ids, max_length, truncation_mode), _truncate(masks, max_length, truncation_mode)


def _ref_logps(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.tensor([example[key] for example in examples]) for key in REF_COLUMNS if key in examples[0]}


@dataclass
class _PreferenceCollator:
    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None


@dataclass
class DataCollatorForPreference(_PreferenceCollator):
    """Pads a list of prepared rows into one batch of 2B sequences (chosen first), right-padded like TRL's collator.

    Each sequence is prompt + completion, truncated to max_length (keep_start or keep_end) before padding. Returns
    input_ids [2B, T] int64, attention_mask [2B, T] int64, completion_mask [2B, T] int64 (1 on completion tokens),
    and ref_chosen_logps / ref_rejected_logps [B] when the rows carry them.

    Example:
        >>> collate = DataCollatorForPreference(pad_token_id=0)
        >>> collate([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}])["completion_mask"]
        tensor([[0, 0, 1, 0],
                [0, 0, 1, 1]])
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks = _sequences(examples, self.max_length, self.truncation_mode)
        padded = {
            "input_ids": (ids, self.pad_token_id),
            "attention_mask": ([[1] * len(seq) for seq in ids], 0),
            "completion_mask": (masks, 0),
        }
        batch = {
            key: pad([torch.tensor(seq, dtype=torch.long) for seq in seqs], value, "right", self.pad_to_multiple_of)
            for key, (seqs, value) in padded.items()
        }
        return {**batch, **_ref_logps(examples)}


@dataclass
class DataCollatorForPackedPreference(_PreferenceCollator):
    """Packs the 2B sequences of a list of prepared rows (chosen first) into one row, without padding.

    position_ids restart at 0 for every sequence, which is what packing-aware attention uses to keep the sequences
    apart (see posttrain.models.attention). Returns input_ids, position_ids and completion_mask [1, L] int64,
    sequence_lengths [2B] int64 (each sequence's length in the row, in order), and ref_chosen_logps /
    ref_rejected_logps [B] when the rows carry them. With pad_to_multiple_of, the row ends with a segment of padding
    tokens (its own positions from 0, no completion tokens) not counted in sequence_lengths.

    Example:
        >>> collate = DataCollatorForPackedPreference(pad_token_id=0)
        >>> collate([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}])["position_ids"]
        tensor([[0, 1, 2, 0, 1, 2, 3]])
    """

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids, masks = _sequences(examples, self.max_length, self.truncation_mode)
        lengths = [len(seq) for seq in ids]
        total = sum(lengths)
        padding = (-total) % self.pad_to_multiple_of if self.pad_to_multiple_of else 0
        flat_ids = [token for seq in ids for token in seq] + [self.pad_token_id] * padding
        flat_mask = [flag for mask in masks for flag in mask] + [0] * padding
        positions = [pos for length in lengths + ([padding] if padding else []) for pos in range(length)]
        batch = {
            "input_ids": torch.tensor([flat_ids], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "completion_mask": torch.tensor([flat_mask], dtype=torch.long),
            "sequence_lengths": torch.tensor(lengths, dtype=torch.long),
        }
        return {**batch, **_ref_logps(examples)}
