"""Preference data for DPO: the prepared columns and the padded batches equal TRL 1.16's; packing; bad input."""

import re
import types
import warnings

import pyarrow as pa
import pytest
import torch
from datasets import Dataset, IterableDataset
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.trainer.dpo_config import DPOConfig as TRLDPOConfig
from trl.trainer.dpo_trainer import DataCollatorForPreference as TRLCollator
from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer

from posttrain.data.dpo import (
    DataCollatorForPackedPreference,
    DataCollatorForPreference,
    count_identical_lists,
    extract_prompt,
    prepare_preference_dataset,
    tokenize_preference,
)
from posttrain.models import byte_level_tokenizer


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


DATASETS = {
    "standard": {"prompt": ["2+2=", "The sky is", "Hi"], "chosen": ["4", " blue", " there<|im_end|>"],
                 "rejected": ["5", " green", " you!"]},
    "implicit": {"chosen": ["2+2= 4", "The sky is blue", "abc"], "rejected": ["2+2= 5", "The sky is green", "abcd"]},
    "conversational": {"prompt": [_user("2+2?"), _user("Sky?"), _user("Hi")],
                       "chosen": [_assistant("4"), _assistant("blue"), _assistant("there")],
                       "rejected": [_assistant("5"), _assistant("green"), _assistant("you!")]},
    "conversational_implicit": {"chosen": [_user("2+2?") + _assistant("4"), _user("Hi") + _assistant("yo")],
                                "rejected": [_user("2+2?") + _assistant("5"), _user("Hi") + _assistant("no")]},
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def _trl_prepared(dataset, tokenizer, **config):
    """TRL 1.16's own DPOTrainer._prepare_dataset, run without building a trainer."""
    args = TRLDPOConfig(output_dir="unused", bf16=False, report_to="none", **config)
    return TRLDPOTrainer._prepare_dataset(
        types.SimpleNamespace(_tokenizer=tokenizer), dataset, tokenizer, args, "train"
    )


@pytest.mark.parametrize("name", list(DATASETS))
def test_prepared_ids_equal_trl(name, tokenizer):
    dataset = Dataset.from_dict(DATASETS[name])
    ours = prepare_preference_dataset(dataset, tokenizer, max_length=64)
    theirs = _trl_prepared(dataset, tokenizer, max_length=64)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert ours[column] == theirs[column], column


def test_standard_completions_end_with_one_eos(tokenizer):
    prepared = prepare_preference_dataset(Dataset.from_dict(DATASETS["standard"]), tokenizer)
    eos = tokenizer.eos_token_id
    for row in prepared:
        for column in ("chosen_ids", "rejected_ids"):
            assert row[column][-1] == eos and row[column][-2] != eos
    assert prepared[0]["prompt_ids"] == tokenizer("2+2=")["input_ids"]


def test_conversational_completion_is_the_assistant_turn(tokenizer):
    row = prepare_preference_dataset(Dataset.from_dict(DATASETS["conversational"]), tokenizer)[0]
    assert tokenizer.decode(row["prompt_ids"]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(row["chosen_ids"]) == "4<|im_end|>\n"


@pytest.mark.parametrize(
    "example, expected",
    [
        ({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}, ("Q: 2+2? A:", " 4", " 5")),
        ({"chosen": "abc", "rejected": "abcd"}, ("ab", "c", "cd")),
        ({"chosen": "x", "rejected": "y"}, ("", "x", "y")),
        ({"chosen": _user("q") + _assistant("a"), "rejected": _user("q") + _assistant("b")},
         (_user("q"), _assistant("a"), _assistant("b"))),
    ],
    ids=["space-goes-to-completion", "one-is-prefix", "no-common-prefix", "conversation"],
)  # fmt: skip
def test_extract_prompt(example, expected):
    result = extract_prompt(example)
    assert (result["prompt"], result["chosen"], result["rejected"]) == expected


def test_template_kwargs_and_tools_reach_the_chat_template():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tools | length }}"
    example = {"prompt": _user("q"), "chosen": _assistant("a"), "rejected": _assistant("b"),
               "chat_template_kwargs": {"greeting": "hello "}, "tools": '[{"name": "f"}, {"name": "g"}]'}  # fmt: skip
    ids = tokenize_preference(example, tokenizer)
    assert tokenizer.decode(ids["prompt_ids"]) == "hello q"
    assert tokenizer.decode(ids["chosen_ids"]) == "a2"


