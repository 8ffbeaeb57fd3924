"""SFT dataset preparation: dataset formats, chat templates, tokenization, loss masks, truncation and packing.

The formats SFT reads (as TRL 1.16), in the order they are looked for in the first example:

- pre-tokenized: "input_ids", with optional "labels" (used as is) or "assistant_masks" / "completion_mask" columns
  (folded into the labels; the completion mask only with completion_only_loss);
- prompt-completion: "prompt" and "completion", plain strings or lists of chat messages;
- conversational language modeling: "messages" (or "conversations", in role/content or from/value form);
- language modeling: a text column, `dataset_text_field` ("text").

`formatting_func(example) -> str` turns any other example into language-modeling text. A "tools" column (a list,
or its JSON string) and a "chat_template_kwargs" column (a dict) are passed to the chat template.

Every prepared example holds "input_ids" and "labels" (-100 on tokens out of the loss); packed rows add "seq_lengths".
"""

import json
import os
import re
import warnings

from datasets import Dataset
from transformers import AddedToken, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .common import common_prefix_length, is_conversational
from .packing import pack_dataset

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MASK_COLUMNS = ("completion_mask", "assistant_masks")


def has_generation_markers(chat_template: str | dict | None) -> bool:
    """Whether a chat template marks assistant output with {% generation %} (what assistant_only_loss needs).

    Example:
        >>> has_generation_markers("{% generation %}{{ m }}{% endgeneration %}")
        True
    """
    if isinstance(chat_template, dict):
        chat_template = chat_template.get("default")
    return chat_template is not None and _GENERATION_MARKER.search(chat_template) is not None


def check_assistant_only_loss(example: dict, tokenizer: PreTrainedTokenizerBase, dataset_text_field: str = "text"):
    """Raise unless assistant_only_loss can work: a conversational dataset (`example` is its first row) and a chat
    template with {% generation %} markers. Warns when the markers leave out the assistant's end-of-turn token.

    Example:
        >>> check_assistant_only_loss({"text": "2+2=4"}, tokenizer)
        ValueError: assistant_only_loss=True needs a conversational dataset (lists of chat messages)
    """
    if not _is_chat(dataset_format(example, dataset_text_field), example):
        raise ValueError("assistant_only_loss=True needs a conversational dataset (lists of chat messages)")
    if not has_generation_markers(tokenizer.chat_template):
        raise ValueError(
            "assistant_only_loss=True needs a chat template that wraps assistant turns in {% generation %} ... "
            "{% endgeneration %}, and the processing class's chat template has no such markers. Add them to the template "
            "(or pass one with chat_template_path), or set assistant_only_loss=False."
        )
    if not is_stop_token_trained(tokenizer):
        warnings.warn(
            "The chat template leaves the assistant's end-of-turn token out of the assistant mask, so with "
            "assistant_only_loss the model never learns to stop; move it inside {% generation %} ... {% endgeneration %}",
            stacklevel=4,
        )


def _is_chat(kind: str, example: dict) -> bool:
    return kind == "messages" or (kind == "prompt_completion" and is_conversational(example))


