"""SFT dataset preparation: every format and option gives the tokens and labels TRL 1.16's SFTTrainer prepares."""

import json
import re
import warnings

import pytest
import trl
from datasets import Dataset

import posttrain
from posttrain.data.chat_templates import has_generation_markers
from posttrain.data.sft import (
    dataset_format,
    is_stop_token_trained,
    prepare_sft_dataset,
    set_chat_template,
)
from posttrain.models import byte_level_tokenizer, tiny_causal_lm

PAIRS = [("2+2=", "4"), ("What is 13+4?", "17"), ("7*7", "49, since seven sevens")]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {}}}]


def _chat(prompt, completion):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def _tool_tokenizer():
    """The preset tokenizer with a template that also renders the tools and a `greeting` template kwarg."""
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = (
        "{%- if greeting %}{{- greeting + '\\n' }}{%- endif %}"
        "{%- if tools %}{{- 'tools: ' + (tools | map(attribute='function.name') | join(',')) + '\\n' }}{%- endif %}"
        + tokenizer.chat_template
    )
    return tokenizer


DATASETS = {
    "text": lambda: Dataset.from_dict({"text": [p + c for p, c in PAIRS]}),
    "text-ending-with-eos": lambda: Dataset.from_dict({"text": [p + c + "<|im_end|>" for p, c in PAIRS]}),
    "messages": lambda: Dataset.from_dict({"messages": [_chat(p, c) for p, c in PAIRS]}),
    "conversations-from-value": lambda: Dataset.from_dict(
        {"conversations": [[{"from": m["role"], "value": m["content"]} for m in _chat(p, c)] for p, c in PAIRS]}
    ),
    "messages-tools-kwargs": lambda: Dataset.from_dict(
        {
            "messages": [_chat(p, c) for p, c in PAIRS],
            "tools": [json.dumps(TOOLS), None, json.dumps(TOOLS)],
            "chat_template_kwargs": [{"greeting": "hi"}, {"greeting": "yo"}, {}],
        }
    ),
    "prompt_completion": lambda: Dataset.from_dict(
        {"prompt": [p for p, _ in PAIRS], "completion": [c for _, c in PAIRS]}
    ),
    "conversational_prompt_completion": lambda: Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p}] for p, _ in PAIRS],
            "completion": [[{"role": "assistant", "content": c}] for _, c in PAIRS],
        }
    ),
    "question_answer": lambda: Dataset.from_dict({"question": [p for p, _ in PAIRS], "answer": [c for _, c in PAIRS]}),
    "tokenized": lambda: Dataset.from_dict({"input_ids": [[5, 6, 7, 8], [9, 10], [11, 12, 13]]}),
    "tokenized-labels": lambda: Dataset.from_dict(
        {"input_ids": [[5, 6, 7, 8], [9, 10]], "labels": [[-100, 6, 7, 8], [-100, 10]]}
    ),
    "tokenized-masks": lambda: Dataset.from_dict(
        {
            "input_ids": [[5, 6, 7, 8], [9, 10, 11]],
            "completion_mask": [[0, 0, 1, 1], [0, 1, 1]],
            "assistant_masks": [[0, 1, 1, 1], [1, 1, 0]],
        }
    ),
}

CASES = {
    "text": ("text", {}, {}),
    "text-dataset_text_field": ("text", {"dataset_text_field": "body"}, {}),
    "text-ending-with-eos": ("text-ending-with-eos", {}, {}),
    "messages": ("messages", {}, {}),
    "messages-assistant_only_loss": ("messages", {"assistant_only_loss": True}, {}),
    "conversations-from-value": ("conversations-from-value", {}, {}),
    "messages-tools-kwargs": ("messages-tools-kwargs", {}, {"processing_class": _tool_tokenizer}),
    "prompt_completion": ("prompt_completion", {}, {}),
    "prompt_completion-full_loss": ("prompt_completion", {"completion_only_loss": False}, {}),
    "conversational_prompt_completion": ("conversational_prompt_completion", {}, {}),
    "conversational_prompt_completion-full_loss": (
        "conversational_prompt_completion",
        {"completion_only_loss": False},
        {},
    ),
    "conversational_prompt_completion-assistant_only_loss": (
        "conversational_prompt_completion",
        {"assistant_only_loss": True, "completion_only_loss": False},
        {},
    ),
    "tokenized": ("tokenized", {}, {}),
    "tokenized-labels": ("tokenized-labels", {}, {}),
    "tokenized-masks": ("tokenized-masks", {}, {}),
    "tokenized-masks-completion_only_loss": ("tokenized-masks", {"completion_only_loss": True}, {}),
    "truncation-keep_start-drops-unlabeled": ("conversational_prompt_completion", {"max_length": 26}, {}),
    "truncation-keep_end": ("messages", {"max_length": 20, "truncation_mode": "keep_end"}, {}),
    "no-truncation": ("messages", {"max_length": None}, {}),
    "packing-bfd": ("messages", {"packing": True, "max_length": 48}, {}),
    "packing-bfd_split": ("messages", {"packing": True, "max_length": 24, "packing_strategy": "bfd_split"}, {}),
    "packing-wrapped": ("text", {"packing": True, "max_length": 8, "packing_strategy": "wrapped"}, {}),
    "shuffle": ("messages", {"shuffle_dataset": True, "seed": 3}, {}),
    "shuffle-packing": ("text", {"shuffle_dataset": True, "packing": True, "max_length": 30}, {}),
    "formatting_func": (
        "question_answer",
        {},
        {"formatting_func": lambda example: f"Q: {example['question']}\nA: {example['answer']}"},
    ),
}


