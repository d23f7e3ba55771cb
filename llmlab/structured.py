"""JSON schema and tool calls held by grammars: the model can only write what the schema allows.

A schema (a pydantic model or a JSON-schema dict) becomes a GBNF grammar with llama.cpp's own
converter (shipped in llama-cpp-python); a backend samples only tokens the grammar allows, and
the reply is then parsed and validated::

    gbnf = grammar_for_schema(json_schema_of(Person))   # -> backend / engine ``grammar=``
    person = validate_reply(reply_text, Person)         # -> a Person, or StructuredOutputError

llama.cpp's converter silently ignores keywords it cannot enforce (``minimum``,
``patternProperties``, ...); here such a schema is a :class:`SchemaError` naming the part, so a
grammar never promises more than it holds.

Tool calls use one generic format (llama.cpp's "generic" tool format), so any chat model can
call tools: the model's whole reply is JSON, either a call::

    {"tool_calls": [{"name": "<tool>", "arguments": {...}}, ...]}

or an answer in text::

    {"response": "<text>"}

:func:`tool_grammar` holds that format (and each tool's arguments to its parameters schema),
:func:`tool_prompt` describes the tools and the format to the model, :func:`prepare_messages`
turns an OpenAI conversation with assistant ``tool_calls`` and ``role: "tool"`` results into
plain messages any chat template renders, and :func:`parse_tool_reply` reads a reply back.
"""

from __future__ import annotations

import copy
import json
import secrets
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError


class SchemaError(ValueError):
    """A schema the grammar converter cannot hold, or one that is not a valid JSON schema."""


class StructuredOutputError(ValueError):
    """A reply that does not parse as JSON or does not validate against its schema."""


class ReplyCutShortError(StructuredOutputError):
    """``max_tokens`` ended a reply before its JSON was complete."""


# Keywords the converter enforces, and annotations that constrain nothing.
_ENFORCED = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "pattern", "format", "minLength", "maxLength",
}  # fmt: skip
_ANNOTATIONS = {
    "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "readOnly", "writeOnly", "deprecated", "discriminator", "strict",
}  # fmt: skip
_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_TYPES = {"string", "number", "integer", "boolean", "object", "array", "null"}


def json_schema_of(schema: type[BaseModel] | dict | Any) -> dict:
    """The JSON schema of a pydantic model (or any type pydantic knows), or a dict unchanged."""
    if isinstance(schema, dict):
        return schema
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return schema.model_json_schema()
    try:
        return TypeAdapter(schema).json_schema()
    except Exception as err:  # pydantic raises several kinds for a type it cannot describe
        raise SchemaError(f"not a schema (a pydantic model, a type or a dict): {schema!r}") from err


def grammar_for_schema(schema: dict) -> str:
    """GBNF (rule ``root``) that allows exactly the JSON texts ``schema`` describes.

    Raises :class:`SchemaError` naming the part the converter cannot enforce.
    """
    # Imported here: loading llama_cpp loads libllama, which a remote-only process never needs.
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    _check_is_schema(schema)
    _check_supported(schema, "$")
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as err:
        raise SchemaError(
            f"llama.cpp's converter cannot turn this schema into a grammar: {err}"
        ) from err


def _check_is_schema(schema: Any) -> None:
    if not isinstance(schema, dict):
        raise SchemaError(f"a JSON schema is an object (a dict), not {type(schema).__name__}")
    try:
        import jsonschema
    except ImportError:  # optional: the walk below still checks the structure
        return
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as err:
        where = "$" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in err.path)
        raise SchemaError(f"not a valid JSON schema at {where}: {err.message}") from None


def _check_supported(node: Any, where: str) -> None:
    """Walk the schema; raise for any keyword the grammar would silently not enforce."""
    if isinstance(node, bool):
        if node is False:
            raise SchemaError(f"unsupported in a JSON schema grammar: 'false' schema at {where}")
        return
    for key, value in node.items():
        if key not in _ENFORCED and key not in _ANNOTATIONS:
            raise SchemaError(f"unsupported in a JSON schema grammar: {key!r} at {where}")
        if key == "format" and value not in _FORMATS:
            raise SchemaError(
                f"unsupported in a JSON schema grammar: format {value!r} at {where} "
                f"(supported: {', '.join(sorted(_FORMATS))})"
            )
        if key == "type":
            for name in value if isinstance(value, list) else [value]:
                if name not in _TYPES:
                    raise SchemaError(
                        f"unsupported in a JSON schema grammar: type {name!r} at {where}"
                    )
        if key == "$ref" and not str(value).startswith("#/"):
            raise SchemaError(
                f"unsupported in a JSON schema grammar: $ref {value!r} at {where} "
                "(only local references '#/...' are resolved)"
            )
        if key == "allOf":
            _check_all_of(value, f"{where}.allOf")
    for key in ("properties", "$defs", "definitions"):
        for name, sub in node.get(key, {}).items():
            _check_supported(sub, f"{where}.{key}.{name}")
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        for i, sub in enumerate(node.get(key, [])):
            _check_supported(sub, f"{where}.{key}[{i}]")
    items = node.get("items")
    if isinstance(items, list):
        for i, sub in enumerate(items):
            _check_supported(sub, f"{where}.items[{i}]")
    elif items is not None:
        _check_supported(items, f"{where}.items")
    if isinstance(node.get("additionalProperties"), dict):
        _check_supported(node["additionalProperties"], f"{where}.additionalProperties")


