"""Structured output, tool calls and the token routes of part5/combined_app, spoken to with the
official openai client (and httpx for llama.cpp's /tokenize shape).

One server (real default model, uvicorn in a thread on 127.0.0.1) serves the whole module.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"


class Person(BaseModel):
    name: str
    age: int


# Bounded strings and lists: every sampled reply ends well within max_tokens, so each one
# must come back whole (an unbounded string at temperature 1 can run on to max_tokens).
BOUNDED = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 3},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD = json.loads((Path(__file__).parents[1] / "data" / "add_tool.json").read_text())  # OpenAI tool
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- response_format json_schema ------------------------------------------------------------


def test_parse_with_a_pydantic_model_gives_the_object(client):
    reply = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "Alice is 30 years old. Extract the person."}],
        response_format=Person,
        max_tokens=80,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert Person.model_validate_json(choice.message.content) == choice.message.parsed


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_sampled_replies_always_parse_and_validate_against_the_schema(client, seed):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Invent a person."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": BOUNDED, "strict": True},
        },
        max_tokens=300,
        temperature=1.0,
        seed=seed,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), BOUNDED)


def test_a_json_schema_reply_streams_in_pieces_that_join_to_the_whole_one(client):
    kwargs = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Bob is 41. Extract the person."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "Person", "schema": Person.model_json_schema()},
        },
        "max_tokens": 80,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    pieces = [
        c.choices[0].delta.content
        for c in client.chat.completions.create(**kwargs, stream=True)
        if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3 and "".join(pieces) == whole
    Person.model_validate_json(whole)


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
        ({"type": "integer", "minimum": 3}, "minimum"),
        ({"type": "nope"}, "nope"),
    ],
)
def test_a_schema_the_grammar_cannot_hold_is_a_400_naming_the_part(client, schema, named):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    assert err.value.param == "response_format.json_schema.schema"
    assert err.value.code == "invalid_schema" and named in err.value.body["message"]


# --- tools ----------------------------------------------------------------------------------


def _check_call(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_tool_choice_required_gives_a_call_whose_arguments_validate(client):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER, ADD],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    tool = WEATHER if call.function.name == "get_weather" else ADD
    _check_call(call, tool)


def test_a_named_tool_choice_calls_that_tool_once_without_parallel_calls(client):
    # The 135M model, free to make several calls, repeats this one until max_tokens.
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 plus 3?"}],
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False,
        max_tokens=80,
        temperature=0,
    )
    assert reply.choices[0].finish_reason == "tool_calls"
    [call] = reply.choices[0].message.tool_calls
    assert _check_call(call, ADD) == {"a": 2, "b": 3}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_auto_each_sampled_reply_is_a_valid_call_or_text(client, seed):
    reply = client.chat.completions.create(
        model=MODEL,
        messages=ASK_WEATHER,
        tools=[WEATHER],
        max_tokens=200,
        temperature=1.0,
        seed=seed,
    )
    choice = reply.choices[0]
    if choice.finish_reason == "tool_calls":
        for call in choice.message.tool_calls:
            _check_call(call, WEATHER)
    else:
        assert choice.message.tool_calls is None and isinstance(choice.message.content, str)


def test_tool_choice_none_answers_in_plain_text(client):
    reply = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="none", max_tokens=16
    )
    message = reply.choices[0].message
    assert message.tool_calls is None and message.content
    assert not message.content.lstrip().startswith("{")


def test_a_streamed_tool_call_reassembles_into_the_greedy_reply(client):
    kwargs = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": 80,
        "temperature": 0,
    }
    whole = client.chat.completions.create(**kwargs).choices[0]
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        choice = chunk.choices[0]
        finishes += [choice.finish_reason] if choice.finish_reason else []
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            if delta.id:
                assert call["id"] is None, "the id comes once, in the call's first piece"
                call["id"] = delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert finishes == ["tool_calls"]
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert len(next(iter(calls.values()))["arguments"]) > 0


def test_a_conversation_with_tool_calls_and_results_is_accepted(client):
    first = client.chat.completions.create(
        model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], tool_choice="required",
        parallel_tool_calls=False, max_tokens=80, temperature=0,
    ).choices[0]  # fmt: skip
    [call] = first.message.tool_calls
    messages = [
        *ASK_WEATHER,
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny", "celsius": 21}'},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=24
    )
    assert reply.choices[0].message.content
    # The same conversation without tools in the request is accepted too.
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
    assert plain.choices[0].message.content


@pytest.mark.parametrize(
    ("change", "param", "says"),
    [
        ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools.0.function.name", "required"),
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "patternProperties": {}}}}]}, "tools", "patternProperties"),
        ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "21"}]}, "messages", "call_x"),
        ({"top_logprobs": 21}, "top_logprobs", "20"),
    ],
)  # fmt: skip
def test_bad_tool_and_logprob_input_is_a_400_in_openai_shape(base_url, change, param, says):
    body = {"messages": ASK_WEATHER, "tools": [WEATHER], "max_tokens": 4, **change}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert says in error["message"]


# --- /tokenize and /detokenize ------------------------------------------------------------------


def test_tokenize_and_detokenize_round_trip_in_llama_cpp_shape(base_url):
    text = "Hello world, it's a sunny day."
    ids = httpx.post(f"{base_url}/tokenize", json={"content": text}).json()["tokens"]
    assert ids and all(isinstance(i, int) for i in ids)
    back = httpx.post(f"{base_url}/detokenize", json={"tokens": ids}).json()
    assert back == {"content": text}
    pieces = httpx.post(f"{base_url}/tokenize", json={"content": text, "with_pieces": True}).json()
    assert [p["id"] for p in pieces["tokens"]] == ids
    assert "".join(p["piece"] for p in pieces["tokens"]) == text


def test_tokenize_reads_control_tokens_unless_told_not_to(base_url):
    special = httpx.post(f"{base_url}/tokenize", json={"content": "<|im_start|>"}).json()
    assert len(special["tokens"]) == 1
    plain = httpx.post(
        f"{base_url}/tokenize", json={"content": "<|im_start|>", "parse_special": False}
    ).json()
    assert len(plain["tokens"]) > 1


def test_a_piece_that_is_not_whole_characters_is_its_bytes(base_url):
    # A rare character is split into byte tokens; each piece is then a list of byte values.
    r = httpx.post(f"{base_url}/tokenize", json={"content": "\U0001f9ec", "with_pieces": True})
    pieces = [p["piece"] for p in r.json()["tokens"]]
    assert any(isinstance(p, list) for p in pieces), pieces
    joined = b"".join(bytes(p) if isinstance(p, list) else p.encode() for p in pieces)
    assert joined.decode() == "\U0001f9ec"


def test_detokenize_refuses_an_id_the_vocabulary_does_not_have(base_url):
    r = httpx.post(f"{base_url}/detokenize", json={"tokens": [1, 10**9]})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "tokens" and "tokens[1]" in error["message"]
