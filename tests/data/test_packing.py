"""Packing (bfd, bfd_split, wrapped) and the language-modeling collators, against TRL 1.16's and by hand."""

import random

import numpy as np
import pytest
import torch
from datasets import Dataset
from trl.data_utils import pack_dataset as trl_pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator

from posttrain.data.packing import (
    DataCollatorForLanguageModeling,
    best_fit_decreasing,
    pack_dataset,
    position_ids_from_lengths,
)

SIX = {"input_ids": [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11], [12, 13, 14, 15], [16]]}


def _random_dataset(rng: random.Random) -> Dataset:
    lengths = [rng.choice([0, 1, 2, 5, 7, 7, 13, 20, 31]) for _ in range(rng.randint(1, 40))]
    ids = [[rng.randrange(1000) for _ in range(n)] for n in lengths]
    labels = [[t if rng.random() < 0.7 else -100 for t in row] for row in ids]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
@pytest.mark.parametrize("seed", range(6))
def test_same_rows_as_trl(strategy, seed):
    """Random lengths with many ties, empty sequences, rows longer than seq_length, several map batches."""
    rng = random.Random(seed)
    dataset = _random_dataset(rng)
    seq_length, batch_size = rng.choice([1, 7, 16, 33]), rng.choice([3, 10, 1000])
    expected = trl_pack_dataset(dataset, seq_length, strategy, {"batch_size": batch_size})
    actual = pack_dataset(dataset, seq_length, strategy, {"batch_size": batch_size})
    assert actual.to_dict() == expected.to_dict()


def test_bfd_by_hand():
    packed = pack_dataset(Dataset.from_dict(SIX), 5, "bfd")
    # longest first: the 5, 4 and 3 open rows; the 2 fills the 3's row exactly, the first 1 the 4's row, and the last
    # 1 finds no room and opens a row
    assert packed.to_dict() == {
        "input_ids": [[4, 5, 6, 7, 8], [12, 13, 14, 15, 9], [1, 2, 3, 10, 11], [16]],
        "seq_lengths": [[5], [4, 1], [3, 2], [1]],
    }


def test_bfd_truncates_and_bfd_split_keeps_the_overflow():
    data = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5, 6, 7], [8, 9]]})
    assert pack_dataset(data, 3, "bfd").to_dict() == {"input_ids": [[1, 2, 3], [8, 9]], "seq_lengths": [[3], [2]]}
    assert pack_dataset(data, 3, "bfd_split").to_dict() == {
        "input_ids": [[1, 2, 3], [4, 5, 6], [8, 9, 7]],
        "seq_lengths": [[3], [3], [2, 1]],
    }


def test_wrapped_cuts_every_seq_length_tokens():
    assert pack_dataset(Dataset.from_dict(SIX), 4, "wrapped").to_dict() == {
        "input_ids": [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]
    }


def test_best_fit_decreasing_picks_the_tightest_row_and_the_oldest_on_ties():
    # rows after 6, 6, 5: room 4, 4, 5. A 4 goes to the first room-4 row (not the room-5 one), the next 4 to the second
    assert best_fit_decreasing(np.array([6, 6, 5, 4, 4]), 10) == [[0, 3], [1, 4], [2]]


def test_format_and_iterable_datasets_are_kept():
    dataset = Dataset.from_dict({**SIX, "labels": SIX["input_ids"]}).with_format(
        "torch", columns=["input_ids", "labels"]
    )
    packed = pack_dataset(dataset, 5, "bfd")
    assert packed.format["type"] == "torch" and set(packed.format["columns"]) == {"input_ids", "labels", "seq_lengths"}
    assert isinstance(packed[0]["input_ids"], torch.Tensor)
    iterable = pack_dataset(Dataset.from_dict(SIX).to_iterable_dataset(), 5, "bfd")
    assert list(iterable) == pack_dataset(Dataset.from_dict(SIX), 5, "bfd").to_list()


@pytest.mark.parametrize(
    "data, strategy, seq_length, error, message",
    [
        (SIX, "ffd", 4, ValueError, "packing_strategy 'ffd' is not one of: bfd, bfd_split, wrapped"),
        (SIX, "bfd", 0, ValueError, "max_length must be a positive integer to pack, got 0"),
        ({"input_ids": [[1]], "source": ["a"]}, "bfd", 4, TypeError, "column 'source' is string"),
        (
            {"input_ids": [[1, 2]], "labels": [[1]]},
            "wrapped",
            4,
            ValueError,
            "column 'labels' has rows of other lengths",
        ),
    ],
    ids=["strategy", "seq_length", "not-a-list", "ragged"],
)
def test_bad_input(data, strategy, seq_length, error, message):
    with pytest.raises(error, match=message):
        pack_dataset(Dataset.from_dict(data), seq_length, strategy)


def test_position_ids_from_lengths():
    assert position_ids_from_lengths([2, 3, 1]).tolist() == [0, 1, 0, 1, 2, 0]


BATCHES = {
    "plain": [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}],
    "labels": [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [4, -100]}],
    "packed": [
        {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "seq_lengths": [3, 1]},
        {"input_ids": [5, 6], "labels": [-100, 6], "seq_lengths": [2]},
    ],
}


# Not "packed" with padding_free=False: TRL pads packed rows with a full attention mask (its sequences then attend to
# each other); see test_packed_rows_are_always_padding_free
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize(
    "batch, padding_free", [("plain", False), ("plain", True), ("labels", False), ("labels", True), ("packed", True)]
)
def test_collator_matches_trl(batch, padding_free, pad_to_multiple_of):
    examples = BATCHES[batch]
    options = {"pad_token_id": 0, "padding_free": padding_free, "pad_to_multiple_of": pad_to_multiple_of}
    expected, actual = TRLCollator(**options)(examples), DataCollatorForLanguageModeling(**options)(examples)
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert actual[key].dtype == value.dtype and torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


def test_collator_by_hand():
    padded = DataCollatorForLanguageModeling(pad_token_id=0)(BATCHES["labels"])
    assert padded["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert padded["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(BATCHES["packed"])
    assert flat["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert flat["labels"].tolist() == [[-100, 2, 3, -100, -100, 6]]  # no sequence predicts the next one's start
    assert flat["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and flat["max_length_q"] == 3
    assert flat["seq_idx"].tolist() == [[0, 0, 0, 1, 2, 2]]
    assert "attention_mask" not in flat


def test_packed_rows_are_always_padding_free():
    """A packed row padded with a full attention mask would let its sequences attend to each other: the collator
    flattens any batch holding one, whatever padding_free says."""
    out = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=False)(BATCHES["packed"])
    assert "attention_mask" not in out
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]


def test_collator_accepts_torch_formatted_rows():
    row = {"input_ids": torch.tensor([1, 2, 3]), "labels": torch.tensor([1, 2, 3]), "seq_lengths": torch.tensor([1, 2])}
    out = DataCollatorForLanguageModeling(pad_token_id=0)([row])
    assert out["position_ids"].tolist() == [[0, 0, 1]] and out["labels"].tolist() == [[-100, -100, 3]]