def _prepared(lib, model_dir, tmp_path, dataset, config, trainer_kwargs):
    kwargs = {key: value() if key == "processing_class" else value for key, value in trainer_kwargs.items()}
    args = lib.SFTConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **config)
    trainer = lib.SFTTrainer(model_dir, args=args, train_dataset=dataset, **kwargs)
    columns = [c for c in ("input_ids", "labels", "seq_lengths") if c in trainer.train_dataset.column_names]
    return trainer.train_dataset.select_columns(columns).to_dict()


@pytest.mark.parametrize("case", list(CASES))
def test_prepared_dataset_matches_trl(case, tiny_model_dir, tmp_path):
    name, config, trainer_kwargs = CASES[case]
    dataset = DATASETS[name]()
    if config.get("dataset_text_field"):
        dataset = dataset.rename_column("text", config["dataset_text_field"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # keep_end is deprecated in both libraries
        expected = _prepared(trl, tiny_model_dir, tmp_path / "trl", dataset, config, trainer_kwargs)
        actual = _prepared(posttrain, tiny_model_dir, tmp_path / "pt", dataset, config, trainer_kwargs)
    assert actual == expected
    assert actual["input_ids"], "every example was dropped: the case tests nothing"


def test_labels_by_hand():
    """A readable check of what the parity test compares: eos appended, completion and assistant masks."""
    tokenizer = byte_level_tokenizer()
    a, b, c = tokenizer("abc")["input_ids"]
    eos = tokenizer.eos_token_id
    text = prepare_sft_dataset(Dataset.from_dict({"text": ["ab"]}), tokenizer)[0]
    assert text == {"text": "ab", "input_ids": [a, b, eos], "labels": [a, b, eos]}
    pc = prepare_sft_dataset(
        Dataset.from_dict({"prompt": ["ab"], "completion": ["c"]}), tokenizer, completion_only_loss=True
    )[0]
    assert pc["input_ids"] == [a, b, c, eos] and pc["labels"] == [-100, -100, c, eos]
    chat = prepare_sft_dataset(Dataset.from_dict({"messages": [_chat("a", "b")]}), tokenizer, assistant_only_loss=True)[
        0
    ]
    assert tokenizer.decode([token for token in chat["labels"] if token != -100]) == "b<|im_end|>"
    assert tokenizer.decode(chat["input_ids"]) == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"


def test_iterable_dataset_prepares_like_a_dataset():
    tokenizer = byte_level_tokenizer()
    dataset = DATASETS["messages"]()
    options = {"max_length": 30, "packing": True}
    eager = prepare_sft_dataset(dataset, tokenizer, **options).to_list()
    lazy = list(prepare_sft_dataset(dataset.to_iterable_dataset(), tokenizer, **options))
    assert [{k: row[k] for k in ("input_ids", "labels", "seq_lengths")} for row in lazy] == eager


@pytest.mark.parametrize(
    "example, kind",
    [
        ({"input_ids": [1], "text": "a"}, "tokenized"),
        ({"prompt": "a", "completion": "b", "text": "c"}, "prompt_completion"),
        ({"messages": _chat("a", "b")}, "messages"),
        ({"conversations": [{"from": "user", "value": "a"}]}, "messages"),
        ({"text": "a"}, "text"),
    ],
    ids=["tokenized", "prompt_completion", "messages", "conversations", "text"],
)
def test_dataset_format(example, kind):
    assert dataset_format(example) == kind
    assert dataset_format(example, formatting_func=str) == ("tokenized" if kind == "tokenized" else "formatted")


def test_unknown_format_lists_what_was_looked_for():
    with pytest.raises(ValueError) as error:
        dataset_format({"prompt": "only a prompt", "body": "x"}, dataset_text_field="content", name="eval")
    message = str(error.value)
    for expected in (
        "eval dataset",
        "'input_ids'",
        "'prompt'",
        "'completion'",
        "'messages'",
        "'content'",
        "['body', 'prompt']",
    ):
        assert expected in message


def test_empty_and_emptied_datasets_are_errors():
    tokenizer = byte_level_tokenizer()
    with pytest.raises(ValueError, match="train dataset is empty"):
        prepare_sft_dataset(Dataset.from_dict({"text": []}), tokenizer)
    long_prompts = Dataset.from_dict({"prompt": ["a long prompt"], "completion": ["b"]})
    with pytest.raises(ValueError, match="after truncation to max_length=4"):
        prepare_sft_dataset(long_prompts, tokenizer, completion_only_loss=True, max_length=4)


def test_with_transform_is_refused():
    dataset = Dataset.from_dict({"text": ["a"]}).with_transform(lambda batch: batch)
    with pytest.raises(ValueError, match="with_transform"):
        prepare_sft_dataset(dataset, byte_level_tokenizer())


def test_assistant_only_loss_needs_an_assistant_turn():
    dataset = Dataset.from_dict({"messages": [_chat("a", "b"), [{"role": "user", "content": "no answer"}]]})
    with pytest.raises(ValueError, match="example 1 has no token in its assistant mask"):
        prepare_sft_dataset(dataset, byte_level_tokenizer(), assistant_only_loss=True)


def test_assistant_only_loss_needs_conversations():
    with pytest.raises(ValueError, match="assistant_only_loss=True needs a conversational dataset"):
        prepare_sft_dataset(DATASETS["prompt_completion"](), byte_level_tokenizer(), assistant_only_loss=True)


def test_packing_needs_max_length_and_truncation_mode_is_checked():
    with pytest.raises(ValueError, match="packing=True needs max_length"):
        prepare_sft_dataset(DATASETS["text"](), byte_level_tokenizer(), packing=True, max_length=None)
    with pytest.raises(ValueError, match="truncation_mode 'middle' is not one of: keep_start, keep_end"):
        prepare_sft_dataset(DATASETS["text"](), byte_level_tokenizer(), truncation_mode="middle")


def test_formatting_func_output_is_what_is_trained_on():
    """Even on a prompt-completion dataset (where TRL 1.16 ignores the formatted text and tokenizes the prompt and
    completion), the formatted text plus eos is the example."""
    tokenizer = byte_level_tokenizer()
    dataset = DATASETS["prompt_completion"]()
    prepared = prepare_sft_dataset(
        dataset, tokenizer, formatting_func=lambda ex: f"Q:{ex['prompt']} A:{ex['completion']}"
    )
    assert tokenizer.decode(prepared[0]["input_ids"]) == "Q:2+2= A:4<|im_end|>"
    assert prepared[0]["labels"] == prepared[0]["input_ids"]


def test_formatting_func_on_a_tokenized_dataset_warns():
    with pytest.warns(UserWarning, match="formatting_func is not used"):
        prepare_sft_dataset(DATASETS["tokenized"](), byte_level_tokenizer(), formatting_func=str)


@pytest.mark.parametrize(
    "template, expected",
    [
        ("{% generation %}x{% endgeneration %}", True),
        ("{%- generation -%}x{%- endgeneration -%}", True),
        ({"default": "{%generation%}x{%endgeneration%}", "tool_use": ""}, True),
        ("{{ messages }}", False),
        (None, False),
    ],
)
def test_has_generation_markers(template, expected):
    assert has_generation_markers(template) is expected


def test_stop_token_check():
    tokenizer = byte_level_tokenizer()
    assert is_stop_token_trained(tokenizer)
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}",
        "{% generation %}{{- message['content'] }}{% endgeneration %}{{- '<|im_end|>' }}",
    )
    assert not is_stop_token_trained(tokenizer)


