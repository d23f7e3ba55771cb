"""``POST /v1/responses`` (OpenAI's Responses API, stateless) through the official openai client.

One server (real default model, uvicorn in a thread on 127.0.0.1) serves the whole module.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather now in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


class Person(BaseModel):
    name: str
    age: int


def test_a_text_input_gives_a_message_and_output_text(client):
    reply = client.responses.create(
        model=MODEL, input="Say hello.", instructions="Answer in one short sentence.",
        max_output_tokens=40, temperature=0,
    )  # fmt: skip
    assert reply.object == "response" and reply.status == "completed"
    [message] = reply.output
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert reply.output_text == message.content[0].text and reply.output_text.strip()
    assert reply.usage.output_tokens > 0 and reply.usage.input_tokens > 0
    assert reply.instructions == "Answer in one short sentence."


def test_the_same_reply_as_chat_completions_for_the_same_conversation(client):
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=24, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    )  # fmt: skip
    reply = client.responses.create(
        model=MODEL, instructions="Be brief.", max_output_tokens=24, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}],
    )  # fmt: skip
    assert reply.output_text == chat.choices[0].message.content


def test_a_reply_cut_by_max_output_tokens_is_incomplete(client):
    reply = client.responses.create(
        model=MODEL, input="Tell a long story.", max_output_tokens=3, temperature=0
    )
    assert reply.status == "incomplete"
    assert reply.incomplete_details.reason == "max_output_tokens"
    assert reply.usage.output_tokens == 3


def test_a_stream_sends_the_events_and_the_text_of_the_whole_reply(client):
    kwargs = {"model": MODEL, "input": "Say hi.", "max_output_tokens": 200, "temperature": 0}
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.done",
        "response.output_item.done",
    ):
        assert kinds.count(kind) == 1, kind
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 3 and "".join(deltas) == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.output_text == whole.output_text
    # The SDK's stream helper puts the same reply back together.
    with client.responses.stream(**kwargs) as stream:
        assert stream.get_final_response().output_text == whole.output_text


def test_text_format_json_schema_holds_the_reply_to_the_schema(client):
    reply = client.responses.create(
        model=MODEL, input="Alice is 30 years old. Extract the person.", temperature=0,
        max_output_tokens=80,
        text={"format": {"type": "json_schema", "name": "Person", "schema": Person.model_json_schema(), "strict": True}},
    )  # fmt: skip
    assert reply.status == "completed"
    assert Person.model_validate_json(reply.output_text)
    parsed = client.responses.parse(
        model=MODEL, input="Bob is 41. Extract the person.", text_format=Person,
        max_output_tokens=80, temperature=0,
    )  # fmt: skip
    assert isinstance(parsed.output_parsed, Person)


def test_tools_give_function_call_items_and_their_results_are_accepted(client):
    reply = client.responses.create(
        model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
        tool_choice="required", parallel_tool_calls=False, max_output_tokens=80, temperature=0,
    )  # fmt: skip
    [call] = reply.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and reply.output_text == ""
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    follow_up = client.responses.create(
        model=MODEL, tools=[WEATHER], tool_choice="none", max_output_tokens=24,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'},
        ],
    )  # fmt: skip
    assert follow_up.output[0].type == "message" and follow_up.output_text


def test_a_streamed_function_call_matches_the_whole_one(client):
    kwargs = {
        "model": MODEL, "input": "What is the weather in Paris?", "tools": [WEATHER],
        "tool_choice": "required", "parallel_tool_calls": False, "max_output_tokens": 80,
        "temperature": 0,
    }  # fmt: skip
    [whole] = client.responses.create(**kwargs).output
    events = list(client.responses.create(**kwargs, stream=True))
    arguments = "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta"
    )
    assert arguments == whole.arguments
    [done] = [e for e in events if e.type == "response.output_item.done"]
    assert (done.item.name, done.item.arguments) == (whole.name, whole.arguments)
    assert events[-1].type == "response.completed"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"tools": [{"type": "function", "description": "no name"}]}, "tools.0.name"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
        ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "input"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer", "maximum": 3}}}}, "text.format.schema"),
        ({"max_output_tokens": 5000}, "max_output_tokens"),
        ({"max_tokens": 5000}, "max_tokens"),  # checked even where max_output_tokens wins
    ],
)  # fmt: skip
def test_bad_input_is_a_400_in_openai_shape(base_url, client, change, param):
    body = {"model": MODEL, "input": "Hi", "max_output_tokens": 4, **change}
    r = httpx.post(f"{base_url}/v1/responses", json=body, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    extra = {k: v for k, v in body.items() if k not in ("model", "input")}
    with pytest.raises(openai.BadRequestError):  # the SDK raises it too
        client.responses.create(model=MODEL, input=body["input"], extra_body=extra)
