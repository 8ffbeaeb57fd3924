"""Training versions of known chat templates: the same text, with {% generation %} around what the assistant writes.

`assistant_only_loss` needs a chat template that marks the assistant's output with {% generation %} ...
{% endgeneration %} (transformers' return_assistant_tokens_mask reads the markers), and most models ship templates
without them. For the templates recognized here, `training_chat_template` returns a version with the markers that
renders exactly the same text: the tokenizer keeps its own template (the one saved with the model and used at
inference), the training data are tokenized with the marked one.

A template is recognized by its exact text (a sha256 of it), so a model whose template was edited, even by one
character, is not. The marked span covers the assistant's whole output: its reasoning (where the template renders
it), its content, its tool calls and its end-of-turn token (so the model learns to stop), but not the role header
that the generation prompt already holds. Each training version replaces the message loop of the original (or the
whole template, for one-line templates); the text around that span is the model's own.
"""

import hashlib
import re
from dataclasses import dataclass

_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(chat_template: str | dict | None) -> bool:
    """Whether a chat template marks assistant output with {% generation %} (what assistant_only_loss needs).

    Example:
        >>> has_generation_markers("{% generation %}{{ m }}{% endgeneration %}")
        True
    """
    chat_template = _default(chat_template)
    return chat_template is not None and _GENERATION_MARKER.search(chat_template) is not None


@dataclass(frozen=True)
class KnownTemplate:
    """A family's chat templates (sha256 of each original's exact text) and the marked replacement of one span.

    The span starts at `start` ("" = the start of the template) and ends before `stop` ("" = at its end); both
    anchors occur once in each original.
    """

    family: str
    sha256: tuple[str, ...]
    body: str
    start: str = ""
    stop: str = ""

    def apply(self, template: str) -> str:
        begin = template.index(self.start) if self.start else 0
        end = template.index(self.stop, begin) if self.stop else len(template)
        return template[:begin] + self.body + template[end:]


def _chatml_loop(thinking: bool) -> str:
    """The message loop of Qwen3's ChatML templates; `thinking` renders the reasoning of the turns after the last
    user query (Qwen3), without it the content only (Qwen3-Instruct-2507)."""
    reasoning = """
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}"""
    shown = """
            {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
                {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- content }}
            {%- endif %}"""
    return (
        """{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == "assistant" %}"""
        + (reasoning if thinking else "")
        + """
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}"""
        + (shown if thinking else "\n            {{- content }}")
        + """
            {%- for call in message.tool_calls or [] %}
                {%- if content or not loop.first %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if call.function %}
                    {%- set call = call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- call.name }}
                {{- '", "arguments": ' }}
                {{- call.arguments if call.arguments is string else call.arguments | tojson }}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
            {{- '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
"""
    )


_QWEN2_5_LOOP = """{%- for message in messages %}
    {%- if message.role == "assistant" %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
            {%- if not message.tool_calls %}
                {{- message.content + '<|im_end|>' }}
            {%- else %}
                {%- if message.content %}
                    {{- message.content }}
                {%- endif %}
                {%- for call in message.tool_calls %}
                    {%- if message.content or not loop.first %}
                        {{- '\\n' }}
                    {%- endif %}
                    {%- if call.function is defined %}
                        {%- set call = call.function %}
                    {%- endif %}
                    {{- '<tool_call>\\n{"name": "' }}
                    {{- call.name }}
                    {{- '", "arguments": ' }}
                    {{- call.arguments | tojson }}
                    {{- '}\\n</tool_call>' }}
                {%- endfor %}
                {{- '<|im_end|>' }}
            {%- endif %}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- elif message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
"""

_LLAMA3 = """{%- for message in messages %}
    {%- set header = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' %}
    {{- bos_token + header if loop.first else header }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}"""


def _llama3_1_loop(builtin_tools: bool) -> str:
    """The message loop of Llama 3.1 (`builtin_tools`: its python_tag calls and <|eom_id|>) and Llama 3.2."""
    builtin_call = """
            {%- if builtin_tools is defined and call.name in builtin_tools %}
                {{- '<|python_tag|>' + call.name + '.call(' }}
                {%- for name, value in call.arguments | items %}
                    {{- name + '="' + value + '"' }}
                    {%- if not loop.last %}
                        {{- ', ' }}
                    {%- endif %}
                {%- endfor %}
                {{- ')' }}
            {%- else %}"""
    json_call = """
                {{- '{"name": "' + call.name + '", "parameters": ' }}
                {{- call.arguments | tojson }}
                {{- '}' }}"""
    end_of_call = """
            {%- endif %}
            {{- '<|eom_id|>' if builtin_tools is defined else '<|eot_id|>' }}"""
    return (
        """{%- for message in messages %}
    {%- if 'tool_calls' in message %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- generation %}"""
        + (builtin_call + json_call + end_of_call if builtin_tools else json_call + "\n            {{- '<|eot_id|>' }}")
        + """
        {%- endgeneration %}
    {%- elif message.role == 'ipython' or message.role == 'tool' %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}
        {{- message.content | tojson if message.content is mapping or message.content is iterable else message.content }}
        {{- '<|eot_id|>' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
"""
    )


