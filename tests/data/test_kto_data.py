"""Unpaired preference data for KTO: the prepared columns (KL completions included) and the padded batches equal
TRL 1.16's; unpairing; labels; bad input."""

import types
import warnings

import pytest
import torch
from datasets import Dataset, IterableDataset
from trl.data_utils import unpair_preference_dataset as trl_unpair
from trl.trainer.kto_config import KTOConfig as TRLKTOConfig
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference as TRLCollator
from trl.trainer.kto_trainer import KTOTrainer as TRLKTOTrainer

from posttrain.data.kto import (
    DataCollatorForUnpairedPreference,
    as_label,
    prepare_unpaired_dataset,
    tokenize_unpaired,
    unpair_preference_dataset,
    warn_if_unbalanced,
)
from posttrain.models import byte_level_tokenizer


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


DATASETS = {
    "unpaired": {"prompt": ["2+2=", "The sky is", "Hi", "x", "y"],
                 "completion": ["4", " blue", " there<|im_end|>", "z", "w v"], "label": [True, False, True, True, False]},
    "unpaired_conversational": {"prompt": [_user("2+2?"), _user("Sky?"), _user("Hi")],
                                "completion": [_assistant("4"), _assistant("blue"), _assistant("there")],
                                "label": [True, False, False]},
    "paired": {"prompt": ["2+2=", "The sky is", "Hi"], "chosen": ["4", " blue", " there"],
               "rejected": ["5", " green", " you!"]},
    "paired_implicit": {"chosen": ["2+2= 4", "The sky is blue", "abc"],
                        "rejected": ["2+2= 5", "The sky is green", "abcd"]},
    "paired_conversational_implicit": {"chosen": [_user("2+2?") + _assistant("4"), _user("Hi") + _assistant("yo")],
                                       "rejected": [_user("2+2?") + _assistant("5"), _user("Hi") + _assistant("no")]},
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


def _trl_prepared(dataset, tokenizer, calculate_kl=True, **config):
    """TRL 1.16's own KTOTrainer._prepare_dataset, run without building a trainer."""
    args = TRLKTOConfig(output_dir="unused", bf16=False, report_to="none", **config)
    trainer = types.SimpleNamespace(
        _tokenizer=tokenizer, calculate_KL=calculate_kl, desirable_weight=1.0, undesirable_weight=1.0
    )
    return TRLKTOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, "train")


COLUMNS = ("prompt_ids", "completion_ids", "label", "KL_completion_ids")


@pytest.mark.parametrize("name", list(DATASETS))
@pytest.mark.parametrize("batch_size", [2, 3])
def test_prepared_columns_equal_trl(name, batch_size, tokenizer):
    dataset = Dataset.from_dict(DATASETS[name])
    ours = prepare_unpaired_dataset(dataset, tokenizer, max_length=64, kl_batch_size=batch_size)
    theirs = _trl_prepared(dataset, tokenizer, max_length=64, per_device_train_batch_size=batch_size)
    for column in COLUMNS:
        assert ours[column] == theirs[column], column


def test_without_kl_there_is_no_kl_column(tokenizer):
    dataset = Dataset.from_dict(DATASETS["unpaired"])
    ours = prepare_unpaired_dataset(dataset, tokenizer)
    theirs = _trl_prepared(dataset, tokenizer, calculate_kl=False, loss_type="apo_zero_unpaired")
    assert "KL_completion_ids" not in ours.column_names
    assert ours["completion_ids"] == theirs["completion_ids"]


def test_kl_completions_rotate_within_each_batch_block(tokenizer):
    data = {"prompt_ids": [[1]] * 5, "completion_ids": [[10], [11], [12], [13], [14]], "label": [True] * 5}
    prepared = prepare_unpaired_dataset(Dataset.from_dict(data), tokenizer, kl_batch_size=2)
    # blocks (10, 11), (12, 13), (14): each row gets its block's previous completion, the first the block's last
    assert prepared["KL_completion_ids"] == [[11], [10], [13], [12], [14]]


def test_unpairing_matches_trl_order_and_copies_other_columns():
    data = {"prompt": [f"p{i}" for i in range(1203)], "chosen": [f"c{i}" for i in range(1203)],
            "rejected": [f"r{i}" for i in range(1203)], "source": [i % 7 for i in range(1203)]}  # fmt: skip
    dataset = Dataset.from_dict(data)
    ours, theirs = unpair_preference_dataset(dataset), trl_unpair(dataset)
    assert set(ours.column_names) == set(theirs.column_names)
    for column in theirs.column_names:
        assert ours[column] == theirs[column], column
    # blocks of 1000 pairs: their chosen rows, then their rejected rows
    assert (
        ours[999]["completion"] == "c999" and ours[1000]["completion"] == "r0" and ours[2000]["completion"] == "c1000"
    )
    assert ours[5]["source"] == ours[1005]["source"] == 5


