"""Training chat templates: for each known family, the marked version renders exactly the original's text, and its
assistant mask covers exactly what the assistant writes (content, reasoning, tool calls, end-of-turn token).

The originals are the model vendors' templates as TRL 1.16 (a dev dependency) stores them for its own matching.
"""

import warnings
from pathlib import Path

import pytest
import trl
from datasets import Dataset
from transformers import AutoModelForCausalLM

from posttrain.data.chat_templates import (
    KNOWN_TEMPLATES,
    has_generation_markers,
    known_template,
    training_chat_template,
)
from posttrain.data.sft import check_assistant_only_loss, is_stop_token_trained, prepare_sft_dataset
from posttrain.models import byte_level_tokenizer

ORIGINALS = Path(trl.__file__).parent / "chat_templates"

# family: (original file, special tokens, assistant header (the generation prompt), end-of-turn token)
FAMILIES = {
    "Qwen2.5": ("qwen2_5", [], "<|im_start|>assistant\n", "<|im_end|>"),
    "Qwen3": ("qwen3", [], "<|im_start|>assistant\n", "<|im_end|>"),
    "Qwen3-Instruct-2507": ("qwen3_instruct_2507", [], "<|im_start|>assistant\n", "<|im_end|>"),
    "Llama 3": ("llama3", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "Llama 3.1": ("llama3_1", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
                  "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "Llama 3.2": ("llama3_2", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                  "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "Gemma": ("gemma", ["<start_of_turn>", "<end_of_turn>"], "<start_of_turn>model\n", "<end_of_turn>"),
    "Gemma 3": ("gemma3", ["<start_of_turn>", "<end_of_turn>", "<start_of_image>"], "<start_of_turn>model\n",
                "<end_of_turn>"),
    "Phi-3": ("phi3", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|assistant|>\n", "<|end|>"),
    "Phi-3.5": ("phi3_5", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "<|assistant|>\n", "<|end|>"),
}  # fmt: skip


def _original(family: str) -> str:
    return (ORIGINALS / f"{FAMILIES[family][0]}.jinja").read_text(encoding="utf-8")


def _tokenizer(family: str):
    """The byte-level tokenizer with the family's special tokens, a bos token, and the family's original template."""
    tokenizer = byte_level_tokenizer()
    tokenizer.add_special_tokens({"bos_token": "<bos>", "additional_special_tokens": FAMILIES[family][1]})
    tokenizer.chat_template = _original(family)
    return tokenizer


def _user(content):
    return {"role": "user", "content": content}


def _assistant(content, **fields):
    return {"role": "assistant", "content": content, **fields}


CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add", "parameters": {"type": "object"}}}]
CONVERSATIONS = {
    "two turns": [_user("2+2?"), _assistant("4"), _user("and 2+3?"), _assistant("5")],
    "system": [{"role": "system", "content": "Be brief."}, _user("hi"), _assistant("hello")],
    "empty system": [{"role": "system", "content": ""}, _user("hi"), _assistant("hello")],
    "whitespace": [_user("  padded \n"), _assistant("\n  spaced out  \n")],
    "tool call": [_user("2+2?"), _assistant("", tool_calls=[CALL]), {"role": "tool", "content": "4"},
                  {"role": "tool", "content": "checked"}, _assistant("It is 4.")],
    "tool calls with content": [_user("2+2?"), _assistant("Adding.", tool_calls=[CALL, CALL]),
                                {"role": "tool", "content": "4"}, _assistant("4")],
    "tool result mapping": [_user("2+2?"), _assistant("", tool_calls=[CALL]), {"role": "tool", "content": {"sum": 4}},
                            _assistant("4")],
    "reasoning": [_user("q1"), _assistant("<think>\nhmm\n</think>\n\nA1"), _user("q2"),
                  _assistant("A2", reasoning_content="r2")],
    "ends with the user": [_user("a"), _assistant("b"), _user("c")],
    "content blocks": [_user([{"type": "text", "text": " hi "}]), _assistant([{"type": "text", "text": "yo "}])],
    "roles out of order": [_assistant("first"), _user("then")],
}  # fmt: skip
TEMPLATE_KWARGS = {
    "plain": {},
    "tools": {"tools": TOOLS},
    "no thinking": {"enable_thinking": False},
    "builtin tools": {"builtin_tools": ["wolfram_alpha"]},
}


def _render(tokenizer, messages, template, **kwargs) -> str:
    """The rendered text, or the error's type: both templates must fail alike where the original refuses a conversation."""
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    except Exception as err:  # noqa: BLE001 - the original's refusal, whatever its type, is part of its behaviour
        return f"<raised {type(err).__name__}>"


def _masked_spans(tokenizer, messages, template, **kwargs) -> list[tuple[str, str]]:
    """(the text before, the masked text) of each run of tokens in the assistant mask."""
    out = tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, **kwargs
    )
    ids, bits = out["input_ids"], out["assistant_masks"] + [0]
    starts = [i for i in range(len(ids)) if bits[i] and (i == 0 or not bits[i - 1])]
    ends = [i + 1 for i in range(len(ids)) if bits[i] and not bits[i + 1]]
    return [(tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:end])) for start, end in zip(starts, ends)]