_GEMMA = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- raise_exception('System role not supported') }}
{%- endif %}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'assistant' %}
        {{- '<start_of_turn>model\\n' }}
        {%- generation %}{{- message['content'] | trim + '<end_of_turn>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<start_of_turn>' + message['role'] + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<start_of_turn>model\\n' }}
{%- endif %}"""

_GEMMA3_LOOP = """{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- elif content is iterable -%}
        {%- for item in content -%}
            {%- if item['type'] == 'image' -%}
                {{- '<start_of_image>' -}}
            {%- elif item['type'] == 'text' -%}
                {{- item['text'] | trim -}}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{- raise_exception('Invalid content type') -}}
    {%- endif -%}
{%- endmacro -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}
        {{- '<start_of_turn>model\\n' + (first_user_prefix if loop.first else '') -}}
        {%- generation -%}{{- render_content(message['content']) + '<end_of_turn>' -}}{%- endgeneration -%}
        {{- '\\n' -}}
    {%- else -%}
        {{- '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') -}}
        {{- render_content(message['content']) + '<end_of_turn>\\n' -}}
    {%- endif -%}
{%- endfor -%}
"""


def _phi3(system_needs_content: bool) -> str:
    """Phi-3's template (Phi-3.5 skips a system message with empty content: `system_needs_content`)."""
    system = "message['role'] == 'system'" + (" and message['content']" if system_needs_content else "")
    return (
        """{%- for message in messages %}
    {%- if message['role'] == 'assistant' %}
        {{- '<|assistant|>\\n' }}
        {%- generation %}{{- message['content'] + '<|end|>' }}{%- endgeneration %}
        {{- '\\n' }}
    {%- elif message['role'] == 'user' or ("""
        + system
        + """) %}
        {{- '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}
    {%- endif %}
{%- endfor %}
{{- '<|assistant|>\\n' if add_generation_prompt else eos_token }}"""
    )


_LOOP = {"start": "{%- for message in messages %}", "stop": "{%- if add_generation_prompt %}"}

KNOWN_TEMPLATES = (
    KnownTemplate(
        "Qwen2.5", ("cd8e9439f0570856fd70470bf8889ebd8b5d1107207f67a5efb46e342330527f",), _QWEN2_5_LOOP, **_LOOP
    ),
    KnownTemplate(
        "Qwen3", ("a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",), _chatml_loop(True), **_LOOP
    ),
    KnownTemplate(
        "Qwen3-Instruct-2507",
        ("64f85b198065d0fba2a81f37e10ed68161ce2c19a754c7100e67e0ca2ee9c326",),
        _chatml_loop(False),
        **_LOOP,
    ),
    KnownTemplate("Llama 3", ("ba03a121d097859c7b5b9cd03af99aafe95275210d2876f642ad9929a150f122",), _LLAMA3),
    KnownTemplate(
        "Llama 3.1",
        ("e10ca381b1ccc5cf9db52e371f3b6651576caee0a630b452e2816b2d404d4b65",),
        _llama3_1_loop(True),
        **_LOOP,
    ),
    KnownTemplate(
        "Llama 3.2",
        ("5816fce10444e03c2e9ee1ef8a4a1ea61ae7e69e438613f3b17b69d0426223a4",),
        _llama3_1_loop(False),
        **_LOOP,
    ),
    KnownTemplate("Gemma", ("ecd6ae513fe103f0eb62e8ab5bfa8d0fe45c1074fa398b089c93a7e70c15cfd6",), _GEMMA),
    KnownTemplate(
        "Gemma 3",
        ("7de1c58e208eda46e9c7f86397df37ec49883aeece39fb961e0a6b24088dd3c4",),
        _GEMMA3_LOOP,
        start="{%- for message in loop_messages -%}",
        stop="{%- if add_generation_prompt -%}",
    ),
    KnownTemplate("Phi-3", ("dcaee66df77bfbb789ec541fe713218da30225a526f1db97138fc39ee6dc56aa",), _phi3(False)),
    KnownTemplate("Phi-3.5", ("78d976a442bcde2f0be15aafbb8e3050e1104f86732266f68403251b89982a90",), _phi3(True)),
)


def _default(chat_template: str | dict | None) -> str | None:
    # A template shipped as named variants loads as a dict; its "default" variant is the chat template
    return chat_template.get("default") if isinstance(chat_template, dict) else chat_template


def known_template(chat_template: str | dict | None) -> KnownTemplate | None:
    """The KnownTemplate whose original is exactly `chat_template`, or None.

    Example:
        >>> known_template(AutoTokenizer.from_pretrained("Qwen/Qwen3-0.6B").chat_template).family
        'Qwen3'
    """
    chat_template = _default(chat_template)
    if chat_template is None:
        return None
    digest = hashlib.sha256(chat_template.encode("utf-8")).hexdigest()
    return next((known for known in KNOWN_TEMPLATES if digest in known.sha256), None)


def training_chat_template(chat_template: str | dict | None) -> str | None:
    """The chat template assistant_only_loss tokenizes with: None when `chat_template` already has {% generation %}
    markers (use it as it is), else for a known template (see KNOWN_TEMPLATES) a version with the markers around each
    assistant turn's output and end-of-turn token that renders exactly the same text. Raises ValueError for any other
    template (or None).

    Example:
        >>> template = training_chat_template(AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct").chat_template)
        >>> "{%- generation %}" in template
        True
    """
    if has_generation_markers(chat_template):
        return None
    known = known_template(chat_template)
    if known is None:
        families = ", ".join(known.family for known in KNOWN_TEMPLATES)
        what = "has no chat template" if _default(chat_template) is None else "has a chat template"
        raise ValueError(
            f"assistant_only_loss=True needs a chat template that wraps assistant turns in {{% generation %}} ... "
            f"{{% endgeneration %}}; the processing class {what} without these markers, and not one of the templates "
            f"posttrain has a marked version of ({families}; matched exactly). Add the markers to the template (or "
            "pass one with chat_template_path), or set assistant_only_loss=False."
        )
    return known.apply(_default(chat_template))