def is_stop_token_trained(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the assistant mask of the chat template covers the token that ends an assistant turn.

    A template can mark the assistant's content but leave its end-of-turn token outside {% generation %}; a model
    trained with assistant_only_loss on it never learns to stop. The last masked non-blank token must be a special
    (added) token.

    Example:
        >>> is_stop_token_trained(byte_level_tokenizer())   # "{% generation %}...<|im_end|>{% endgeneration %}"
        True
    """
    messages = [{"role": role, "content": "dummy"} for role in ("user", "assistant", "user")]
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    added_ids = set(tokenizer.get_added_vocab().values())
    masked = [token for token, bit in zip(out["input_ids"], out["assistant_masks"]) if bit]
    for token in reversed(masked):
        if tokenizer.decode([token]).strip():
            return token in added_ids
    return False


def set_chat_template(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str) -> list[AddedToken]:
    """Give `tokenizer` the chat template at `path`, as TRL's chat_template_path does; returns the tokens it added.

    A ".jinja" / ".j2" file is read as the template. Anything else is loaded as a tokenizer (local path or hub id):
    its template, its added tokens and its eos token are copied over, and the model's embeddings are resized to the
    new vocabulary, rounded up to a multiple of 64 with filler tokens "<extra_id_N>".

    Example:
        >>> set_chat_template(model, tokenizer, "templates/chatml.jinja")
        []
    """
    if os.path.isfile(path) and path.endswith((".jinja", ".j2")):
        with open(path, encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
        return []
    source = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = source.get_chat_template()
    added = [token for token in source.added_tokens_decoder.values() if token.content not in tokenizer.vocab]
    tokenizer.add_tokens(added)
    tokenizer.eos_token = source.eos_token
    model.config.get_text_config().eos_token_id = tokenizer.eos_token_id
    if model.can_generate():
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.resize_token_embeddings(new_num_tokens=len(tokenizer.vocab), pad_to_multiple_of=64)
    index = 0
    while model.vocab_size > len(tokenizer.vocab):
        filler = AddedToken(f"<extra_id_{index}>")
        if tokenizer.add_tokens(filler):
            added.append(filler)
        index += 1
    return added


def dataset_format(example: dict, dataset_text_field: str = "text", formatting_func=None, name: str = "train") -> str:
    """Which SFT format `example` (a dataset's first row) is in: "tokenized", "formatted", "prompt_completion",
    "messages" or "text". Raises a ValueError listing the columns looked for when it is none of them.

    Example:
        >>> dataset_format({"prompt": "2+2=", "completion": "4"})
        'prompt_completion'
    """
    if "input_ids" in example:
        return "tokenized"
    if formatting_func is not None:
        return "formatted"
    if "prompt" in example and "completion" in example:
        return "prompt_completion"
    if any(is_conversational({"messages": example.get(key)}) for key in ("messages", "conversations")):
        return "messages"
    if _is_from_value(example.get("conversations")):
        return "messages"
    if dataset_text_field in example:
        return "text"
    raise ValueError(
        f"The {name} dataset has none of the columns SFT reads. It looked for: 'input_ids' (pre-tokenized), 'prompt' "
        f"and 'completion' (prompt-completion), 'messages' or 'conversations' (lists of chat messages), "
        f"{dataset_text_field!r} (text; dataset_text_field). The dataset's columns are: {sorted(example)}. Rename a "
        "column, set dataset_text_field, or pass a formatting_func that returns the text of an example."
    )


def _is_from_value(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict) and "from" in messages[0]


def _messages(example: dict) -> list[dict]:
    messages = example["messages"] if "messages" in example else example["conversations"]
    if not _is_from_value(messages):
        return messages
    return [
        {("role" if k == "from" else "content" if k == "value" else k): v for k, v in message.items()}
        for message in messages
    ]


def _template_kwargs(example: dict) -> dict:
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools or None, **(example.get("chat_template_kwargs") or {})}


def _with_eos(text: str, eos_token: str | None) -> str:
    return text if eos_token is None or text.endswith(eos_token) else text + eos_token


def _prompt_completion_ids(example, tokenizer, eos_token, assistant_only_loss) -> dict:
    """input_ids of prompt + completion, completion_mask, and assistant_masks (conversational, assistant_only_loss)."""
    out = {}
    if is_conversational(example):
        kwargs = _template_kwargs(example)
        prompt_ids = tokenizer.apply_chat_template(
            example["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True, **kwargs
        )["input_ids"]
        full = tokenizer.apply_chat_template(
            example["prompt"] + example["completion"],
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=assistant_only_loss,
            **kwargs,
        )
        ids = full["input_ids"]
        if assistant_only_loss:
            out["assistant_masks"] = full["assistant_masks"]
    else:
        prompt_ids = tokenizer(text=example["prompt"])["input_ids"]
        ids = tokenizer(text=example["prompt"] + _with_eos(example["completion"], eos_token))["input_ids"]
    # Where the prompt alone tokenizes differently (a template quirk, a token merging across the boundary), the
    # completion starts where the two diverge
    prompt_len = common_prefix_length(prompt_ids, ids)
    if prompt_len < len(prompt_ids):
        warnings.warn(
            "The tokenized prompt is not a prefix of the tokenized prompt + completion; the completion is taken to "
            f"start where they diverge, so these prompt tokens are left out: {tokenizer.decode(prompt_ids[prompt_len:])!r}",
            stacklevel=2,
        )
    out["input_ids"] = ids
    out["completion_mask"] = [0] * prompt_len + [1] * (len(ids) - prompt_len)
    return out


def _example_ids(example, kind, tokenizer, text_field, formatting_func, eos_token, assistant_only_loss) -> dict:
    if kind == "formatted":
        return {"input_ids": tokenizer(text=_with_eos(formatting_func(example), eos_token))["input_ids"]}
    if kind == "prompt_completion":
        return _prompt_completion_ids(example, tokenizer, eos_token, assistant_only_loss)
    if kind == "messages":
        out = tokenizer.apply_chat_template(
            _messages(example),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=assistant_only_loss,
            **_template_kwargs(example),
        )
        return {key: out[key] for key in ("input_ids", "assistant_masks") if key in out}
    return {"input_ids": tokenizer(text=_with_eos(example[text_field], eos_token))["input_ids"]}


def _labels(example: dict, mask_columns: list[str]) -> list[int]:
    masks = [example[column] for column in mask_columns]
    return [token if all(bits) else -100 for token, *bits in zip(example["input_ids"], *masks)]


def _mask_columns(columns, completion_only_loss: bool) -> list[str]:
    return [c for c in _MASK_COLUMNS if c in columns and (c == "assistant_masks" or completion_only_loss)]


def _finish(example: dict, completion_only_loss: bool, truncation: slice | None) -> dict:
    labels = (
        example["labels"] if "labels" in example else _labels(example, _mask_columns(example, completion_only_loss))
    )
    ids = example["input_ids"]
    if truncation is not None:
        ids, labels = ids[truncation], labels[truncation]
    return {"input_ids": ids, "labels": labels}


def _tokenize(example, index, kind, tokenizer, text_field, formatting_func, eos_token, loss_masks, truncation):
    assistant_only_loss, completion_only_loss = loss_masks
    ids = _example_ids(example, kind, tokenizer, text_field, formatting_func, eos_token, assistant_only_loss)
    if assistant_only_loss and 1 not in ids["assistant_masks"]:
        raise ValueError(
            f"assistant_only_loss=True, but example {index} has no token in its assistant mask: the chat template's "
            "{% generation %} markers cover none of its tokens (does it have an assistant turn?)"
        )
    return _finish(ids, completion_only_loss, truncation)


def first_example(dataset, name: str = "train") -> dict:
    """The first example of a Dataset or IterableDataset; a ValueError naming the dataset when it is empty.

    Example:
        >>> first_example(Dataset.from_dict({"text": []}), "eval")
        ValueError: The eval dataset is empty: SFT needs at least one example
    """
    try:
        return next(iter(dataset))
    except StopIteration:
        raise ValueError(f"The {name} dataset is empty: SFT needs at least one example") from None


def prepare_sft_dataset(
    dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    dataset_text_field: str = "text",
    formatting_func=None,
    completion_only_loss: bool = False,
    assistant_only_loss: bool = False,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    packing: bool = False,
    packing_strategy: str = "bfd",
    shuffle: bool = False,
    seed: int = 42,
    num_proc: int | None = None,
    name: str = "train",
):
    """Tokenize `dataset` (a Dataset or IterableDataset in one of the SFT formats) into "input_ids" and "labels".

    Plain text and completions get the tokenizer's eos_token appended (chat templates end turns themselves).
    Labels are -100 outside the completion (completion_only_loss), outside assistant turns (assistant_only_loss).
    Without packing, sequences are truncated to max_length (keeping the start or the end) and examples left with no
    label are dropped. With packing, sequences are packed into max_length rows with `packing_strategy`.

    Example:
        >>> ds = prepare_sft_dataset(Dataset.from_dict({"prompt": ["2+2="], "completion": ["4"]}), tokenizer,
        ...                          completion_only_loss=True)
        >>> ds[0]["labels"]        # the prompt's 4 tokens masked, then "4" and the eos token
        [-100, -100, -100, -100, 19, 258]
    """
    if isinstance(dataset, Dataset) and dataset.format["type"] == "custom":
        raise ValueError(
            f"The {name} dataset uses Dataset.with_transform(), which SFT preparation (Dataset.map) would bake into "
            "the tokenized columns; apply the transform with Dataset.map first, or pass "
            "dataset_kwargs={'skip_prepare_dataset': True} with trainer-ready examples"
        )
    if packing and max_length is None:
        raise ValueError("packing=True needs max_length (the packed row length), got None")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode {truncation_mode!r} is not one of: keep_start, keep_end")
    example = first_example(dataset, name)
    kind = dataset_format(example, dataset_text_field, formatting_func, name)
    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}
    truncation = None
    if max_length is not None and not packing:
        truncation = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    if kind == "tokenized":
        if formatting_func is not None:
            warnings.warn(f"The {name} dataset is already tokenized (it has input_ids): formatting_func is not used")
        masks = [] if "labels" in example else _mask_columns(example, completion_only_loss)
        dataset = dataset.map(
            _finish,
            fn_kwargs={"completion_only_loss": completion_only_loss, "truncation": truncation},
            remove_columns=masks or None,
            **_describe(dataset, f"Building labels of the {name} dataset", map_kwargs),
        )
    else:
        if assistant_only_loss and not _is_chat(kind, example):
            raise ValueError(f"assistant_only_loss=True needs a conversational dataset; the {name} dataset is not")
        eos_token = None if _is_chat(kind, example) else tokenizer.eos_token
        fn_kwargs = {
            "kind": kind,
            "tokenizer": tokenizer,
            "text_field": dataset_text_field,
            "formatting_func": formatting_func,
            "eos_token": eos_token,
            "loss_masks": (assistant_only_loss, completion_only_loss),
            "truncation": truncation,
        }
        dataset = dataset.map(
            _tokenize,
            with_indices=True,
            fn_kwargs=fn_kwargs,
            **_describe(dataset, f"Tokenizing the {name} dataset", map_kwargs),
        )
    if truncation is not None:
        dataset = dataset.filter(
            _has_label, **_describe(dataset, f"Dropping examples with no label left in the {name} dataset", map_kwargs)
        )
        _check_not_emptied(dataset, name, max_length)
    if packing:
        dataset = dataset.select_columns(["input_ids", "labels"])
        if shuffle:
            dataset = dataset.shuffle(seed=seed)
        dataset = pack_dataset(
            dataset, max_length, packing_strategy, _describe(dataset, f"Packing the {name} dataset", map_kwargs)
        )
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    return dataset


def _has_label(example: dict) -> bool:
    return any(label != -100 for label in example["labels"])


def _check_not_emptied(dataset, name: str, max_length: int) -> None:
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(
            f"No example of the {name} dataset has a token left in the loss after truncation to max_length="
            f"{max_length} (the prompts fill it?): raise max_length or shorten the prompts"
        )


def _describe(dataset, desc: str, map_kwargs: dict) -> dict:
    # IterableDataset.map / filter take neither desc nor num_proc
    return {**map_kwargs, "desc": desc} if isinstance(dataset, Dataset) else dict(map_kwargs)