def test_missing_column_is_named(tokenizer):
    with pytest.raises(ValueError, match="no 'rejected' column"):
        prepare_preference_dataset(Dataset.from_dict({"prompt": ["a"], "chosen": ["b"]}), tokenizer)


@pytest.mark.parametrize("name", ["standard", "conversational"])
def test_empty_completion_is_refused_with_its_row(name, tokenizer):
    data = {key: list(values) for key, values in DATASETS[name].items()}
    data["rejected"][1] = "" if name == "standard" else []
    with pytest.raises(ValueError, match="row 1: the 'rejected' completion is empty"):
        prepare_preference_dataset(Dataset.from_dict(data), tokenizer)


def test_fully_truncated_rows_are_dropped_and_counted(tokenizer):
    data = {"prompt": ["a" * 30, "b", "c" * 9, "d" * 10], "chosen": ["x"] * 4, "rejected": ["y"] * 4}
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows .* max_length=10"):
        prepared = prepare_preference_dataset(Dataset.from_dict(data), tokenizer, max_length=10)
    assert [len(ids) for ids in prepared["prompt_ids"]] == [1, 9]


def test_keep_end_drops_nothing(tokenizer):
    data = {"prompt": ["a" * 30], "chosen": ["x"], "rejected": ["y"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = prepare_preference_dataset(
            Dataset.from_dict(data), tokenizer, max_length=10, truncation_mode="keep_end"
        )
    assert len(prepared) == 1


def test_every_row_fully_truncated_is_an_error(tokenizer):
    data = {"prompt": ["a" * 30, "b" * 12], "chosen": ["x"] * 2, "rejected": ["y"] * 2}
    with pytest.raises(ValueError, match="every row of the train dataset .* max_length=10"):
        prepare_preference_dataset(Dataset.from_dict(data), tokenizer, max_length=10)


def test_streamed_dataset_is_prepared_lazily(tokenizer):
    rows = [{"prompt": "a" * 30, "chosen": "x", "rejected": "y"}, {"prompt": "b", "chosen": "x", "rejected": "y"}]
    stream = IterableDataset.from_generator(lambda: iter(rows))
    prepared = prepare_preference_dataset(stream, tokenizer, max_length=10)
    with pytest.warns(UserWarning, match="prompt has 30 >= max_length=10"):
        kept = list(prepared)
    assert [row["prompt"] for row in kept] == ["b"]


def test_pretokenized_rows_pass_through(tokenizer):
    rows = {"prompt_ids": [[1, 2]], "chosen_ids": [[3]], "rejected_ids": [[4, 5]]}
    assert prepare_preference_dataset(Dataset.from_dict(rows), tokenizer).to_dict() == rows


ROWS = [
    {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6], "ref_chosen_logps": -1.5,
     "ref_rejected_logps": -2.5},
    {"prompt_ids": [7], "chosen_ids": [8, 9, 10, 11], "rejected_ids": [12, 13], "ref_chosen_logps": -3.0,
     "ref_rejected_logps": -0.25},
]  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [{}, {"max_length": 4}, {"max_length": 4, "truncation_mode": "keep_end"}, {"pad_to_multiple_of": 8}],
    ids=["plain", "keep-start", "keep-end", "multiple-of-8"],
)
def test_padded_collator_equals_trl(options):
    ours = DataCollatorForPreference(pad_token_id=0, **options)(ROWS)
    theirs = TRLCollator(pad_token_id=0, **options)(ROWS)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("options", [{}, {"max_length": 4}, {"pad_to_multiple_of": 8}], ids=["plain", "trunc", "x8"])