def _masked_segments(tokenizer, messages, template, **kwargs) -> list[str]:
    return [segment for _, segment in _masked_spans(tokenizer, messages, template, **kwargs)]


def test_every_known_template_has_a_test_family():
    assert sorted(known.family for known in KNOWN_TEMPLATES) == sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_original_is_recognized_by_its_exact_text(family):
    original = _original(family)
    assert known_template(original).family == family
    assert known_template(original + " ") is None
    assert known_template({"default": original, "tool_use": "x"}).family == family


@pytest.mark.parametrize("kwargs", TEMPLATE_KWARGS.values(), ids=TEMPLATE_KWARGS.keys())
@pytest.mark.parametrize("generation_prompt", [False, True], ids=["full", "generation-prompt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_training_template_renders_the_same_text(family, generation_prompt, kwargs):
    tokenizer = _tokenizer(family)
    original = _original(family)
    marked = training_chat_template(original)
    assert marked != original and has_generation_markers(marked)
    rendered = 0
    for name, messages in CONVERSATIONS.items():
        expected = _render(tokenizer, messages, original, add_generation_prompt=generation_prompt, **kwargs)
        assert _render(tokenizer, messages, marked, add_generation_prompt=generation_prompt, **kwargs) == expected, name
        rendered += not expected.startswith("<raised")
    assert rendered >= 5, "most conversations must render, or the comparison tests little"


# What the assistant wrote in CONVERSATIONS["two turns"], as each family renders it
TWO_TURNS = {
    "Qwen3": ["4<|im_end|>", "<think>\n\n</think>\n\n5<|im_end|>"],  # Qwen3 renders an empty think block last
    **{family: [f"4{eot}", f"5{eot}"] for family, (*_, eot) in FAMILIES.items() if family != "Qwen3"},
}
TOOL_CALL = {
    "Qwen2.5": ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>',
                "It is 4.<|im_end|>"],
    "Qwen3": ['<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>',
              "<think>\n\n</think>\n\nIt is 4.<|im_end|>"],
    "Llama 3.1": ['{"name": "add", "parameters": {"a": 2, "b": 2}}<|eot_id|>', "It is 4.<|eot_id|>"],
    "Llama 3.2": ['{"name": "add", "parameters": {"a": 2, "b": 2}}<|eot_id|>', "It is 4.<|eot_id|>"],
}  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_mask_covers_exactly_what_the_assistant_writes(family):
    tokenizer = _tokenizer(family)
    marked = training_chat_template(_original(family))
    assert _masked_segments(tokenizer, CONVERSATIONS["two turns"], marked) == TWO_TURNS[family]
    if family in TOOL_CALL:
        assert _masked_segments(tokenizer, CONVERSATIONS["tool call"], marked, tools=TOOLS) == TOOL_CALL[family]
    if family == "Qwen3":
        segments = _masked_segments(tokenizer, CONVERSATIONS["reasoning"], marked)
        assert segments == ["A1<|im_end|>", "<think>\nr2\n</think>\n\nA2<|im_end|>"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_masked_span_follows_the_assistant_header_and_ends_the_turn(family):
    """On every conversation the family renders: one span per assistant message, right after the assistant header
    (the generation prompt, left out of the loss) and ending with the end-of-turn token (so the model learns to stop)."""
    tokenizer = _tokenizer(family)
    marked = training_chat_template(_original(family))
    _, _, header, end_of_turn = FAMILIES[family]
    checked = 0
    for name, messages in CONVERSATIONS.items():
        kwargs = {"tools": TOOLS} if "tool" in name else {}
        if _render(tokenizer, messages, marked, **kwargs).startswith("<raised"):
            continue
        spans = _masked_spans(tokenizer, messages, marked, **kwargs)
        assert len(spans) == sum(m["role"] == "assistant" for m in messages), name
        for before, segment in spans:
            assert before.endswith(header) and segment.endswith(end_of_turn), (name, segment)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_trains_on_the_assistant_turns_of_a_known_template(family):
    tokenizer = _tokenizer(family)
    original = tokenizer.chat_template
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the end-of-turn token is in the mask: no stop-token warning
        marked = check_assistant_only_loss({"messages": CONVERSATIONS["two turns"]}, tokenizer)
    assert marked == training_chat_template(original) and is_stop_token_trained(tokenizer, marked)
    dataset = Dataset.from_dict({"messages": [CONVERSATIONS["two turns"]]})
    row = prepare_sft_dataset(dataset, tokenizer, assistant_only_loss=True)[0]
    trained = tokenizer.decode([token for token in row["labels"] if token != -100])
    assert trained == "".join(TWO_TURNS[family])
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(
        CONVERSATIONS["two turns"], tokenize=False
    )
    assert tokenizer.chat_template == original, "the tokenizer keeps the model's own template"


def test_a_template_with_markers_is_used_as_is():
    tokenizer = byte_level_tokenizer()
    assert training_chat_template(tokenizer.chat_template) is None
    assert training_chat_template({"default": tokenizer.chat_template, "tool_use": "x"}) is None
    assert check_assistant_only_loss({"messages": CONVERSATIONS["two turns"]}, tokenizer) is None


@pytest.mark.parametrize(
    "template, what",
    [(_original("Qwen2.5").replace("Alibaba Cloud", "Alibaba  Cloud"), "has a chat template"), (None, "has no chat")],
    ids=["edited-known-template", "no-template"],
)
def test_an_unknown_template_is_refused_with_the_known_families(template, what):
    tokenizer = byte_level_tokenizer()
    tokenizer.chat_template = template
    with pytest.raises(ValueError, match=f"{what} .*not one of the templates posttrain has a marked version of") as err:
        check_assistant_only_loss({"messages": CONVERSATIONS["two turns"]}, tokenizer)
    assert "Qwen3" in str(err.value) and "set assistant_only_loss=False" in str(err.value)


# TRL 1.16's own training templates render these like the originals (its Qwen3 one does not: it renders the think
# block of every turn, to be prefix-preserving)
TRL_RENDERS_LIKE_THE_ORIGINAL = ["Qwen2.5", "Llama 3", "Gemma", "Phi-3", "Phi-3.5"]


@pytest.mark.parametrize("family", TRL_RENDERS_LIKE_THE_ORIGINAL)
def test_same_tokens_as_trl_and_its_mask_less_the_template_glue(family, tiny_model_dir, tmp_path):
    """TRL 1.16 also swaps in a marked template for assistant_only_loss. Same input_ids; TRL's mask also takes the
    newline before the content and after the end-of-turn token, and Phi-3's closing eos, which the model never
    generates (inference stops at the end-of-turn token): posttrain's mask is TRL's without them."""
    import posttrain

    dataset = Dataset.from_dict({"messages": [CONVERSATIONS["two turns"], CONVERSATIONS["whitespace"]]})
    prepared = {}
    for lib in (trl, posttrain):
        args = lib.SFTConfig(output_dir=str(tmp_path / lib.__name__), assistant_only_loss=True, bf16=False,
                             report_to="none")  # fmt: skip
        tokenizer = _tokenizer(family)
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        model.resize_token_embeddings(len(tokenizer))  # the family's special tokens are new to the tiny model
        trainer = lib.SFTTrainer(model, args=args, train_dataset=dataset, processing_class=tokenizer)
        prepared[lib.__name__] = trainer.train_dataset.to_list()
    tokenizer = _tokenizer(family)
    for ours, theirs in zip(prepared["posttrain"], prepared["trl"], strict=True):
        assert ours["input_ids"] == theirs["input_ids"]
        assert all(label in (-100, trl_label) for label, trl_label in zip(ours["labels"], theirs["labels"]))
        only_trl = [t for label, t in zip(ours["labels"], theirs["labels"]) if label == -100 and t != -100]
        assert tokenizer.decode(only_trl).replace(tokenizer.eos_token, "").strip() == ""