def test_streamed_dataset_gives_the_same_rows(tokenizer):
    dataset = Dataset.from_dict(DATASETS["paired"])
    mapped = prepare_unpaired_dataset(dataset, tokenizer, max_length=64, kl_batch_size=2)
    streamed = prepare_unpaired_dataset(dataset.to_iterable_dataset(), tokenizer, max_length=64, kl_batch_size=2)
    assert isinstance(streamed, IterableDataset)
    rows = list(streamed)
    for column in COLUMNS:
        assert [row[column] for row in rows] == mapped[column], column


def test_standard_completions_end_with_one_eos(tokenizer):
    prepared = prepare_unpaired_dataset(Dataset.from_dict(DATASETS["unpaired"]), tokenizer)
    eos = tokenizer.eos_token_id
    for ids in prepared["completion_ids"]:
        assert ids[-1] == eos and ids[-2] != eos
    assert prepared[0]["prompt_ids"] == tokenizer("2+2=")["input_ids"]


def test_conversational_completion_is_the_assistant_turn(tokenizer):
    row = prepare_unpaired_dataset(Dataset.from_dict(DATASETS["unpaired_conversational"]), tokenizer)[0]
    assert tokenizer.decode(row["prompt_ids"]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(row["completion_ids"]) == "4<|im_end|>\n"


def test_template_kwargs_and_tools_reach_the_chat_template():
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ tools | length }}"
    example = {"prompt": _user("q"), "completion": _assistant("a"), "chat_template_kwargs": {"greeting": "hello "},
               "tools": '[{"name": "f"}, {"name": "g"}]'}  # fmt: skip
    ids = tokenize_unpaired(example, tokenizer)
    assert tokenizer.decode(ids["prompt_ids"]) == "hello q"
    assert tokenizer.decode(ids["completion_ids"]) == "a2"


@pytest.mark.parametrize(
    "value, expected",
    [(True, True), (False, False), (1, True), (0, False)],
    ids=["true", "false", "one", "zero"],
)
def test_labels_are_bools_or_zero_one(value, expected):
    assert as_label(value, 0, "train") is expected


@pytest.mark.parametrize(
    "labels, shown",
    [(["yes", "no"], "row 0: .*got 'yes' \\(str\\)"), ([1, 2, 0], "row 1: .*got 2 \\(int\\)"),
     ([1.0, 0.0], "row 0: .*got 1.0 \\(float\\)"), ([True, None, False], "row 1: .*got None \\(NoneType\\)")],
    ids=["strings", "integer-2", "floats", "none"],
)  # fmt: skip
def test_labels_that_are_not_booleans_are_refused_with_their_row(labels, shown, tokenizer):
    data = {"prompt": ["a"] * len(labels), "completion": ["x"] * len(labels), "label": labels}
    with pytest.raises(ValueError, match=f"train dataset {shown}") as error:
        prepare_unpaired_dataset(Dataset.from_dict(data), tokenizer)
    assert "'label' must be a bool (True: desirable, False: undesirable)" in str(error.value)


def test_integer_labels_become_bools(tokenizer):
    data = {"prompt": ["a", "b"], "completion": ["x", "y"], "label": [1, 0]}
    prepared = prepare_unpaired_dataset(Dataset.from_dict(data), tokenizer)
    assert prepared["label"] == [True, False] and prepared.features["label"].dtype == "bool"