def test_set_chat_template_from_a_jinja_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    model, tokenizer = tiny_causal_lm()
    assert set_chat_template(model, tokenizer, str(path)) == []
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[hi]"


def test_set_chat_template_from_a_tokenizer_clones_tokens_and_resizes(tmp_path):
    source = byte_level_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|turn|>"]})
    source.eos_token = "<|turn|>"
    source.chat_template = "{% for m in messages %}{{ m['content'] }}<|turn|>{% endfor %}"
    source.save_pretrained(tmp_path)
    model, tokenizer = tiny_causal_lm()
    added = set_chat_template(model, tokenizer, str(tmp_path))
    assert added[0].content == "<|turn|>"
    assert tokenizer.eos_token == "<|turn|>" and model.config.eos_token_id == tokenizer.convert_tokens_to_ids(
        "<|turn|>"
    )
    assert model.vocab_size == 320 == len(tokenizer.vocab)  # 260 rounded up to a multiple of 64, with fillers
    assert tokenizer.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "a<|turn|>"


# ---- bad and mixed inputs ----


def _ids_alone(row: dict, **options) -> dict:
    """A row prepared as a dataset of its own (its unused columns dropped)."""
    columns = {key: [value] for key, value in row.items() if value is not None}
    return prepare_sft_dataset(Dataset.from_dict(columns), byte_level_tokenizer(), **options)[0]


