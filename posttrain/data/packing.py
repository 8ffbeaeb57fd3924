"""Packing tokenized sequences into fixed-length rows, and the language-modeling collators (padded / padding-free).

Packing strategies (the same rows, in the same order, as TRL 1.16's `pack_dataset`):

- "bfd": best-fit decreasing. Sequences are truncated to `seq_length`, sorted longest first (ties keep dataset
  order), and each goes into the open row with the least room that still fits it (the oldest such row on ties), or
  into a new row. Rows keep their sequences whole and record them in a "seq_lengths" column.
- "bfd_split": as "bfd", but a sequence longer than `seq_length` is cut into `seq_length`-long pieces (the last one
  shorter), each packed as a sequence of its own, so no token is dropped.
- "wrapped": all sequences concatenated and cut every `seq_length` tokens, boundaries ignored (no "seq_lengths").

Like TRL, packing runs per `Dataset.map` batch (1000 rows unless `map_kwargs` says otherwise).
"""

import bisect
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .common import pad

STRATEGIES = ("bfd", "bfd_split", "wrapped")


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Assign sequences of the given lengths (each 1..capacity) to rows of `capacity` tokens, best fit decreasing.

    Returns the rows in the order they were opened, each the list of the indices of its sequences, in the order they
    were placed.

    Example:
        >>> best_fit_decreasing(np.array([3, 1, 4, 2]), capacity=4)
        [[2], [0, 1], [3]]
    """
    free_amounts = []  # sorted distinct amounts of room that at least one open row has
    rows_by_room = defaultdict(deque)  # room -> open rows with that room, oldest first
    rows = []
    for index in np.argsort(-np.asarray(lengths), kind="stable"):
        length = int(lengths[index])
        position = bisect.bisect_left(free_amounts, length)
        if position < len(free_amounts):
            room = free_amounts[position]
            row = rows_by_room[room].popleft()
            if not rows_by_room[room]:
                del free_amounts[position]
        else:
            room, row = capacity, len(rows)
            rows.append([])
        rows[row].append(int(index))
        left = room - length
        if left > 0:
            if not rows_by_room[left]:
                bisect.insort(free_amounts, left)
            rows_by_room[left].append(row)
    return rows


def pack_dataset(dataset, seq_length: int, strategy: str = "bfd", map_kwargs: dict | None = None):
    """Pack the list columns of `dataset` (e.g. input_ids and labels, of equal lengths per row) into rows of at most
    `seq_length` tokens with `strategy` ("bfd", "bfd_split" or "wrapped"; see the module docstring).

    Works on `datasets.Dataset` and `IterableDataset`; the dataset's format is kept. bfd strategies add a
    "seq_lengths" column: the lengths of the sequences in each row.

    Example:
        >>> ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4], [5, 6, 7, 8, 9]]})
        >>> pack_dataset(ds, 4, "bfd")[:]
        {'input_ids': [[5, 6, 7, 8], [1, 2, 3, 4]], 'seq_lengths': [[4], [3, 1]]}
        >>> pack_dataset(ds, 4, "wrapped")[:]
        {'input_ids': [[1, 2, 3, 4], [5, 6, 7, 8], [9]]}
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"packing_strategy {strategy!r} is not one of: {', '.join(STRATEGIES)}")
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ValueError(f"max_length must be a positive integer to pack, got {seq_length!r}")
    format_kwargs = _format_of(dataset)
    if strategy == "wrapped":
        fn, fn_kwargs = _pack_wrapped, {"seq_length": seq_length}
    else:
        fn, fn_kwargs = _pack_bfd, {"seq_length": seq_length, "split": strategy == "bfd_split"}
    packed = dataset.with_format("arrow").map(fn, batched=True, fn_kwargs=fn_kwargs, **(map_kwargs or {}))
    if strategy != "wrapped" and format_kwargs.get("columns"):
        format_kwargs["columns"] = [*format_kwargs["columns"], "seq_lengths"]
    return packed.with_format(**format_kwargs)


def _format_of(dataset) -> dict[str, Any]:
    if hasattr(dataset, "format"):
        fmt = dict(dataset.format)
        return {
            "type": fmt["type"],
            "columns": fmt["columns"],
            "output_all_columns": fmt["output_all_columns"],
            **fmt["format_kwargs"],
        }
    formatting = getattr(dataset, "_formatting", None)
    return {"type": formatting.format_type if formatting is not None else None}


def _list_columns(table: pa.Table) -> list[pa.Array]:
    columns = [column.combine_chunks() for column in table.columns]
    for name, column in zip(table.column_names, columns):
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
            raise TypeError(f"packing needs every column to hold a list per row; column {name!r} is {column.type}")
    lengths = pc.list_value_length(columns[0])
    for name, column in zip(table.column_names[1:], columns[1:]):
        if not pc.all(pc.equal(pc.list_value_length(column), lengths)).as_py():
            raise ValueError(f"column {name!r} has rows of other lengths than {table.column_names[0]!r}: cannot pack")
    return columns


def _rows(values: pa.Array, lengths: np.ndarray, like: pa.Array) -> pa.Array:
    offset_type = np.int64 if pa.types.is_large_list(like.type) else np.int32
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(offset_type)
    return type(like).from_arrays(pa.array(offsets), values)


