"""The text of a completion as reward functions receive it (a string, or a list of chat messages)."""


def completion_text(completion) -> str:
    """A standard completion is its own text; a conversational one ([{"role": "assistant", "content": ...}]) is the
    concatenated content of its messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and all(isinstance(m, dict) and "content" in m for m in completion):
        return "".join(m["content"] for m in completion)
    raise TypeError(
        "a completion must be a string or a list of {'role', 'content'} messages, got "
        f"{type(completion).__name__}: {completion!r:.80}"
    )
