"""``response_format: {"type": "json_object"}``: how the server makes sure the reply is a JSON object.

1. The model is told to answer with one JSON object only (a system instruction), so what
   it writes inside the object makes sense.
2. Decoding is constrained by a JSON grammar (:data:`GRAMMAR`, llama.cpp's GBNF for one
   object): the engine never samples a token that would break the syntax, and the reply
   ends when the object closes.
3. A reply cut short by ``max_tokens`` is still an unfinished object: :func:`repair`
   closes its open strings, arrays and objects (dropping a dangling key or comma). If no
   object was started at all (``max_tokens`` of 1 or 2), the request runs once more
   greedily and, as a last resort, the text is wrapped as ``{"text": ...}``.

So the content is always ``json.loads``-able into a dict. The route reports which step
produced it in the response header ``X-LLMLab-JSON`` (valid, closed, extracted, wrapped).
"""

from __future__ import annotations

import json

from llama_cpp.llama_grammar import JSON_GBNF

from llmlab.backends.base import Message

# One JSON object (llama.cpp's json.gbnf, as shipped with llama-cpp-python).
GRAMMAR = JSON_GBNF

INSTRUCTION = (
    "Reply with one valid JSON object and nothing else: no prose, no code fences. "
    "Use double quotes for keys and strings."
)


def with_instruction(messages: list[Message]) -> list[Message]:
    """``messages`` with the JSON instruction added to (or as) the system prompt."""
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{INSTRUCTION}"
    else:
        messages.insert(0, {"role": "system", "content": INSTRUCTION})
    return messages


def _parses(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def close_truncated(text: str) -> str | None:
    """Close a JSON object cut off mid-way (open string, arrays, objects); None if not one."""
    start = text.find("{")
    if start < 0:
        return None
    body = text[start:]
    stack: list[str] = []
    in_string = escaped = False
    for ch in body:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack:
                break
            stack.pop()
    if escaped:
        body = body[:-1]
    if in_string:
        body += '"'
    # Try the text as is, then without a trailing partial member, before closing it.
    for candidate in _trimmings(body):
        fixed = candidate + "".join(reversed(stack))
        if _parses(fixed):
            return fixed
    return None


def _trimmings(body: str) -> list[str]:
    stripped = body.rstrip().rstrip(",").rstrip()
    out = [body, stripped]
    if stripped.endswith(":"):
        stripped = stripped[:-1]
    # Drop the last member ("key": partial value) back to the previous separator.
    for sep in (",", "{", "["):
        cut = stripped.rfind(sep)
        if cut >= 0:
            out.append(stripped[: cut + 1].rstrip(",") if sep != "," else stripped[:cut])
    return out


def first_object(text: str) -> str | None:
    """The first complete JSON object embedded anywhere in ``text``."""
    decoder = json.JSONDecoder()
    index = text.find("{")
    while index >= 0:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if isinstance(value, dict):
            return text[index:end]
        index = text.find("{", end)
    return None


def repair(text: str) -> tuple[str, str]:
    """A JSON object string for ``text`` and how it was obtained.

    Returns ``(json_text, how)`` with ``how`` one of ``valid`` (as generated),
    ``closed`` (truncated, then closed), ``extracted`` (found inside other text) or
    ``wrapped`` (no object found: ``{"text": ...}``).
    """
    stripped = text.strip()
    if _parses(stripped):
        return stripped, "valid"
    closed = close_truncated(stripped)
    # A reply that starts as an object and was cut short: close it rather than pick an
    # inner object out of it.
    if closed is not None and stripped.startswith("{"):
        return closed, "closed"
    found = first_object(stripped)
    if found is not None:
        return found, "extracted"
    if closed is not None:
        return closed, "closed"
    return json.dumps({"text": stripped}, ensure_ascii=False), "wrapped"
