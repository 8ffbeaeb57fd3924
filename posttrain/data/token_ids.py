"""Token ids a model can embed: the check that a prepared dataset fits the model's vocabulary, before any forward."""

import pyarrow.compute as pc
from datasets import Dataset


def check_token_ids(dataset, vocab_size: int, name: str = "train", columns: tuple[str, ...] = ("input_ids",)):
    """`dataset`, once every token id in `columns` is known to be in [0, vocab_size), the rows of the model's input
    embedding. An id outside it would fail inside the model's forward (on CUDA, as a device-side assert that ends the
    process); here a ValueError names the dataset, the row, the column and the id.

    A Dataset is checked now, in Arrow (no Python loop over its rows); an IterableDataset is returned wrapped, each
    row checked as it streams by. Columns the dataset lacks are skipped.

    Args:
        dataset: a prepared (tokenized) Dataset or IterableDataset.
        vocab_size: the model's embedding rows, `model.get_input_embeddings().num_embeddings`.
        name: the dataset's name in the error ("train", "eval", ...).
        columns: the token-id columns (lists of int), e.g. ("prompt_ids", "chosen_ids", "rejected_ids") for DPO.

    Example:
        >>> check_token_ids(Dataset.from_dict({"input_ids": [[5, 300]]}), vocab_size=259)
        ValueError: train dataset row 0: 'input_ids' holds token id 300, outside the model's vocabulary [0, 259) ...
    """
    if not isinstance(dataset, Dataset):
        options = {"vocab_size": vocab_size, "name": name, "columns": columns}
        return dataset.map(_check_row, with_indices=True, fn_kwargs=options)
    for column in columns:
        if column in dataset.column_names:
            _check_column(dataset.with_format("arrow")[column], vocab_size, name, column)
    return dataset


def _check_column(values, vocab_size: int, name: str, column: str) -> None:
    offset = 0
    for chunk in values.chunks:
        ids = pc.list_flatten(chunk)
        bad = pc.or_(pc.less(ids, 0), pc.greater_equal(ids, vocab_size))
        first = pc.index(bad, True).as_py() if len(ids) else -1
        if first >= 0:
            row = offset + pc.list_parent_indices(chunk)[first].as_py()
            raise ValueError(_message(name, row, column, ids[first].as_py(), vocab_size))
        offset += len(chunk)


def _check_row(example: dict, index: int, vocab_size: int, name: str, columns) -> dict:
    for column in columns:
        bad = [token for token in example.get(column) or () if not 0 <= token < vocab_size]
        if bad:
            raise ValueError(_message(name, index, column, bad[0], vocab_size))
    return example


def _message(name: str, row: int, column: str, token_id: int, vocab_size: int) -> str:
    return (
        f"{name} dataset row {row}: {column!r} holds token id {token_id}, outside the model's vocabulary [0, "
        f"{vocab_size}) (the rows of its input embedding): tokenize with the model's own tokenizer, or resize the "
        "embeddings to the tokenizer (model.resize_token_embeddings(len(tokenizer)))"
    )
