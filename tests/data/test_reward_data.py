"""Preference data for reward modelling: the prepared columns and the padded batches equal TRL 1.16's; packing and the
packed scoring positions; bad input."""

import json
import warnings

import pytest
import torch
from datasets import Dataset, IterableDataset
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.trainer.reward_config import RewardConfig as TRLRewardConfig
from trl.trainer.reward_trainer import DataCollatorForPreference as TRLCollator
from trl.trainer.reward_trainer import RewardTrainer as TRLRewardTrainer

from posttrain.data.reward import (
    DataCollatorForPackedPreference,
    DataCollatorForPreference,
    prepare_reward_dataset,
    score_positions,
    tokenize_pair,
)
from posttrain.models import byte_level_tokenizer


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
DATASETS = {
    "standard": {"prompt": ["2+2=", "The sky is", "Hi"], "chosen": ["4", " blue", " there<|im_end|>"],
                 "rejected": ["5", " green", " you!"]},
    "implicit": {"chosen": ["2+2= 4", "The sky is blue", "abc"], "rejected": ["2+2= 5", "The sky is green", "abcd"]},
    "margin": {"chosen": ["a", "b"], "rejected": ["c", "d"], "margin": [0.5, -1.0]},
    "conversational": {"prompt": [_user("2+2?"), _user("Sky?"), _user("Hi")],
                       "chosen": [_assistant("4"), _assistant("blue"), _assistant("there")],
                       "rejected": [_assistant("5"), _assistant("green"), _assistant("you!")]},
    "conversational_implicit": {"chosen": [_user("2+2?") + _assistant("4"), _user("Hi") + _assistant("yo")],
                                "rejected": [_user("2+2?") + _assistant("5"), _user("Hi") + _assistant("no")]},
    "conversational_tools": {"prompt": [_user("2+2?")], "chosen": [_assistant("4")], "rejected": [_assistant("5")],
                             "tools": [json.dumps(TOOLS)]},
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def _trl_prepared(dataset, tokenizer, **config):
    """TRL 1.16's own RewardTrainer._prepare_dataset, run without building a trainer (it reads nothing of self)."""
    args = TRLRewardConfig(output_dir="unused", bf16=False, report_to="none", **config)
    return TRLRewardTrainer._prepare_dataset(None, dataset, tokenizer, args, "train")


@pytest.mark.parametrize("name", list(DATASETS))
def test_prepared_columns_match_trl(name, tokenizer):
    ours = prepare_reward_dataset(Dataset.from_dict(DATASETS[name]), tokenizer, max_length=1024)
    theirs = _trl_prepared(Dataset.from_dict(DATASETS[name]), tokenizer)
    for column in ("chosen_ids", "rejected_ids"):
        assert ours[column] == theirs[column], column
    assert set(theirs.column_names) <= set(ours.column_names)


def test_text_sequences_end_with_one_eos(tokenizer):
    prepared = prepare_reward_dataset(Dataset.from_dict(DATASETS["standard"]), tokenizer)
    eos = tokenizer.eos_token_id
    for ids in [*prepared["chosen_ids"], *prepared["rejected_ids"]]:
        assert ids[-1] == eos and ids[-2] != eos
    assert tokenizer.decode(prepared["chosen_ids"][1]) == "The sky is blue<|im_end|>"


def test_conversations_are_rendered_whole_without_a_generation_prompt(tokenizer):
    prepared = prepare_reward_dataset(Dataset.from_dict(DATASETS["conversational"]), tokenizer)
    text = tokenizer.decode(prepared["chosen_ids"][0])
    assert text == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"


def test_tokenize_pair_of_one_row(tokenizer):
    ids = tokenize_pair({"prompt": "ab", "chosen": "c", "rejected": "de"}, tokenizer)
    assert ids == {"chosen_ids": tokenizer("abc")["input_ids"], "rejected_ids": tokenizer("abde")["input_ids"]}


def test_tokenized_dataset_is_only_filtered(tokenizer):
    data = Dataset.from_dict({"chosen_ids": [[1, 2, 3], [4] * 9], "rejected_ids": [[5], [6]]})
    with pytest.warns(UserWarning, match="dropped 1 of 2 pairs of the train dataset .* max_length=8"):
        prepared = prepare_reward_dataset(data, tokenizer, max_length=8)
    assert prepared["chosen_ids"] == [[1, 2, 3]] and prepared["rejected_ids"] == [[5]]


def test_legacy_columns_are_renamed(tokenizer):
    data = Dataset.from_dict({"chosen_input_ids": [[1, 2]], "rejected_input_ids": [[3]]})
    with pytest.warns(FutureWarning, match="chosen_input_ids / rejected_input_ids are deprecated"):
        prepared = prepare_reward_dataset(data, tokenizer)
    assert prepared.column_names == ["chosen_ids", "rejected_ids"] and prepared[0]["chosen_ids"] == [1, 2]


def test_max_length_drops_whole_pairs_as_trl(tokenizer):
    data = DATASETS["standard"]
    with pytest.warns(UserWarning, match="dropped 1 of 3 pairs"):
        ours = prepare_reward_dataset(Dataset.from_dict(data), tokenizer, max_length=14)
    theirs = _trl_prepared(Dataset.from_dict(data), tokenizer, max_length=14)
    assert ours["chosen_ids"] == theirs["chosen_ids"] and len(ours) == 2


def test_streamed_dataset_is_prepared_the_same(tokenizer):
    data = DATASETS["standard"]
    stream = IterableDataset.from_generator(lambda: iter(Dataset.from_dict(data)))
    with pytest.warns(UserWarning, match="dropped a pair of the train dataset"):
        streamed = list(prepare_reward_dataset(stream, tokenizer, max_length=14))
    mapped = prepare_reward_dataset(Dataset.from_dict(data), tokenizer, max_length=14)
    assert [row["chosen_ids"] for row in streamed] == mapped["chosen_ids"]


@pytest.mark.parametrize(
    "data, match",
    [
        ({"prompt": ["a"], "completion": ["b"]}, r"no 'chosen' or 'rejected' column \(found: completion, prompt\)"),
        ({"chosen": ["a"], "label": [True]}, r"no 'rejected' column"),
        ({"chosen": ["a"], "rejected": [""]}, r"row 0: the 'rejected' sequence is empty"),
        ({"chosen": [[]], "rejected": [_assistant("x")]}, r"row 0: the 'chosen' sequence is empty"),
        ({"prompt": [None], "chosen": ["a"], "rejected": ["b"]}, r"row 0: the 'prompt' is None"),
        ({"prompt": [_user("q")], "chosen": ["a"], "rejected": ["b"]}, r"row 0: 'prompt' is a list of chat messages"),
    ],
    ids=["prompt-completion", "unpaired", "empty-text", "empty-conversation", "none-prompt", "mixed-formats"],
)
def test_bad_rows_are_named(data, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        prepare_reward_dataset(Dataset.from_dict(data), tokenizer)


def test_empty_dataset_is_named(tokenizer):
    with pytest.raises(ValueError, match="the eval dataset is empty"):
        prepare_reward_dataset(Dataset.from_dict({"chosen": [], "rejected": []}), tokenizer, dataset_name="eval")


def test_every_pair_too_long_is_an_error(tokenizer):
    with pytest.raises(ValueError, match=r"every pair of the train dataset \(3\) .* max_length=2"):
        prepare_reward_dataset(Dataset.from_dict(DATASETS["standard"]), tokenizer, max_length=2)


ROWS = [
    {"chosen_ids": [1, 2, 3], "rejected_ids": [4, 5], "margin": 0.5},
    {"chosen_ids": [6], "rejected_ids": [7, 8, 9, 10], "margin": -1.0},
    {"chosen_ids": [11, 12], "rejected_ids": [13], "margin": 0.0},
]


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("margin", [False, True], ids=["no-margin", "margin"])
def test_padded_batches_match_trl(pad_to_multiple_of, margin):
    rows = ROWS if margin else [{k: v for k, v in row.items() if k != "margin"} for row in ROWS]
    ours = DataCollatorForPreference(pad_token_id=0, pad_to_multiple_of=pad_to_multiple_of)(rows)
    theirs = TRLCollator(pad_token_id=0, pad_to_multiple_of=pad_to_multiple_of)(rows)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


def test_collator_only_returns_tensors():
    with pytest.raises(ValueError, match="return_tensors 'np' is not supported"):
        DataCollatorForPreference(pad_token_id=0, return_tensors="np")


def test_missing_margin_is_named():
    rows = [{**ROWS[0]}, {**ROWS[1], "margin": None}]
    with pytest.raises(ValueError, match=r"'margin' column holds None in this batch \(\[0.5, None\]\)"):
        DataCollatorForPreference(pad_token_id=0)(rows)


@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_packed_batch_holds_the_padded_sequences(pad_to_multiple_of):
    packed = DataCollatorForPackedPreference(pad_token_id=0, pad_to_multiple_of=pad_to_multiple_of)(ROWS)
    padded = DataCollatorForPreference(pad_token_id=0)(ROWS)
    lengths = packed["sequence_lengths"]
    assert lengths.tolist() == padded["attention_mask"].sum(1).tolist()
    pieces = packed["input_ids"][0, : lengths.sum()].split(lengths.tolist())
    for piece, row, mask in zip(pieces, padded["input_ids"], padded["attention_mask"]):
        assert torch.equal(piece, row[mask.bool()])
    positions = packed["position_ids"][0, : lengths.sum()].split(lengths.tolist())
    assert all(torch.equal(p, torch.arange(len(p))) for p in positions)
    assert torch.equal(packed["margin"], padded["margin"])
    total = packed["input_ids"].shape[1]
    assert total == (16 if pad_to_multiple_of else 13) and packed["position_ids"].shape == (1, total)


def _padded_rule(rows: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """transformers' sequence classifiers: the rightmost token that is not the pad token (0 if all are)."""
    indices = torch.arange(rows.shape[1])
    return (indices * (rows != pad_token_id)).argmax(-1)


@settings(max_examples=60, deadline=None)
@given(
    sequences=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=9), min_size=1, max_size=8),
    trailing=st.integers(0, 5),
)
def test_score_positions_are_where_the_padded_layout_reads(sequences, trailing):
    """Token 0 is the pad token, and sequences may hold it anywhere (pad == eos tokenizers end with it)."""
    pad_token_id = 0
    lengths = torch.tensor([len(s) for s in sequences])
    row = torch.tensor([token for s in sequences for token in s] + [pad_token_id] * trailing)[None]
    padded = torch.nn.utils.rnn.pad_sequence([torch.tensor(s) for s in sequences], True, pad_token_id)
    starts = torch.cumsum(lengths, 0) - lengths
    expected = starts + _padded_rule(padded, pad_token_id)
    assert torch.equal(score_positions(row, lengths, pad_token_id), expected)


def test_score_positions_example():
    positions = score_positions(torch.tensor([[5, 6, 0, 7, 0, 0]]), torch.tensor([3, 1, 2]), pad_token_id=0)
    assert positions.tolist() == [1, 3, 4]


def test_prepare_runs_in_processes(tokenizer):
    data = Dataset.from_dict({key: values * 2 for key, values in DATASETS["standard"].items()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        parallel = prepare_reward_dataset(data, tokenizer, num_proc=2)
    assert parallel["chosen_ids"] == prepare_reward_dataset(data, tokenizer)["chosen_ids"]