MIXED = {
    "messages-then-text": {"messages": [_chat("a", "b"), None], "text": [None, "plain text"]},
    "text-then-messages": {"messages": [None, _chat("a", "b")], "text": ["plain text", None]},
    "prompt_completion-and-messages": {
        "prompt": ["2+2=", None], "completion": ["4", None], "messages": [None, _chat("c", "d")]
    },
    "conversations-and-text": {
        "conversations": [[{"from": "user", "value": "a"}, {"from": "assistant", "value": "b"}], None],
        "text": [None, "plain"],
    },
}  # fmt: skip


@pytest.mark.parametrize("columns", MIXED.values(), ids=MIXED.keys())
def test_rows_mixing_formats_are_each_prepared_in_their_own(columns):
    """TRL 1.16 picks the format from row 0: it crashes when that row is plain text and, when it is chat, leaves the
    text rows without eos; each row here is prepared as it would be alone."""
    dataset = Dataset.from_dict(columns)
    prepared = prepare_sft_dataset(dataset, byte_level_tokenizer(), completion_only_loss=True)
    for i, row in enumerate(dataset):
        alone = _ids_alone(row, completion_only_loss=True)
        assert {k: prepared[i][k] for k in ("input_ids", "labels")} == {k: alone[k] for k in ("input_ids", "labels")}
    texts = [byte_level_tokenizer().decode(ids) for ids in prepared["input_ids"]]
    assert all(text.endswith(("<|im_end|>", "<|im_end|>\n")) for text in texts)


@pytest.mark.parametrize(
    "columns, expected",
    [
        ({"text": ["a", None]}, "train dataset row 1 has nothing to train on: 'text' is None"),
        ({"prompt": ["a", "b"], "completion": ["c", None]}, "train dataset row 1: 'completion' is None"),
        ({"prompt": [None, "b"], "completion": ["c", "d"]}, "train dataset row 0: 'prompt' is None"),
        ({"messages": [_chat("a", "b"), None], "text": [None, None]}, "row 1 has nothing to train on: 'messages' is None"),
        ({"prompt": [[{"role": "user", "content": "a"}]], "completion": ["plain"]},
         "the 'prompt' is a list of chat messages but the 'completion' is str 'plain': prompt and completion must both"),
    ],
    ids=["text-None", "completion-None", "prompt-None", "all-None", "chat-prompt-text-completion"],
)  # fmt: skip
def test_a_row_with_nothing_to_train_on_is_named(columns, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        prepare_sft_dataset(Dataset.from_dict(columns), byte_level_tokenizer())


def test_assistant_only_loss_names_a_plain_row_among_conversations():
    dataset = Dataset.from_dict(MIXED["messages-then-text"])
    with pytest.raises(ValueError, match="needs conversational rows, and train dataset row 1 is plain text"):
        prepare_sft_dataset(dataset, byte_level_tokenizer(), assistant_only_loss=True)


def test_formatting_func_must_return_text():
    with pytest.raises(TypeError, match="formatting_func returned NoneType None for train dataset row 0"):
        prepare_sft_dataset(DATASETS["text"](), byte_level_tokenizer(), formatting_func=lambda example: None)


def test_all_empty_texts_are_refused():
    with pytest.raises(ValueError, match="every 'body' \\(dataset_text_field\\) of the eval dataset is empty"):
        prepare_sft_dataset(
            Dataset.from_dict({"body": ["", None, ""]}), byte_level_tokenizer(), dataset_text_field="body", name="eval"
        )
    some = prepare_sft_dataset(Dataset.from_dict({"text": ["", "x"]}), byte_level_tokenizer())
    assert len(some) == 2


def test_rows_whose_prompt_fills_max_length_are_dropped_with_a_count():
    dataset = Dataset.from_dict({"prompt": ["a long prompt", "ab", "a very long prompt"], "completion": ["b"] * 3})
    options = {"completion_only_loss": True, "max_length": 6}
    with pytest.warns(UserWarning, match="dropped 2 of 3 rows of the train dataset that have no token left in the loss "
                      "after truncation to max_length=6"):  # fmt: skip
        prepared = prepare_sft_dataset(dataset, byte_level_tokenizer(), **options)
    assert len(prepared) == 1
    with pytest.warns(UserWarning, match="dropped rows of the train dataset that have no token left"):
        streamed = list(prepare_sft_dataset(dataset.to_iterable_dataset(), byte_level_tokenizer(), **options))
    assert [row["input_ids"] for row in streamed] == prepared["input_ids"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_sft_dataset(dataset, byte_level_tokenizer(), completion_only_loss=True, max_length=32)