def test_packed_collator_holds_the_padded_sequences(options):
    padded = DataCollatorForPreference(pad_token_id=0, **options)(ROWS)
    packed = DataCollatorForPackedPreference(pad_token_id=0, **options)(ROWS)
    lengths = packed["sequence_lengths"]
    assert torch.equal(lengths, padded["attention_mask"].sum(1))
    starts = torch.cumsum(lengths, 0) - lengths
    for row, (start, length) in enumerate(zip(starts.tolist(), lengths.tolist())):
        for key in ("input_ids", "completion_mask"):
            assert torch.equal(packed[key][0, start : start + length], padded[key][row, :length]), key
        assert torch.equal(packed["position_ids"][0, start : start + length], torch.arange(length))
    total = packed["input_ids"].shape[1]
    assert total % options.get("pad_to_multiple_of", 1) == 0 and total >= int(lengths.sum())
    assert not packed["completion_mask"][0, int(lengths.sum()) :].any()
    assert "attention_mask" not in packed
    assert torch.equal(packed["ref_chosen_logps"], torch.tensor([-1.5, -3.0]))


# ---- identical pairs, mixed formats ----


def test_rows_with_the_same_chosen_and_rejected_warn_with_a_count(tokenizer):
    data = {"prompt": ["a", "b", "c"], "chosen": ["x", "y", "z"], "rejected": ["x", "w", "z<|im_end|>"]}
    with pytest.warns(UserWarning, match="2 of 3 rows of the train dataset have the same chosen and rejected"):
        prepared = prepare_preference_dataset(Dataset.from_dict(data), tokenizer)
    assert len(prepared) == 3
    pretokenized = {"prompt_ids": [[1], [1]], "chosen_ids": [[2, 3], [2]], "rejected_ids": [[2, 3], [2, 3]]}
    with pytest.warns(UserWarning, match="1 of 2 rows of the eval dataset"):
        prepare_preference_dataset(Dataset.from_dict(pretokenized), tokenizer, dataset_name="eval")
    stream = prepare_preference_dataset(Dataset.from_dict(data).to_iterable_dataset(), tokenizer)
    with pytest.warns(UserWarning, match="a row of the train dataset has the same chosen and rejected"):
        assert len(list(stream)) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_preference_dataset(Dataset.from_dict(DATASETS["standard"]), tokenizer)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 3), max_size=4), st.lists(st.integers(0, 3), max_size=4)),
                min_size=1, max_size=12))  # fmt: skip
def test_count_identical_lists_counts_what_python_counts(pairs):
    ids = pa.list_(pa.int64())  # the type of a tokenized column
    a, b = pa.array([x for x, _ in pairs], type=ids), pa.array([y for _, y in pairs], type=ids)
    expected = sum(x == y for x, y in pairs)
    assert count_identical_lists(a, b) == expected
    assert count_identical_lists(pa.chunked_array([a[:1], a[1:]]), pa.chunked_array([b[:1], b[1:]])) == expected


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "2+2?", "chosen": _assistant("4"), "rejected": _assistant("5")},
         "row 0: 'chosen', 'rejected' are lists of chat messages but 'prompt' is str: the formats must match"),
        ({"prompt": _user("2+2?"), "chosen": "4", "rejected": "5"},
         "row 0: 'prompt' is a list of chat messages but 'chosen', 'rejected' are str: the formats must match"),
        ({"prompt": None, "chosen": "4", "rejected": "5"}, "row 0: the 'prompt' is None"),
    ],
    ids=["text-prompt-chat-completions", "chat-prompt-text-completions", "prompt-None"],
)  # fmt: skip
def test_a_row_mixing_text_and_chat_is_refused(row, expected, tokenizer):
    with pytest.raises(ValueError, match=re.escape(expected)):
        prepare_preference_dataset(Dataset.from_list([row]), tokenizer)
