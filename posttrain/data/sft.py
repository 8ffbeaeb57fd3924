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
import warnings

import pyarrow.compute as pc
from datasets import Dataset
from transformers import AddedToken, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .chat_templates import training_chat_template
from .common import common_prefix_length, conversation_keys, drop_rows, is_conversational, with_eos
from .packing import pack_dataset

_MASK_COLUMNS = ("completion_mask", "assistant_masks")
_CHAT_COLUMNS = ("messages", "conversations")


def check_assistant_only_loss(
    example: dict, tokenizer: PreTrainedTokenizerBase, dataset_text_field: str = "text"
) -> str | None:
    """Check that assistant_only_loss can work, and return the chat template the data are tokenized with (None: the
    tokenizer's own).

    It needs a conversational dataset (`example` is its first row) and a chat template with {% generation %} markers:
    the tokenizer's own, or for a known template without them, the marked version that renders the same text (see
    posttrain.data.chat_templates; the tokenizer keeps its template). Raises ValueError otherwise. Warns when the
    markers leave out the assistant's end-of-turn token.

    Example:
        >>> check_assistant_only_loss({"text": "2+2=4"}, tokenizer)
        ValueError: assistant_only_loss=True needs a conversational dataset (lists of chat messages)
    """
    if not _is_chat(dataset_format(example, dataset_text_field), example):
        raise ValueError("assistant_only_loss=True needs a conversational dataset (lists of chat messages)")
    chat_template = training_chat_template(tokenizer.chat_template)
    if not is_stop_token_trained(tokenizer, chat_template):
        warnings.warn(
            "The chat template leaves the assistant's end-of-turn token out of the assistant mask, so with "
            "assistant_only_loss the model never learns to stop; move it inside {% generation %} ... {% endgeneration %}",
            stacklevel=4,
        )
    return chat_template


def _is_chat(kind: str, example: dict, name: str = "train") -> bool:
    return kind == "messages" or (kind == "prompt_completion" and _is_chat_prompt_completion(example, 0, name))


def _is_chat_prompt_completion(example: dict, index: int = 0, name: str = "train") -> bool:
    chat = conversation_keys(example, ("prompt", "completion"))
    if chat and len(chat) < 2:
        text = "completion" if chat == ["prompt"] else "prompt"
        raise ValueError(
            f"{name} dataset row {index}: the {chat[0]!r} is a list of chat messages but the {text!r} is "
            f"{type(example[text]).__name__} {example[text]!r:.60}: prompt and completion must both be text or both "
            "be chat messages"
        )
    return bool(chat)