def _split_lengths(lengths: np.ndarray, seq_length: int) -> np.ndarray:
    pieces = -(-lengths // seq_length)
    out = np.full(int(pieces.sum()), seq_length, dtype=np.int64)
    out[np.cumsum(pieces) - 1] = lengths - (pieces - 1) * seq_length
    return out


def _pack_bfd(table: pa.Table, seq_length: int, split: bool) -> pa.Table:
    columns = _list_columns(table)
    non_empty = pc.greater(pc.list_value_length(columns[0]), 0)
    columns = [column.filter(non_empty) for column in columns]
    if split:
        lengths = _split_lengths(pc.list_value_length(columns[0]).to_numpy(), seq_length)
        columns = [_rows(column.flatten(), lengths, column) for column in columns]
    else:
        columns = [pc.list_slice(column, 0, seq_length) for column in columns]
        lengths = pc.list_value_length(columns[0]).to_numpy().astype(np.int64)
    rows = best_fit_decreasing(lengths, seq_length)
    order = np.array([index for row in rows for index in row], dtype=np.int64)
    row_lengths = np.array([lengths[row].sum() for row in rows], dtype=np.int64)
    packed = [_rows(pc.take(column, order).flatten(), row_lengths, column) for column in columns]
    counts = np.array([len(row) for row in rows], dtype=np.int64)
    seq_lengths = _rows(pa.array(lengths[order]), counts, pa.array([], type=pa.list_(pa.int64())))
    return pa.Table.from_arrays([*packed, seq_lengths], names=[*table.column_names, "seq_lengths"])


def _pack_wrapped(table: pa.Table, seq_length: int) -> pa.Table:
    columns = _list_columns(table)
    total = len(columns[0].flatten())
    lengths = np.full(total // seq_length, seq_length, dtype=np.int64)
    if total % seq_length:
        lengths = np.append(lengths, total % seq_length)
    packed = [_rows(column.flatten(), lengths, column) for column in columns]
    return pa.Table.from_arrays(packed, names=table.column_names)


def position_ids_from_lengths(seq_lengths: list[int]) -> torch.Tensor:
    """Positions restarting at 0 for each sequence of a packed row: [2, 3] -> tensor([0, 1, 0, 1, 2])."""
    lengths = torch.as_tensor(seq_lengths, dtype=torch.long)
    starts = torch.cumsum(lengths, 0) - lengths
    return torch.arange(int(lengths.sum())) - torch.repeat_interleave(starts, lengths)


@dataclass
class DataCollatorForLanguageModeling:
    """Batches tokenized examples ({"input_ids", optional "labels", optional "seq_lengths"}) for causal LM training.

    Labels default to the input ids; -100 marks tokens out of the loss.

    Padded (padding_free=False): right-padded "input_ids" [B, T] (pad_token_id), "labels" [B, T] (-100) and
    "attention_mask" [B, T], T the longest example (rounded up to pad_to_multiple_of).

    Padding-free (padding_free=True, or any example that is a packed row of several sequences): all examples
    concatenated into one row: "input_ids" and "labels" [1, N], "position_ids" [1, N] restarting at 0 at each sequence
    (each example, or each entry of its "seq_lengths"), no attention_mask, each sequence's first label set to -100 (it
    is not predicted from the previous sequence), and the sequence bounds for varlen attention kernels:
    "cu_seq_lens_q"/"cu_seq_lens_k" (int32 [S + 1]), "max_length_q"/"max_length_k" (int) and "seq_idx" (int32 [1, N]).

    Example:
        >>> collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
        >>> collate([{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])["position_ids"]
        tensor([[0, 1, 2, 0, 1]])
    """

    pad_token_id: int
    padding_free: bool = False
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.return_tensors != "pt":
            raise ValueError(f"return_tensors {self.return_tensors!r} is not supported; only 'pt' is")
        input_ids = [torch.as_tensor(example["input_ids"], dtype=torch.long) for example in examples]
        labels = [
            torch.as_tensor(example["labels"], dtype=torch.long) if "labels" in example else ids.clone()
            for example, ids in zip(examples, input_ids)
        ]
        seq_lengths = [
            torch.as_tensor(example["seq_lengths"]).tolist() if "seq_lengths" in example else [len(ids)]
            for example, ids in zip(examples, input_ids)
        ]
        if self.padding_free or any(len(lengths) > 1 for lengths in seq_lengths):
            return self._flat(input_ids, labels, [n for lengths in seq_lengths for n in lengths])
        return self._padded(input_ids, labels)

    def _padded(self, input_ids, labels) -> dict[str, torch.Tensor]:
        masks = [torch.ones_like(ids) for ids in input_ids]
        return {
            "input_ids": pad(input_ids, self.pad_token_id, "right", self.pad_to_multiple_of),
            "labels": pad(labels, -100, "right", self.pad_to_multiple_of),
            "attention_mask": pad(masks, 0, "right", self.pad_to_multiple_of),
        }

    def _flat(self, input_ids, labels, seq_lengths) -> dict[str, Any]:
        position_ids = pad([position_ids_from_lengths(seq_lengths)], 0, "right", self.pad_to_multiple_of)
        out = {
            "input_ids": pad([torch.cat(input_ids)], self.pad_token_id, "right", self.pad_to_multiple_of),
            "labels": pad([torch.cat(labels)], -100, "right", self.pad_to_multiple_of),
            "position_ids": position_ids,
        }
        out["labels"][position_ids == 0] = -100
        # Computed here on the CPU: a varlen kernel deriving them from position_ids would sync the device per layer
        starts = (position_ids[0] == 0).nonzero().flatten()
        cu_seq_lens = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])]).to(torch.int32)
        out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = cu_seq_lens
        out["max_length_q"] = out["max_length_k"] = int(cu_seq_lens.diff().max())
        out["seq_idx"] = torch.repeat_interleave(
            torch.arange(len(cu_seq_lens) - 1, dtype=torch.int32), cu_seq_lens.diff()
        )[None]
        return out
