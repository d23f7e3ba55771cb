"""How tools reach a model and how its calls come back: the model's own chat template where
it knows tools, else the generic format of :mod:`llmlab.structured`.

One seam, picked once per model from its GGUF ``tokenizer.chat_template``::

    fmt = tool_format(template)                       # HERMES or GENERIC
    messages, tools = fmt.prepare(openai_messages, tool_list)  # what the template is given
    prompt = render_prompt(template, messages, tools)         # (the engine renders the same)
    gbnf = fmt.grammar(tool_list, "auto", parallel=True)      # what the reply may be
    content, calls = fmt.parse(reply_text)                    # ToolCall objects with ids

**Native (``hermes``)**: a template that uses ``tools`` and writes ``<tool_call>`` (the
Hermes 2/3 Pro and Qwen2.5 format, and the many fine-tunes that kept it; llama.cpp's server
recognises it the same way). The template gets OpenAI's tool entries
(``{"type": "function", "function": {...}}``) and the conversation as it is: assistant
``tool_calls`` (their arguments as JSON objects, which such templates print with ``tojson``)
and ``role: "tool"`` results, which it renders itself (the tools in the system turn inside
``<tools></tools>``, results in ``<tool_response>`` blocks). The reply is free text
(``tool_choice`` ``auto``), then optionally, or (``required``, a named tool) only, calls::

    <tool_call>
    {"name": "<tool>", "arguments": {...}}
    </tool_call>

held by a grammar: the JSON of each call is llama.cpp's converter applied to the tools'
parameter schemas, and text before the calls cannot contain ``<tool_call>`` itself.

**Generic**: every other template. The tools and the format are described in the system
prompt, calls and results are rewritten as plain messages, and the whole reply is JSON,
``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` or ``{"response": "..."}`` (see
:mod:`llmlab.structured`).

The server logs the format chosen when it loads a model and shows it as ``tool_format`` in
``GET /v1/models``.
"""

from __future__ import annotations

import json
import re

from llmlab import structured
from llmlab.structured import Tool, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class GenericFormat:
    """Tools described in the system prompt; the reply is JSON (a call or a text response)."""

    name = "generic"

    def prepare(
        self, messages: list[dict], tools: list[Tool] | None
    ) -> tuple[list[dict], list[dict] | None]:
        """Plain messages any template renders, and no tools for the template itself."""
        return structured.prepare_messages(messages, tools), None

    def grammar(self, tools: list[Tool], choice: str, parallel: bool) -> str:
        """GBNF of a reply: see :func:`llmlab.structured.tool_grammar`."""
        return structured.tool_grammar(tools, choice, parallel)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)`` of a reply: see :func:`llmlab.structured.parse_tool_reply`."""
        return structured.parse_tool_reply(text)


class HermesFormat:
    """The template renders tools, calls and results; calls are ``<tool_call>`` blocks."""

    name = "hermes"

    def prepare(
        self, messages: list[dict], tools: list[Tool] | None
    ) -> tuple[list[dict], list[dict] | None]:
        """The conversation as the template expects it (text content, call arguments as
        objects, tool results checked against earlier calls) and the tools' OpenAI entries.

        Raises ValueError for call arguments that are not JSON or a result that answers no call.
        """
        calls: dict[str, str] = {}
        out = []
        for i, message in enumerate(messages):
            message = {**message, "content": structured.text_of(message.get("content"))}
            if message.get("tool_calls"):
                message["tool_calls"] = [
                    _call_for_template(c, calls, i) for c in message["tool_calls"]
                ]
            if message.get("role") == "tool":
                structured.check_tool_result(message, calls, i)
            out.append(message)
        return out, [t.to_openai() for t in tools] if tools else None

    def grammar(self, tools: list[Tool], choice: str, parallel: bool) -> str:
        """GBNF of a reply: text then calls (``auto``), calls only (``required``, a name) or
        text only (``none``); one call at most unless ``parallel``. Raises ValueError and
        SchemaError as the generic format does."""
        structured.tool_reply_schema(tools, choice)  # the same checks of choice and tools
        text = _text_without(OPEN, "tool-text")
        if choice == "none" or not tools:
            return "\n".join([*text, "root ::= tool-text"]) + "\n"
        call_json = structured.grammar_for_schema(structured.call_schema(tools, choice))
        call_json = re.sub(r"^root ::=", "tool-call-json ::=", call_json, flags=re.M)
        call = f'"{_gbnf(OPEN)}\\n" tool-call-json "\\n{_gbnf(CLOSE)}"'
        rules = [call_json, f"tool-calls ::= {call}" + (f' ("\\n" {call})*' if parallel else "")]
        if choice == "auto":
            rules += [*text, "root ::= tool-text tool-calls?"]
        else:
            rules.append("root ::= tool-calls")
        return "\n".join(rules) + "\n"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """``(content, calls)``: the text before the first ``<tool_call>`` (None if empty)
        and each block's call; a reply with a block that is not a call is content as is."""
        start = text.find(OPEN)
        if start < 0:
            return text, []
        calls = []
        blocks = rf"{re.escape(OPEN)}\s*(.*?)\s*{re.escape(CLOSE)}"
        for body in re.findall(blocks, text[start:], flags=re.S):
            try:
                value = json.loads(body)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(value, dict) or not isinstance(value.get("name"), str):
                return text, []
            calls.append(ToolCall.new(value["name"], value.get("arguments", {})))
        return (text[:start].strip() or None, calls) if calls else (text, [])


