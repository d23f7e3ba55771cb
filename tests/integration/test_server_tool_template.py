"""Tool calls in the model's own template: a server on a copy of the default model whose GGUF
carries Qwen2.5's tool-aware chat template (the ``hermes_model`` fixture) renders tools and
results with that template and holds replies to its ``<tool_call>`` format; clients see the
same OpenAI shapes as with the generic format (the official openai client, whole and streamed).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from llmlab import registry
from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
ADD = json.loads((Path(__file__).parents[1] / "data" / "add_tool.json").read_text())  # OpenAI tool
ASK = [{"role": "user", "content": "What is 17 plus 25?"}]
REQUIRED = {
    "model": MODEL,
    "messages": ASK,
    "tools": [ADD],
    "tool_choice": "required",
    "max_tokens": 80,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, hermes_model):
    spec = registry.resolve(MODEL).model_copy(update={"path": hermes_model})
    settings = ServerSettings(
        threads=1, home=tmp_path_factory.mktemp("home"), parallel=2, max_tokens_limit=512
    )
    with running_server(settings, spec=spec) as url:
        yield url


def _arguments(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "add"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, ADD["function"]["parameters"])
    return arguments


def test_the_model_list_says_the_native_format_is_used(base_url):
    models = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert {m["id"]: m.get("tool_format") for m in models}[MODEL] == "hermes"


def test_tool_choice_required_gives_a_call_whose_arguments_validate(client):
    choice = client.chat.completions.create(**REQUIRED).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    for call in choice.message.tool_calls:
        _arguments(call)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sampled_required_replies_are_valid_calls(client, seed):
    # Room for several calls (about 35 tokens each): a sampled reply may make two or three.
    sampled = {**REQUIRED, "temperature": 1.0, "seed": seed, "max_tokens": 200}
    reply = client.chat.completions.create(**sampled)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    for call in choice.message.tool_calls:
        _arguments(call)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_with_auto_a_sampled_reply_is_text_or_text_then_valid_calls(client, seed):
    reply = client.chat.completions.create(
        **{**REQUIRED, "tool_choice": "auto", "temperature": 1.0, "seed": seed, "max_tokens": 120}
    )
    choice = reply.choices[0]
    if choice.finish_reason == "tool_calls":
        for call in choice.message.tool_calls:
            _arguments(call)
    else:  # text (a reply cut short by max_tokens is returned as it is)
        assert choice.message.tool_calls is None
        if choice.finish_reason == "stop":  # the grammar keeps the tag for calls
            assert "<tool_call>" not in choice.message.content


def test_the_responses_api_gets_function_calls_in_the_native_format(client):
    tool = {"type": "function", **ADD["function"]}
    response = client.responses.create(
        model=MODEL, input=ASK[0]["content"], tools=[tool], tool_choice="required",
        max_output_tokens=80, temperature=0,
    )  # fmt: skip
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and all(c.name == "add" for c in calls)
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), ADD["function"]["parameters"])


def test_a_streamed_call_reassembles_into_the_greedy_reply(client):
    whole = client.chat.completions.create(**REQUIRED).choices[0]
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in client.chat.completions.create(**REQUIRED, stream=True):
        choice = chunk.choices[0]
        finishes += [choice.finish_reason] if choice.finish_reason else []
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert finishes == ["tool_calls"]
    expected = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert [(c["name"], c["arguments"]) for c in calls.values()] == expected


def test_a_conversation_with_a_tool_result_is_rendered_by_the_template(client, base_url):
    first = client.chat.completions.create(**{**REQUIRED, "parallel_tool_calls": False})
    [call] = first.choices[0].message.tool_calls
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "42"},
    ]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[ADD], max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason in ("stop", "tool_calls", "length")
    assert choice.message.content or choice.message.tool_calls
    # The prompt is the template's: the call as a <tool_call> block, the result in a
    # <tool_response> block (the server counts the same tokens it renders).
    prompt_tokens = reply.usage.prompt_tokens
    without_result = client.chat.completions.create(
        model=MODEL, messages=messages[:2], tools=[ADD], max_tokens=1
    )
    response_block = "<|im_start|>user\n<tool_response>\n42\n</tool_response><|im_end|>\n"
    tokens = httpx.post(f"{base_url}/tokenize", json={"content": response_block}).json()["tokens"]
    assert prompt_tokens - without_result.usage.prompt_tokens == len(tokens)


def test_a_tool_result_without_a_matching_call_is_a_400(client):
    messages = [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "42"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=messages, tools=[ADD], max_tokens=4)
    assert "matches no earlier assistant tool call" in caught.value.message
    assert caught.value.body["param"] == "messages"
