"""The data helpers every trainer's preparation shares (posttrain.data.common): the prompt / completion split of
chat-template tokenization, row format checks, and row filters that count, warn and refuse to drop everything."""

import functools
import warnings

import pytest
from datasets import Dataset

from posttrain.data.common import (
    check_formats,
    drop_fully_truncated,
    drop_rows,
    first_row,
    template_kwargs,
    tokenize_prompt_completions,
    with_eos,
)
from posttrain.models import byte_level_tokenizer


def _user(text):
    return [{"role": "user", "content": text}]


def _assistant(text):
    return [{"role": "assistant", "content": text}]


def test_completions_start_where_the_first_one_leaves_the_prompt():
    # the generation prompt "<" renders only with the prompt alone: the chosen completion happens to start with "<"
    # (its prefix with the prompt is 2 tokens), the rejected one not (1 token): the prompt is cut at the shorter
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<{% endif %}"
    )
    example = {"prompt": _user("q"), "chosen": _assistant("<a"), "rejected": _assistant("b")}
    ids = tokenize_prompt_completions(example, tokenizer, ("chosen", "rejected"))
    decoded = {key: tokenizer.decode(value) for key, value in ids.items()}
    assert decoded == {"prompt_ids": "q", "chosen_ids": "<a", "rejected_ids": "b"}


def test_text_rows_split_after_the_prompt():
    tokenizer = byte_level_tokenizer()
    ids = tokenize_prompt_completions({"prompt": "2+2=", "completion": "4"}, tokenizer, ("completion",))
    assert ids == {"prompt_ids": tokenizer("2+2=")["input_ids"], "completion_ids": tokenizer("4")["input_ids"]}


def test_template_kwargs_of_text_and_chat_rows():
    assert template_kwargs({"prompt": "a", "completion": "b"}) is None
    row = {"prompt": _user("a"), "completion": _assistant("b"), "tools": '[{"name": "f"}]',
           "chat_template_kwargs": {"greeting": "hi"}}  # fmt: skip
    assert template_kwargs(row) == {"tools": [{"name": "f"}], "greeting": "hi"}


@pytest.mark.parametrize(
    "text, eos, expected",
    [("4", "<e>", "4<e>"), ("4<e>", "<e>", "4<e>"), ("4", None, "4")],
    ids=["appended", "already-there", "no-eos"],
)
def test_with_eos(text, eos, expected):
    assert with_eos(text, eos) == expected


@pytest.mark.parametrize(
    "example, match",
    [
        ({"prompt": None, "chosen": "a"}, "train dataset row 3: the 'prompt' is None"),
        ({"prompt": _user("q"), "chosen": "a"}, "row 3: 'prompt' is a list of chat messages but 'chosen' is str"),
        ({"prompt": "q", "chosen": _assistant("a"), "rejected": _assistant("b")},
         "row 3: 'chosen', 'rejected' are lists of chat messages but 'prompt' is str: the formats must match"),
    ],
    ids=["none-prompt", "chat-prompt-text-completion", "text-prompt-chat-completions"],
)  # fmt: skip
def test_check_formats_names_the_row(example, match):
    with pytest.raises(ValueError, match=match):
        check_formats(example, ("prompt", "chosen", "rejected"), 3, "train")


def test_check_formats_of_consistent_rows():
    keys = ("prompt", "completion")
    assert check_formats({"prompt": _user("q"), "completion": _assistant("a")}, keys, 0, "train") is True
    assert check_formats({"prompt": "q", "completion": "a"}, keys, 0, "train") is False
    assert check_formats({"completion": "a"}, keys, 0, "train") is False  # absent columns are not compared


def test_first_row_of_an_empty_dataset():
    with pytest.raises(ValueError, match="the eval dataset is empty"):
        first_row(Dataset.from_dict({"x": []}), "eval")


def _below(example: dict, limit: int) -> bool:
    return example["x"] < limit


MESSAGES = {
    "dropped": lambda count, total: f"dropped {count} of {total}",
    "dropped_row": lambda row: f"dropped x={row['x']}",
    "none_left": lambda total: f"none of {total} left",
}


@pytest.mark.parametrize("num_proc", [None, 2], ids=["one-process", "two-processes"])
def test_drop_rows_counts_what_it_drops(num_proc):
    data = Dataset.from_dict({"x": [1, 20, 3, 40, 5]})
    keep = functools.partial(_below, limit=10)
    with pytest.warns(UserWarning, match="^dropped 2 of 5$"):
        assert drop_rows(data, keep, num_proc=num_proc, desc="Dropping", **MESSAGES)["x"] == [1, 3, 5]


def test_drop_rows_keeps_quiet_when_nothing_is_dropped_and_refuses_to_drop_everything():
    data = Dataset.from_dict({"x": [1, 2]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert drop_rows(data, functools.partial(_below, limit=10), desc="Dropping", **MESSAGES)["x"] == [1, 2]
    with pytest.raises(ValueError, match="^none of 2 left$"):
        drop_rows(data, functools.partial(_below, limit=0), desc="Dropping", **MESSAGES)


def test_a_streamed_dataset_warns_row_by_row():
    stream = Dataset.from_dict({"x": [1, 20, 3, 40]}).to_iterable_dataset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = [row["x"] for row in drop_rows(stream, functools.partial(_below, limit=10), desc="-", **MESSAGES)]
    assert kept == [1, 3]
    assert [str(warning.message) for warning in caught] == ["dropped x=20", "dropped x=40"]


def test_drop_fully_truncated_keeps_rows_with_a_completion_token():
    data = Dataset.from_dict({"prompt_ids": [[1], [1, 2], [1, 2, 3]]})
    with pytest.warns(UserWarning, match=r"dropped 2 of 3 rows of the eval dataset .* max_length=2 tokens"):
        assert drop_fully_truncated(data, 2, "eval")["prompt_ids"] == [[1]]