GENERIC = GenericFormat()
HERMES = HermesFormat()
ToolFormat = GenericFormat | HermesFormat


def tool_format(template: str | None) -> ToolFormat:
    """The tool format for a chat template: :data:`HERMES` for one that uses ``tools`` and
    writes ``<tool_call>``, :data:`GENERIC` for any other (or none)."""
    if template and OPEN in template and re.search(r"\btools\b", template):
        return HERMES
    return GENERIC


def render_prompt(
    template: str,
    messages: list[dict],
    tools: list[dict] | None = None,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """``messages`` rendered with ``template`` (sandboxed Jinja2, as llama-cpp-python and
    transformers render chat templates) and ``tools``, ending with the assistant's turn."""
    from llmlab.backends.llamacpp import gguf_chat_formatter

    formatter = gguf_chat_formatter(template, eos_token, bos_token, add_generation_prompt=True)
    return formatter(messages=messages, tools=tools).prompt


def _call_for_template(call: dict, calls: dict[str, str], i: int) -> dict:
    """An OpenAI tool call with its arguments as an object (what templates print)."""
    name, arguments = structured.call_arguments(call, i)
    calls[call.get("id")] = name
    return {**call, "type": "function", "function": {"name": name, "arguments": arguments}}


def _gbnf(literal: str) -> str:
    return literal.replace("\\", "\\\\").replace('"', '\\"')


def _text_without(tag: str, rule: str) -> list[str]:
    """GBNF rules ``rule`` (``rule-0`` .. ``rule-N``) for any text that does not contain ``tag``.

    Rule ``rule-i`` means "the text so far ends with the first i characters of the tag". This
    simple automaton is right for tags whose first character does not come again (``<...>``).
    """
    assert tag[0] not in tag[1:], tag
    first = _gbnf(tag[0])
    rules = [f"{rule} ::= {rule}-0"]
    for i, char in enumerate(tag):
        options = [f'"{first}" {rule}-1'] if i else [f"[^{first}] {rule}-0", f'"{first}" {rule}-1']
        if i:
            options.insert(0, f"[^{_gbnf(char)}{first}] {rule}-0")
            if i + 1 < len(tag):
                options.append(f'"{_gbnf(char)}" {rule}-{i + 1}')
        rules.append(f'{rule}-{i} ::= {" | ".join(options)} | ""')
    return rules