def _check_all_of(parts: list, where: str) -> None:
    # The converter merges allOf only as objects: their properties (or a $ref to them).
    for i, part in enumerate(parts):
        ok = isinstance(part, dict) and (
            "properties" in part
            or "$ref" in part
            or all("properties" in alt or "$ref" in alt for alt in part.get("anyOf", [None]) if alt)
        )
        if not ok:
            raise SchemaError(
                f"unsupported in a JSON schema grammar: allOf part that is not an object "
                f"with properties at {where}[{i}]"
            )


def validate_reply(text: str, schema: dict | type[BaseModel] | Any) -> Any:
    """``text`` parsed and validated: a pydantic object for a model, dict/list for a dict schema.

    Raises :class:`StructuredOutputError` naming what failed (JSON syntax or the field).
    """
    if isinstance(schema, dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise StructuredOutputError(f"reply is not JSON ({err}): {text[:200]!r}") from None
        _validate_against(value, schema)
        return value
    adapter = TypeAdapter(schema)
    try:
        return adapter.validate_json(text)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '$'}: {e['msg']}" for e in err.errors()[:5]
        )
        raise StructuredOutputError(f"reply does not validate: {problems}") from None


def _validate_against(value: Any, schema: dict) -> None:
    try:
        import jsonschema
    except ImportError:  # without jsonschema only the JSON syntax is checked
        return
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as err:
        where = "$" + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in err.path)
        raise StructuredOutputError(f"reply does not validate at {where}: {err.message}") from None


# --- tools -------------------------------------------------------------------------------


@dataclass
class Tool:
    """A tool the model may call: its name, what it does, and a JSON schema of its arguments."""

    name: str
    description: str
    parameters: dict

    def to_openai(self) -> dict:
        """The OpenAI ``tools`` entry for this tool."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass
class ToolCall:
    """One call the model made. ``arguments`` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    @classmethod
    def new(cls, name: str, arguments: Any) -> ToolCall:
        """A call of ``name`` with ``arguments`` (a JSON value) and a fresh id."""
        return cls("call_" + secrets.token_hex(12), name, json.dumps(arguments))

    def to_openai(self) -> dict:
        """The OpenAI ``tool_calls`` entry for this call."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def tools_from_openai(tools: list[dict]) -> list[Tool]:
    """Tools from OpenAI's ``{"type": "function", "function": {...}}`` entries.

    Raises ValueError naming the bad entry (not a function, no name, parameters not an object).
    """
    out = []
    for i, entry in enumerate(tools):
        if not isinstance(entry, dict) or entry.get("type", "function") != "function":
            raise ValueError(
                f"tools[{i}]: only {{'type': 'function', 'function': {{...}}}} is supported"
            )
        function = entry.get("function")
        if not isinstance(function, dict):
            raise ValueError(f"tools[{i}]: 'function' (an object with a name) is missing")
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"tools[{i}]: the function has no name")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ValueError(f"tools[{i}] ({name}): 'parameters' must be a JSON schema object")
        out.append(Tool(name, function.get("description") or "", parameters))
    names = [t.name for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"tools: the name(s) {', '.join(duplicates)} appear more than once")
    return out


def tool_reply_schema(tools: list[Tool], choice: str = "auto", parallel: bool = True) -> dict:
    """The JSON schema of a generic-format reply (what :func:`tool_grammar` holds).

    ``choice``: "auto" (a call or a response), "required" (a call), "none" (a response), or
    a tool's name (a call of only that tool); ``parallel`` False allows one call per reply.
    Raises ValueError for an unknown tool name.
    """
    names = [t.name for t in tools]
    if choice not in ("auto", "required", "none") and choice not in names:
        raise ValueError(
            f"tool_choice names an unknown tool {choice!r}. Available: {', '.join(names) or 'none'}"
        )
    response = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
    }
    if choice == "none" or not tools:
        if choice == "required":
            raise ValueError("tool_choice 'required' needs at least one tool")
        return response
    call = call_schema(tools, choice)
    defs = call.pop("$defs", None)
    calls_array = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        calls_array["maxItems"] = 1
    tool_calls = {
        "type": "object",
        "properties": {"tool_calls": calls_array},
        "required": ["tool_calls"],
    }
    schema = {"anyOf": [tool_calls, response]} if choice == "auto" else tool_calls
    if defs:
        schema["$defs"] = defs
    return schema


def call_schema(tools: list[Tool], choice: str = "auto") -> dict:
    """The JSON schema of one call ``{"name": ..., "arguments": {...}}`` of a tool ``choice``
    allows ("auto" or "required": any of ``tools``; a name: that tool), with the tools'
    ``$defs`` at its root."""
    defs: dict = {}
    calls = [_call_schema(t, defs) for t in tools if choice in ("auto", "required", t.name)]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    return {**schema, "$defs": defs} if defs else schema


def _call_schema(tool: Tool, defs: dict) -> dict:
    """A call of ``tool``; its parameters' ``$defs`` move to the root under the tool's name."""
    parameters = copy.deepcopy(tool.parameters)
    local = {**parameters.pop("definitions", {}), **parameters.pop("$defs", {})}
    prefix = f"{tool.name}-"

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
                node["$ref"] = "#/$defs/" + prefix + ref.rsplit("/", 1)[1]
            for value in node.values():
                rename(value)
        elif isinstance(node, list):
            for value in node:
                rename(value)
        return node

    for name, sub in local.items():
        defs[prefix + name] = rename(sub)
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": rename(parameters)},
        "required": ["name", "arguments"],
    }


def tool_grammar(tools: list[Tool], choice: str = "auto", parallel: bool = True) -> str:
    """GBNF for a generic-format reply: see :func:`tool_reply_schema` for ``choice`` and
    ``parallel``.

    Raises SchemaError when a tool's parameters cannot be held (the message names the part).
    """
    return grammar_for_schema(tool_reply_schema(tools, choice, parallel))


def tool_prompt(tools: list[Tool]) -> str:
    """The system-prompt text that describes the tools and the reply format."""
    lines = ["You can call these tools:"]
    for tool in tools:
        lines.append(f"- {tool.name}: {tool.description}".rstrip(": "))
        lines.append(f"  arguments (JSON schema): {json.dumps(tool.parameters)}")
    lines += [
        "",
        "Reply with JSON only. To call a tool:",
        '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}',
        "To answer the user:",
        '{"response": "<your answer>"}',
        "After a call, the tool's result comes back in the next message.",
    ]
    return "\n".join(lines)


def prepare_messages(messages: list[dict], tools: list[Tool] | None) -> list[dict]:
    """Plain role/content messages any chat template renders, from an OpenAI conversation.

    An assistant message's ``tool_calls`` become its generic-format JSON; a ``role: "tool"``
    result becomes a user message naming the tool and the call; consecutive messages of one
    role are joined (some templates require roles to alternate); the tool prompt is added to
    the system message (or a system message is added). Raises ValueError for a tool result
    whose ``tool_call_id`` matches no earlier call.
    """
    calls: dict[str, str] = {}  # call id -> tool name
    out: list[dict] = []
    for i, message in enumerate(messages):
        role = message.get("role")
        content = text_of(message.get("content"))
        if role == "assistant" and message.get("tool_calls"):
            content = _calls_json(message["tool_calls"], calls, i)
        elif role == "tool":
            call_id = check_tool_result(message, calls, i)
            role, content = "user", f"Result of tool {calls[call_id]} (call {call_id}):\n{content}"
        if out and out[-1]["role"] == role:
            out[-1]["content"] += "\n\n" + content
        else:
            out.append({"role": role, "content": content})
    if tools:
        prompt = tool_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}".lstrip()
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def text_of(content: Any) -> str:
    """Message content as text (OpenAI also sends a list of ``{"type": "text"}`` parts)."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