def test_pretokenized_rows_keep_their_ids_and_get_their_labels_checked(tokenizer):
    data = {"prompt_ids": [[1, 2], [3]], "completion_ids": [[4], [5, 6]], "label": [True, False]}
    prepared = prepare_unpaired_dataset(Dataset.from_dict(data), tokenizer, kl_batch_size=2)
    assert prepared["completion_ids"] == data["completion_ids"] and prepared["KL_completion_ids"] == [[5, 6], [4]]
    with pytest.raises(ValueError, match="row 0: 'label' must be a bool"):
        prepare_unpaired_dataset(Dataset.from_dict({**data, "label": ["good", "bad"]}), tokenizer)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"prompt": ["a"], "completion": ["b"]}, r"no 'label' column \(found: completion, prompt\)"),
        ({"prompt": ["a"], "label": [True]}, "no 'completion' column"),
        ({"text": ["a"]}, "no 'prompt' or 'completion' or 'label' column"),
        ({"prompt": ["a"], "chosen": ["b"]}, "has a 'chosen' column but no 'rejected' column"),
        ({"rejected": ["b"]}, "has a 'rejected' column but no 'chosen' column"),
    ],
    ids=["no-label", "no-completion", "sft-data", "chosen-only", "rejected-only"],
)
def test_wrong_columns_are_named(data, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        prepare_unpaired_dataset(Dataset.from_dict(data), tokenizer)


def test_vision_data_is_refused(tokenizer):
    data = {"prompt": ["a"], "completion": ["b"], "label": [True], "images": [[]]}
    with pytest.raises(NotImplementedError, match="vision preference data"):
        prepare_unpaired_dataset(Dataset.from_dict(data), tokenizer)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "", "label": True}],
         r"row 1: the 'completion' is empty \(''\)"),
        ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": None, "completion": "b", "label": True}],
         "row 1: the 'prompt' is None"),
        ([{"prompt": "a", "completion": _assistant("b"), "label": True}],
         "row 0: 'completion' is a list of chat messages but 'prompt' is str: the formats must match"),
    ],
    ids=["empty-completion", "none-prompt", "mixed-formats"],
)  # fmt: skip
def test_bad_rows_are_refused_with_their_index(rows, match, tokenizer):
    with pytest.raises(ValueError, match=match):
        prepare_unpaired_dataset(Dataset.from_list(rows), tokenizer)


def test_empty_dataset_is_refused(tokenizer):
    with pytest.raises(ValueError, match="the eval dataset is empty"):
        prepare_unpaired_dataset(Dataset.from_dict({"prompt": [], "completion": [], "label": []}), tokenizer,
                                 dataset_name="eval")  # fmt: skip


def test_fully_truncated_rows_are_dropped_and_counted(tokenizer):
    data = {"prompt": ["a" * 30, "b", "c" * 9, "d" * 10], "completion": ["x"] * 4, "label": [True, False] * 2}
    with pytest.warns(UserWarning, match=r"dropped 2 of 4 rows .* max_length=10"):
        prepared = prepare_unpaired_dataset(Dataset.from_dict(data), tokenizer, max_length=10)
    assert [len(ids) for ids in prepared["prompt_ids"]] == [1, 9]
    with pytest.raises(ValueError, match="every row of the train dataset"):
        prepare_unpaired_dataset(Dataset.from_dict({k: v[:1] for k, v in data.items()}), tokenizer, max_length=10)


def test_unbalanced_data_warns_unless_a_weight_balances_it():
    labels = [True] * 2 + [False] * 6
    with pytest.warns(UserWarning, match=r"2 desirable and 6 undesirable .* desirable_weight in \[3.0, 3.99\]"):
        warn_if_unbalanced(labels, 1.0, 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_unbalanced(labels, 3.5, 1.0)
        warn_if_unbalanced(labels, 1.0, 0.3)
        warn_if_unbalanced([True, False], 1.0, 1.0)


EXAMPLES = [
    {"prompt_ids": [1, 2, 3], "completion_ids": [4, 5], "KL_completion_ids": [6], "label": True,
     "ref_logps": -1.5, "ref_KL_logps": -2.0},
    {"prompt_ids": [7, 8], "completion_ids": [9], "KL_completion_ids": [10, 11, 12, 13], "label": False,
     "ref_logps": -0.5, "ref_KL_logps": -3.0},
]  # fmt: skip


@pytest.mark.parametrize(
    "options", [{}, {"max_length": 4}, {"pad_to_multiple_of": 8}], ids=["plain", "truncated", "x8"]
)
def test_collated_batch_equals_trl(options):
    ours = DataCollatorForUnpairedPreference(pad_token_id=0, **options)(EXAMPLES)
    theirs = TRLCollator(pad_token_id=0, **options)(EXAMPLES)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


def test_collated_batch_without_kl_or_reference():
    examples = [{k: v for k, v in ex.items() if k in ("prompt_ids", "completion_ids", "label")} for ex in EXAMPLES]
    batch = DataCollatorForUnpairedPreference(pad_token_id=0)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "label"}
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]
    assert batch["label"].tolist() == [True, False]
