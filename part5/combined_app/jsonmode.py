"""JSON replies: ``response_format`` ``json_object`` (any object) and ``json_schema`` (one schema).

1. The model is told to answer with one JSON object only (a system instruction, with the
   schema when there is one), so what it writes inside the object makes sense.
2. Decoding is held by a grammar: llama.cpp's JSON grammar (:data:`GRAMMAR`) for an object,
   or the grammar ``llmlab.structured.grammar_for_schema`` makes from the schema. The engine
   never samples a token the grammar refuses, and the reply ends when the object closes.

So a finished reply always parses (and validates against the schema). A reply cut short by
``max_tokens`` is an unfinished object and comes back with ``finish_reason: "length"``, as
OpenAI's does: ask for more tokens.
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF

from llmlab.backends.base import Message

# One JSON object (llama.cpp's json.gbnf, as shipped with llama-cpp-python).
GRAMMAR = JSON_GBNF

INSTRUCTION = (
    "Reply with one valid JSON object and nothing else: no prose, no code fences. "
    "Use double quotes for keys and strings."
)


def instruction(schema: dict[str, Any] | None = None) -> str:
    """What the model is told: one JSON object, following ``schema`` when given."""
    if schema is None:
        return INSTRUCTION
    return f"{INSTRUCTION} It must follow this JSON schema: {json.dumps(schema)}"


def with_instruction(
    messages: list[Message], schema: dict[str, Any] | None = None
) -> list[Message]:
    """``messages`` with the JSON instruction added to (or as) the system prompt."""
    messages = [dict(m) for m in messages]
    text = instruction(schema)
    if messages and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
    else:
        messages.insert(0, {"role": "system", "content": text})
    return messages
