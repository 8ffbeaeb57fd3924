"""Unpaired preference data for KTO: unpairing, labels, EOS, tokenization, the mismatched KL completions and the
collator.

A prepared row holds `prompt_ids`, `completion_ids` (token lists), `label` (bool: desirable) and, for the loss types
that estimate the KL term, `KL_completion_ids`: the completion of the previous row of its batch (the first row takes
the last one's), so that prompt + KL completion is a mismatched pair whose log-probs estimate KL(pi || pi_ref).
"""

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset, Value

from .common import check_formats, drop_fully_truncated, first_row, pad, tokenize_prompt_completions, with_eos
from .dpo import extract_prompt

REQUIRED_COLUMNS = ("prompt", "completion", "label")
PAIRED_COLUMNS = ("chosen", "rejected")
TOKENIZED_COLUMNS = ("prompt_ids", "completion_ids", "label")
KL_COLUMN = "KL_completion_ids"
REF_COLUMNS = ("ref_logps", "ref_KL_logps")


def unpair_preference_dataset(dataset: Dataset | IterableDataset, num_proc: int | None = None):
    """Paired preference data (`chosen`, `rejected`, optionally `prompt`) -> unpaired rows (`prompt`, `completion`,
    `label`), other columns copied to both halves.

    Rows are unpaired in blocks of 1000 (datasets' map batches), each block's chosen rows (label True) first, then its
    rejected rows in the same order: the order TRL 1.16 trains them in.

    Example:
        >>> ds = Dataset.from_dict({"prompt": ["2+2="], "chosen": ["4"], "rejected": ["5"]})
        >>> unpair_preference_dataset(ds)[:]
        {'prompt': ['2+2=', '2+2='], 'completion': ['4', '5'], 'label': [True, False]}
    """
    columns = dataset.column_names or list(next(iter(dataset)))
    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}
    return dataset.map(_unpair_rows, batched=True, remove_columns=columns, **map_kwargs)


def _unpair_rows(batch: dict[str, list]) -> dict[str, list]:
    size = len(batch["chosen"])
    rows = {"completion": batch["chosen"] + batch["rejected"], "label": [True] * size + [False] * size}
    rows.update({key: values + values for key, values in batch.items() if key not in PAIRED_COLUMNS})
    return rows


def tokenize_unpaired(example: dict, tokenizer) -> dict[str, list[int]]:
    """Token ids of one unpaired example: `prompt_ids` and `completion_ids`; the prompt is split off where its tokens
    and those of prompt + completion first differ (see `common.tokenize_prompt_completions`).

    Example:
        >>> tokenize_unpaired({"prompt": "2+2=", "completion": "4<|im_end|>"}, tokenizer)
        {'prompt_ids': [17, 10, 17, 28], 'completion_ids': [19, 258]}
    """
    return tokenize_prompt_completions(example, tokenizer, ("completion",))