def is_stop_token_trained(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> bool:
    """Whether the assistant mask of the chat template (`chat_template`, else the tokenizer's) covers the token that
    ends an assistant turn.

    A template can mark the assistant's content but leave its end-of-turn token outside {% generation %}; a model
    trained with assistant_only_loss on it never learns to stop. The last masked non-blank token must be a special
    (added) token.

    Example:
        >>> is_stop_token_trained(byte_level_tokenizer())   # "{% generation %}...<|im_end|>{% endgeneration %}"
        True
    """
    messages = [{"role": role, "content": "dummy"} for role in ("user", "assistant", "user")]
    out = tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
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

    The last three may be mixed in one dataset (a row's unused columns hold None): each row is then prepared in its
    own format.

    Example:
        >>> dataset_format({"prompt": "2+2=", "completion": "4"})
        'prompt_completion'
    """
    if "input_ids" in example:
        return "tokenized"
    if formatting_func is not None:
        return "formatted"
    has_pair = "prompt" in example and "completion" in example
    if not has_pair and not any(key in example for key in (*_CHAT_COLUMNS, dataset_text_field)):
        raise ValueError(
            f"The {name} dataset has none of the columns SFT reads. It looked for: 'input_ids' (pre-tokenized), "
            f"'prompt' and 'completion' (prompt-completion), 'messages' or 'conversations' (lists of chat messages), "
            f"{dataset_text_field!r} (text; dataset_text_field). The dataset's columns are: {sorted(example)}. Rename "
            "a column, set dataset_text_field, or pass a formatting_func that returns the text of an example."
        )
    return _row_format(example, dataset_text_field, 0, name)


def _row_format(example: dict, text_field: str, index: int, name: str) -> str:
    """The format of one row: "prompt_completion", "messages" or "text"; a ValueError naming the row when its
    columns hold nothing to train on (None)."""
    if "prompt" in example and "completion" in example and (example["prompt"], example["completion"]) != (None, None):
        for key in ("prompt", "completion"):
            if example[key] is None:
                raise ValueError(
                    f"{name} dataset row {index}: {key!r} is None (a prompt-completion row needs both a 'prompt' and "
                    "a 'completion')"
                )
        return "prompt_completion"
    if _chat_column(example) is not None:
        return "messages"
    text = example.get(text_field)
    if isinstance(text, str):
        return "text"
    present = [key for key in ("prompt", "completion", *_CHAT_COLUMNS, text_field) if key in example]
    values = ", ".join(f"{key!r} is {example[key]!r:.40}" for key in present)
    raise ValueError(
        f"{name} dataset row {index} has nothing to train on: {values} (expected a {text_field!r} string, a "
        "'prompt' and a 'completion', or a list of chat messages)"
    )


def _is_from_value(messages) -> bool:
    return isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict) and "from" in messages[0]


def _chat_column(example: dict) -> str | None:
    """The column holding the row's chat messages ("messages" or "conversations"), if any."""
    for key in _CHAT_COLUMNS:
        if is_conversational({"messages": example.get(key)}) or _is_from_value(example.get(key)):
            return key
    return None


def _messages(example: dict) -> list[dict]:
    messages = example[_chat_column(example)]
    if not _is_from_value(messages):
        return messages
    return [
        {("role" if k == "from" else "content" if k == "value" else k): v for k, v in message.items()}
        for message in messages
    ]


def _template_kwargs(example: dict, chat_template: str | None) -> dict:
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    return {"tools": tools or None, "chat_template": chat_template, **(example.get("chat_template_kwargs") or {})}


def _prompt_completion_ids(example, tokenizer, chat: bool, chat_template, assistant_only_loss) -> dict:
    """input_ids of prompt + completion, completion_mask, and assistant_masks (conversational, assistant_only_loss)."""
    out = {}
    if chat:
        kwargs = _template_kwargs(example, chat_template)
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
        ids = tokenizer(text=example["prompt"] + with_eos(example["completion"], tokenizer.eos_token))["input_ids"]
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


def _formatted_text(example: dict, index: int, formatting_func, name: str) -> str:
    text = formatting_func(example)
    if not isinstance(text, str):
        raise TypeError(
            f"formatting_func returned {type(text).__name__} {text!r:.40} for {name} dataset row {index}: it must "
            "return the example's text (a str)"
        )
    return text


def _example_ids(example, index, kind, tokenizer, options) -> dict:
    text_field, formatting_func, chat_template, assistant_only_loss, name = options
    if kind == "formatted":
        text = _formatted_text(example, index, formatting_func, name)
        return {"input_ids": tokenizer(text=with_eos(text, tokenizer.eos_token))["input_ids"]}
    chat = kind == "messages" or (kind == "prompt_completion" and _is_chat_prompt_completion(example, index, name))
    if assistant_only_loss and not chat:
        raise ValueError(
            f"assistant_only_loss=True needs conversational rows, and {name} dataset row {index} is plain text "
            f"({kind.replace('_', '-')})"
        )
    if kind == "prompt_completion":
        return _prompt_completion_ids(example, tokenizer, chat, chat_template, assistant_only_loss)
    if kind == "messages":
        out = tokenizer.apply_chat_template(
            _messages(example),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=assistant_only_loss,
            **_template_kwargs(example, chat_template),
        )
        return {key: out[key] for key in ("input_ids", "assistant_masks") if key in out}
    return {"input_ids": tokenizer(text=with_eos(example[text_field], tokenizer.eos_token))["input_ids"]}


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


def _tokenize(example, index, kind, tokenizer, options, completion_only_loss, truncation):
    """One row's input_ids and labels; `options` = (text_field, formatting_func, chat_template,
    assistant_only_loss, name)."""
    text_field, *_, assistant_only_loss, name = options
    if kind != "formatted":
        kind = _row_format(example, text_field, index, name)
    ids = _example_ids(example, index, kind, tokenizer, options)
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

    Each row is prepared in its own format (rows may mix text, prompt-completion and chat messages; a row with
    nothing to train on is a ValueError naming it). Plain text and completions get the tokenizer's eos_token appended
    (chat templates end turns themselves). Labels are -100 outside the completion (completion_only_loss) and outside
    assistant turns (assistant_only_loss, which tokenizes with `check_assistant_only_loss`'s chat template). Without
    packing, sequences are truncated to max_length (keeping the start or the end) and examples left with no label are
    dropped, with a warning that counts them. With packing, sequences are packed into max_length rows with
    `packing_strategy`. A text dataset whose texts are all empty is a ValueError.

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
        if assistant_only_loss and not _is_chat(kind, example, name):
            raise ValueError(f"assistant_only_loss=True needs a conversational dataset; the {name} dataset is not")
        _check_some_text(dataset, dataset_text_field, kind, name)
        chat_template = training_chat_template(tokenizer.chat_template) if assistant_only_loss else None
        fn_kwargs = {
            "kind": kind,
            "tokenizer": tokenizer,
            "options": (dataset_text_field, formatting_func, chat_template, assistant_only_loss, name),
            "completion_only_loss": completion_only_loss,
            "truncation": truncation,
        }
        dataset = dataset.map(
            _tokenize,
            with_indices=True,
            fn_kwargs=fn_kwargs,
            **_describe(dataset, f"Tokenizing the {name} dataset", map_kwargs),
        )
    if truncation is not None:
        dataset = _drop_unlabeled(dataset, name, max_length, map_kwargs)
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


def _check_some_text(dataset, text_field: str, kind: str, name: str) -> None:
    """A text dataset whose every text is empty would train on nothing (each row is only the eos token, which no
    token predicts) and log a loss of 0.0: refuse it. Datasets that mix in other formats are not checked."""
    other_columns = {"prompt", "completion", *_CHAT_COLUMNS} & set(dataset.column_names or ())
    if kind != "text" or not isinstance(dataset, Dataset) or other_columns:
        return
    longest = pc.max(pc.utf8_length(dataset.with_format("arrow")[text_field])).as_py()
    if not longest:
        raise ValueError(
            f"every {text_field!r} (dataset_text_field) of the {name} dataset is empty: there is nothing to train on "
            "(the loss would be 0.0 on 0 tokens)"
        )


def _has_label(example: dict) -> bool:
    return any(label != -100 for label in example["labels"])


def _dropped_message(count: str, name: str, max_length: int) -> str:
    return (
        f"dropped {count} of the {name} dataset that have no token left in the loss after truncation to max_length="
        f"{max_length} (the prompt fills it, or the loss-masked part is cut off): raise max_length or shorten the "
        "prompts"
    )


def _drop_unlabeled(dataset, name: str, max_length: int, map_kwargs: dict):
    """`dataset` without the rows truncation left with no label: counted in a warning, an error if none is left."""
    return drop_rows(
        dataset, _has_label, num_proc=map_kwargs.get("num_proc"),
        desc=f"Dropping examples with no label left in the {name} dataset",
        dropped=lambda count, total: _dropped_message(f"{count} of {total} rows", name, max_length),
        dropped_row=lambda row: _dropped_message("rows", name, max_length),
        none_left=lambda total: (
            f"No example of the {name} dataset has a token left in the loss after truncation to max_length="
            f"{max_length} (the prompts fill it?): raise max_length or shorten the prompts"
        ),
    )  # fmt: skip


def _describe(dataset, desc: str, map_kwargs: dict) -> dict:
    # IterableDataset.map / filter take neither desc nor num_proc
    return {**map_kwargs, "desc": desc} if isinstance(dataset, Dataset) else dict(map_kwargs)
