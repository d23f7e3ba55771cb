"""llmlab.tools: functions described as tools (schema from hints and docstrings), the safe
calculator, and the tool loop driven by a scripted backend (each reply checked against the
schema the loop asked for, as a grammar would hold it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest

from llmlab.backends.base import Backend, Chunk, Usage
from llmlab.structured import ReplyCutShortError
from llmlab.tools import calculator, document_search, function_tool, parse_docstring, run_tools


def add(a: float, b: float = 0) -> float:
    """Add two numbers.

    Longer explanation that is not part of the description.

    Args:
        a: the first number.
        b (float): the second number,
            zero if left out.

    Returns:
        The sum.
    """
    return a + b


def shout(text: str) -> str:
    """Upper-case a text.

    :param text: what to shout
    :returns: the text in capitals
    """
    return text.upper()


def broken(x: int) -> int:
    """Always fails."""
    raise RuntimeError("the disk is on fire")


class ScriptedBackend(Backend):
    """Answers each chat with the next scripted JSON reply; records what it was asked."""

    name = "scripted"

    def __init__(self, replies: list[dict], held: bool = True):
        self.replies = list(replies)
        self.held = held  # False: like a server that ignores the schema
        self.requests: list[tuple[list[dict], dict | None]] = []

    def stream_chat(self, messages, json_schema=None, **params: Any) -> Iterator[Chunk]:
        self.requests.append((messages, json_schema))
        reply = self.replies.pop(0)
        if self.held:
            jsonschema.validate(reply, json_schema)  # what a grammar would have allowed
        yield Chunk(reply if isinstance(reply, str) else json.dumps(reply))
        yield Chunk("", "stop", Usage(1, 1))

    def complete(self, prompt, **params):
        raise NotImplementedError

    def count_tokens(self, text):
        return len(text.split())

    def info(self):
        return {"backend": self.name}

    def close(self):
        pass

    @property
    def context_length(self):
        return 2048


def call(name: str, **arguments) -> dict:
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


ASK = [{"role": "user", "content": "What is 2 + 3?"}]


def test_a_function_becomes_a_tool_with_descriptions_from_its_docstring():
    tool = function_tool(add).spec
    assert tool.name == "add"
    assert tool.description == "Add two numbers."
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "a": {"type": "number", "title": "A", "description": "the first number."},
            "b": {
                "type": "number",
                "title": "B",
                "default": 0,
                "description": "the second number, zero if left out.",
            },
        },
        "required": ["a"],
    }
    assert function_tool(shout).spec.parameters["properties"]["text"]["description"] == (
        "what to shout"
    )


def test_parse_docstring_reads_google_and_rest_styles():
    assert parse_docstring(add.__doc__) == (
        "Add two numbers.",
        {"a": "the first number.", "b": "the second number, zero if left out."},
    )
    assert parse_docstring(shout.__doc__) == ("Upper-case a text.", {"text": "what to shout"})


def test_a_parameter_without_a_type_hint_is_refused():
    def untyped(x):
        """No hint."""

    with pytest.raises(TypeError, match="parameter 'x' needs a type hint"):
        function_tool(untyped)


@pytest.mark.parametrize(
    "expression, value",
    [
        ("(2 + 3) * 4", 20),
        ("7 // 2", 3),
        ("-2 ** 2", -4),
        ("sqrt(16) + abs(-1)", 5.0),
        ("2 * pi", 6.283185307179586),
    ],
)
def test_calculator_does_arithmetic(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('ls')", "not allowed in a calculation"),
        ("open('x')", "not allowed in a calculation"),
        ("(1).__class__", "not allowed in a calculation"),
        ("9 ** 9 ** 9", "too large"),
        ("2 +", "not an arithmetic expression"),
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression, message):
    with pytest.raises(ValueError, match=message):
        calculator(expression)


def test_the_loop_calls_the_tool_feeds_the_result_back_and_returns_the_answer():
    backend = ScriptedBackend([call("add", a=2, b=3), {"response": "2 + 3 = 5."}])
    seen = []
    run = run_tools(backend, ASK, [add, shout], on_step=seen.append, temperature=0)
    assert run.answer == "2 + 3 = 5."
    assert [s.to_dict() for s in run.steps] == [
        {"name": "add", "arguments": {"a": 2, "b": 3}, "result": 5, "error": None}
    ]
    assert seen == run.steps and not run.hit_max_steps
    # The second request shows the call and its result, as plain messages with the tool prompt.
    second, schema = backend.requests[1]
    assert second[0]["role"] == "system" and "- add: Add two numbers." in second[0]["content"]
    assert second[-1] == {
        "role": "user",
        "content": f"Result of tool add (call {run.steps[0].call_id}):\n5.0",  # float hint
    }
    assert [m["role"] for m in run.messages] == ["user", "assistant", "tool", "assistant"]
    assert run.messages[1]["tool_calls"][0]["function"]["name"] == "add"


def test_a_tool_that_raises_and_bad_arguments_become_errors_the_model_sees():
    backend = ScriptedBackend(
        [
            {
                "tool_calls": [
                    {"name": "broken", "arguments": {"x": 1}},
                    {"name": "add", "arguments": {"a": "two"}},
                ]
            },
            {"response": "Sorry, that failed."},
        ],
        held=False,  # a grammar would not have let "two" through; a careless server might
    )
    run = run_tools(backend, ASK, [add, broken])
    assert [s.error for s in run.steps] == [
        "RuntimeError: the disk is on fire",
        "invalid arguments: a: Input should be a valid number, unable to parse string as a number",
    ]
    results = backend.requests[1][0][-1]["content"]
    assert "error: RuntimeError: the disk is on fire" in results
    assert run.answer == "Sorry, that failed."


def test_after_max_steps_the_model_must_answer_without_tools():
    backend = ScriptedBackend([call("add", a=1), call("add", a=2), {"response": "Done."}])
    run = run_tools(backend, ASK, [add], max_steps=2)
    assert [s.result for s in run.steps] == [1, 2]
    assert run.answer == "Done." and run.hit_max_steps
    last_schema = backend.requests[-1][1]
    assert last_schema["required"] == ["response"]  # tools switched off for the last reply
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(call("add", a=1), last_schema)


def test_the_model_can_only_name_tools_that_exist():
    backend = ScriptedBackend([call("delete_everything")])
    with pytest.raises(jsonschema.ValidationError):  # the schema (a grammar) would not allow it
        run_tools(backend, ASK, [add])
    # A server that ignores the schema: the unknown name is an error result, text an answer.
    backend = ScriptedBackend([call("delete_everything"), "Plain text."], held=False)
    run = run_tools(backend, ASK, [add])
    assert run.steps[0].error == "no tool named 'delete_everything'; the tools are: add"
    assert run.answer == "Plain text."


def test_a_reply_cut_short_by_max_tokens_is_an_error_saying_so():
    class CutShort(ScriptedBackend):
        def stream_chat(self, messages, json_schema=None, **params):
            yield Chunk('{"tool_calls": [{"na')
            yield Chunk("", "length", Usage(1, 8))

    with pytest.raises(ReplyCutShortError, match="Raise max_tokens"):
        run_tools(CutShort([]), ASK, [add])


class FakeStore:
    def search(self, query, top_k):
        from llmlab.rag.store import Hit

        return [Hit(f"About {query}.\n", "/docs/faq.md", "lines 1-2", 0.9)][:top_k]


def test_document_search_returns_passages_with_their_source():
    tool = document_search(FakeStore(), top_k=1)
    assert tool.name == "search_documents"
    assert tool.spec.parameters["required"] == ["query"]
    assert tool.call({"query": "fees"}) == [
        {"source": "/docs/faq.md", "location": "lines 1-2", "text": "About fees."}
    ]


def test_a_chat_session_with_tools_answers_after_the_calls_and_records_them(tmp_path):
    from llmlab.chat import ChatSession

    backend = ScriptedBackend([call("add", a=2, b=3), {"response": "It is 5."}])
    session = ChatSession(backend, tools=[add])
    shown = []
    session.on_tool_step = shown.append
    result = session.send("What is 2 + 3?")
    assert (result.text, result.finish_reason) == ("It is 5.", "stop")
    assert [s.name for s in shown] == ["add"]
    assert session.messages[-1]["tool_steps"] == [
        {"name": "add", "arguments": {"a": 2, "b": 3}, "result": 5.0, "error": None}
    ]
    saved = json.loads(session.save(tmp_path / "chat.json").read_text())
    assert saved["messages"][-1]["tool_steps"][0]["result"] == 5.0
    # The next turn sees the conversation as text: the question and the answer.
    backend.replies.append({"response": "Bye."})
    session.send("Thanks.")
    messages = backend.requests[-1][0]
    assert [m["content"] for m in messages[1:]] == ["What is 2 + 3?", "It is 5.", "Thanks."]


def test_a_failed_tool_reply_leaves_the_history_as_it_was():
    from llmlab.chat import ChatSession

    class CutShort(ScriptedBackend):
        def stream_chat(self, messages, json_schema=None, **params):
            yield Chunk('{"respo')
            yield Chunk("", "length", Usage(1, 3))

    session = ChatSession(CutShort([]), tools=[add])
    with pytest.raises(ReplyCutShortError):
        session.send("What is 2 + 3?")
    assert session.messages == []