def as_label(value, index: int, dataset_name: str) -> bool:
    """A row's label as a bool: True / False (0 / 1 integers accepted); anything else is a ValueError naming the row.

    Example:
        >>> as_label(1, 0, "train")
        True
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and value in (0, 1):
        return bool(value)
    raise ValueError(
        f"{dataset_name} dataset row {index}: 'label' must be a bool (True: desirable, False: undesirable), got "
        f"{value!r} ({type(value).__name__})"
    )


def _check_columns(example: dict, dataset_name: str) -> None:
    found = ", ".join(sorted(example))
    if "image" in example or "images" in example:
        raise NotImplementedError(
            "vision preference data (an 'image' / 'images' column) is not supported by posttrain's KTOTrainer yet; "
            "use TRL's KTOTrainer for vision-language models"
        )
    if all(key in example for key in PAIRED_COLUMNS) or all(key in example for key in TOKENIZED_COLUMNS):
        return
    paired = [key for key in PAIRED_COLUMNS if key in example]
    if paired:
        other = "rejected" if paired == ["chosen"] else "chosen"
        raise ValueError(
            f"the {dataset_name} dataset has a {paired[0]!r} column but no {other!r} column (found: {found}); paired "
            "preference data needs both"
        )
    missing = [key for key in REQUIRED_COLUMNS if key not in example]
    if missing:
        raise ValueError(
            f"the {dataset_name} dataset has no {' or '.join(map(repr, missing))} column (found: {found}); KTO needs "
            "unpaired data ('prompt', 'completion' and a bool 'label'), paired data ('chosen', 'rejected' and "
            "optionally 'prompt'), or the tokenized 'prompt_ids', 'completion_ids' and 'label'"
        )


def _prepare_row(example: dict, index: int, tokenizer, dataset_name: str) -> dict:
    label = as_label(example["label"], index, dataset_name)
    if not example["completion"]:
        raise ValueError(f"{dataset_name} dataset row {index}: the 'completion' is empty ({example['completion']!r})")
    chat = check_formats(example, ("prompt", "completion"), index, dataset_name)
    if not chat:
        example = {**example, "completion": with_eos(example["completion"], tokenizer.eos_token)}
    return {**tokenize_unpaired(example, tokenizer), "label": label}


def _label_row(example: dict, index: int, dataset_name: str) -> dict:
    return {"label": as_label(example["label"], index, dataset_name)}


def prepare_unpaired_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer,
    *,
    max_length: int | None = None,
    kl_batch_size: int | None = None,
    num_proc: int | None = None,
    dataset_name: str = "train",
) -> Dataset | IterableDataset:
    """Tokenize a KTO dataset as TRL 1.16's KTOTrainer does, adding prompt_ids / completion_ids (and
    KL_completion_ids) columns.

    Rows are unpaired (`prompt`, `completion`, bool `label`; text or conversations) or paired (`chosen`, `rejected`,
    optionally `prompt`: the shared prefix is split off, then each pair becomes a desirable and an undesirable row, see
    `unpair_preference_dataset`). Text completions get the tokenizer's EOS appended (unless they end with it);
    conversations go through the chat template. A dataset that already has prompt_ids, completion_ids and label is
    only checked, filtered and given its KL completions. With max_length, rows whose prompt alone has >= max_length
    tokens would keep no completion token: they are dropped with a warning that counts them.

    kl_batch_size: the per-device train batch size, for the loss types that estimate the KL term: within each block
    of that many rows, row i's KL completion is row i-1's (row 0 takes the block's last). None: no KL completions.

    Raises ValueError for missing columns, a label that is not a bool, an empty prompt or completion, a row mixing
    text and chat messages (each naming the row), and a dataset left empty by the drop.

    Example:
        >>> ds = Dataset.from_dict({"prompt": ["2+2=", "1+1="], "completion": ["4", "3"], "label": [True, False]})
        >>> prepare_unpaired_dataset(ds, tokenizer, kl_batch_size=2)[0]["KL_completion_ids"]   # "3" + EOS
        [18, 258]
    """
    is_map_style = isinstance(dataset, Dataset)
    map_kwargs = {"num_proc": num_proc} if is_map_style else {}
    first = first_row(dataset, dataset_name)
    _check_columns(first, dataset_name)
    if all(key in first for key in PAIRED_COLUMNS):
        if "prompt" not in first:
            dataset = dataset.map(extract_prompt, **map_kwargs)
        dataset = unpair_preference_dataset(dataset, num_proc=num_proc)
    if all(key in first for key in TOKENIZED_COLUMNS):
        prepare, fn_kwargs = _label_row, {"dataset_name": dataset_name}
    else:
        prepare, fn_kwargs = _prepare_row, {"dataset_name": dataset_name, "tokenizer": tokenizer}
    dataset = dataset.map(prepare, with_indices=True, fn_kwargs=fn_kwargs, **map_kwargs)
    if is_map_style and dataset.features["label"] != Value("bool"):
        dataset = dataset.cast_column("label", Value("bool"))  # 0 / 1 integers, checked row by row above
    if max_length is not None:
        dataset = drop_fully_truncated(dataset, max_length, dataset_name, num_proc if is_map_style else None)
    if kl_batch_size is not None:
        dataset = dataset.map(_add_kl_completions, batched=True, batch_size=kl_batch_size, **map_kwargs)
    return dataset


def _add_kl_completions(batch: dict[str, list]) -> dict[str, list]:
    completions = batch["completion_ids"]
    return {KL_COLUMN: completions[-1:] + completions[:-1]}


def warn_if_unbalanced(labels: list[bool], desirable_weight: float, undesirable_weight: float) -> None:
    """Warn when desirable and undesirable examples are unequal in number and neither weight lies in the range the
    KTO paper recommends (eq. 8): desirable_weight * n_desirable / (undesirable_weight * n_undesirable) in [1, 4/3]."""
    n_desirable = sum(labels)
    # at least 1 of each, as TRL counts them: a dataset of one kind gets a range to aim for too
    desirable = max(n_desirable, 1)
    undesirable = max(len(labels) - desirable, 1)
    if desirable == undesirable:
        return
    desirable_range = [round(undesirable * undesirable_weight / desirable * factor, 2) for factor in (1, 1.33)]
    undesirable_range = [round(desirable * desirable_weight / undesirable / factor, 2) for factor in (1.33, 1)]
    if not (
        desirable_range[0] <= desirable_weight <= desirable_range[1]
        or undesirable_range[0] <= undesirable_weight <= undesirable_range[1]
    ):
        warnings.warn(
            f"the train dataset has {n_desirable} desirable and {len(labels) - n_desirable} undesirable examples, and "
            f"neither weight balances them: set desirable_weight in {desirable_range} or undesirable_weight in "
            f"{undesirable_range} (one of them, not both)",
            stacklevel=3,
        )


@dataclass
class DataCollatorForUnpairedPreference:
    """Pads a list of prepared rows into one batch of B prompt + completion sequences, right-padded like TRL's.

    Each sequence is truncated to max_length (its end is cut) before padding. Returns input_ids, attention_mask and
    completion_mask [B, T] int64 (completion_mask: 1 on completion tokens), label [B] bool, the same three for the
    mismatched sequences (prompt + KL completion) as KL_input_ids, KL_attention_mask, KL_completion_mask [B, T'] when
    the rows carry KL_completion_ids, and ref_logps / ref_KL_logps [B] when they carry them.

    Example:
        >>> collate = DataCollatorForUnpairedPreference(pad_token_id=0)
        >>> collate([{"prompt_ids": [1, 2], "completion_ids": [3], "label": True},
        ...          {"prompt_ids": [4], "completion_ids": [5, 6], "label": False}])["completion_mask"]
        tensor([[0, 0, 1],
                [0, 1, 1]])
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self._padded(examples, "completion_ids", "")
        if KL_COLUMN in examples[0]:
            batch.update(self._padded(examples, KL_COLUMN, "KL_"))
        batch.update({key: torch.tensor([ex[key] for ex in examples]) for key in REF_COLUMNS if key in examples[0]})
        batch["label"] = torch.tensor([bool(ex["label"]) for ex in examples])
        return batch

    def _padded(self, examples: list[dict], completion_key: str, prefix: str) -> dict[str, torch.Tensor]:
        ids = [ex["prompt_ids"] + ex[completion_key] for ex in examples]
        masks = [[0] * len(ex["prompt_ids"]) + [1] * len(ex[completion_key]) for ex in examples]
        if self.max_length is not None:
            ids, masks = [seq[: self.max_length] for seq in ids], [m[: self.max_length] for m in masks]
        columns = {
            "input_ids": (ids, self.pad_token_id),
            "attention_mask": ([[1] * len(seq) for seq in ids], 0),
            "completion_mask": (masks, 0),
        }
        return {
            f"{prefix}{key}": pad(
                [torch.tensor(seq, dtype=torch.long) for seq in seqs], value, "right", self.pad_to_multiple_of
            )
            for key, (seqs, value) in columns.items()
        }