def _calls_json(tool_calls: list[dict], calls: dict[str, str], i: int) -> str:
    entries = []
    for call in tool_calls:
        name, arguments = call_arguments(call, i)
        calls[call.get("id")] = name
        entries.append({"name": name, "arguments": arguments})
    return json.dumps({"tool_calls": entries})


def call_arguments(call: dict, i: int) -> tuple[str, Any]:
    """The name and parsed arguments of an assistant message's OpenAI tool call (messages[i]).

    Raises ValueError when the arguments are not JSON.
    """
    function = call.get("function") or {}
    arguments = function.get("arguments") or "{}"
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError:
        raise ValueError(
            f"messages[{i}]: tool call arguments are not JSON: {arguments!r}"
        ) from None
    return function.get("name", ""), parsed


def check_tool_result(message: dict, calls: dict[str, str], i: int) -> str:
    """The ``tool_call_id`` of a ``role: "tool"`` message (messages[i]), checked against the
    calls made so far (id -> tool name). Raises ValueError when it answers none of them."""
    call_id = message.get("tool_call_id")
    if call_id not in calls:
        raise ValueError(
            f"messages[{i}]: tool result for tool_call_id {call_id!r} matches no "
            "earlier assistant tool call"
        )
    return call_id


def parse_tool_reply(text: str) -> tuple[str | None, list[ToolCall]]:
    """``(content, calls)`` from a generic-format reply.

    ``{"tool_calls": [...]}`` gives ``(None, calls)``; ``{"response": "..."}`` gives
    ``(text, [])``; a reply that is not in the format (no grammar held it) is content as is.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text, []
    if isinstance(value, dict) and isinstance(value.get("tool_calls"), list):
        calls = [
            ToolCall.new(str(call.get("name", "")), call.get("arguments", {}))
            for call in value["tool_calls"]
            if isinstance(call, dict)
        ]
        return None, calls
    if isinstance(value, dict) and isinstance(value.get("response"), str):
        return value["response"], []
    return text, []
