"""Several choices (``n``), logprobs and per-request LoRA adapters on the OpenAI-compatible
routes, spoken to with the official openai client.

One server (real default model, three slots, one test adapter loaded) serves the module.
"""

from __future__ import annotations

import json

import httpx
import pytest
from lora_adapters import make_adapter
from openai import OpenAI

from llmlab import registry
from llmlab.engine import Engine
from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Name three colours."}]
SLOTS = 3
N_CTX = 1024


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return str(make_adapter(tmp_path_factory.mktemp("lora") / "style", 1))


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, adapter):
    settings = ServerSettings(
        threads=1,
        home=tmp_path_factory.mktemp("home"),
        parallel=SLOTS,
        n_ctx=N_CTX,
        max_tokens_limit=256,
        lora={"style": adapter},
    )
    with running_server(settings) as url:
        yield url


@pytest.fixture
def client(base_url):
    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, **extra):
    return client.chat.completions.create(
        model="smollm2-135m-instruct", messages=HELLO, max_tokens=16, **extra
    )


def test_greedy_n3_gives_three_identical_choices(client):
    single = _chat(client, temperature=0)
    reply = _chat(client, temperature=0, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    texts = {c.message.content for c in reply.choices}
    assert texts == {single.choices[0].message.content}
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert reply.usage.completion_tokens == 3 * single.usage.completion_tokens


def test_sampled_n3_indexes_the_choices_and_sums_completion_tokens(client):
    reply = _chat(client, temperature=1.0, seed=7, n=3)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    assert all(c.finish_reason in ("stop", "length") for c in reply.choices)
    single = _chat(client, temperature=0)
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens
    assert 3 <= reply.usage.completion_tokens <= 3 * 16
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # choice i samples with seed + i: the first choice is the one a single request gets
    assert (
        reply.choices[0].message.content
        == _chat(client, temperature=1.0, seed=7).choices[0].message.content
    )


def test_streamed_n2_reassembles_per_index_into_the_whole_reply(client):
    whole = _chat(client, temperature=0, n=2)
    stream = _chat(client, temperature=0, n=2, stream=True, stream_options={"include_usage": True})
    texts, finishes, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finishes == {c.index: c.finish_reason for c in whole.choices}
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens


def _check_content_logprobs(content, text):
    assert "".join(entry.token for entry in content) == text
    for entry in content:
        assert entry.logprob <= 0
        assert bytes(entry.bytes).decode("utf-8", "replace")
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3
        assert top == sorted(top, reverse=True)
        assert all(t <= 0 for t in top)


def test_chat_logprobs_cover_every_token_of_the_reply(client):
    reply = _chat(client, temperature=0, logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    assert len(choice.logprobs.content) == reply.usage.completion_tokens
    _check_content_logprobs(choice.logprobs.content, choice.message.content)
    # greedy: the chosen token is the most likely one
    assert all(e.token == e.top_logprobs[0].token for e in choice.logprobs.content)
    assert _chat(client, temperature=0).choices[0].logprobs is None


def test_streamed_chat_logprobs_match_the_whole_reply(client):
    whole = _chat(client, temperature=0, logprobs=True, top_logprobs=3).choices[0]
    stream = _chat(client, temperature=0, logprobs=True, top_logprobs=3, stream=True)
    content, text = [], ""
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs and choice.logprobs.content:
                content += choice.logprobs.content
    assert text == whole.message.content
    _check_content_logprobs(content, text)
    assert [e.token for e in content] == [e.token for e in whole.logprobs.content]


def test_completion_logprobs_in_the_legacy_shape(client):
    reply = client.completions.create(
        model="smollm2-135m-instruct",
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        logprobs=2,
    )
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == reply.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == [
        len("".join(logprobs.tokens[:i])) for i in range(len(logprobs.tokens))
    ]


def test_completion_n2_streamed_and_whole(client):
    args = dict(
        model="smollm2-135m-instruct", prompt="Once upon a time", max_tokens=8, temperature=0
    )
    whole = client.completions.create(n=2, **args)
    assert [c.index for c in whole.choices] == [0, 1]
    assert whole.choices[0].text == whole.choices[1].text
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(n=2, stream=True, **args):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == {0: whole.choices[0].text, 1: whole.choices[1].text}


@pytest.mark.parametrize(
    ("extra", "param", "words"),
    [
        ({"n": SLOTS + 1}, "n", f"at most {SLOTS}"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "20"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs: true"),
        ({"lora": [{"id": 5, "scale": 1.0}]}, "lora.0.id", "0 (style)"),
    ],
)
def test_bad_choices_logprobs_and_lora_are_400s_naming_the_field(base_url, extra, param, words):
    body = {"messages": HELLO, "max_tokens": 4, **extra}
    r = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_completion_logprobs_over_5_is_a_400(base_url):
    body = {"prompt": "Hi", "max_tokens": 4, "logprobs": 6}
    r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "logprobs"


def test_lora_without_adapters_loaded_says_to_start_with_lora(tmp_path):
    from fastapi.testclient import TestClient

    from part5.combined_app import create_app

    client = TestClient(create_app(ServerSettings(home=tmp_path)))
    body = {"prompt": "Hi", "max_tokens": 4, "lora": [{"id": 0, "scale": 1.0}]}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400
    assert "--lora NAME=PATH" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "lora"


def test_a_lora_request_gives_the_engines_greedy_text_with_that_adapter(client, base_url, adapter):
    assert httpx.get(f"{base_url}/lora-adapters").json()[0]["name"] == "style"
    served = _chat(client, temperature=0, extra_body={"lora": [{"id": 0, "scale": 1.0}]})
    base = _chat(client, temperature=0)
    engine = Engine(
        registry.resolve(), parallel=1, n_ctx=N_CTX, threads=1, adapters={"style": adapter}
    )
    try:
        expected = engine.chat(HELLO, max_tokens=16, temperature=0, lora={"style": 1.0}).text
    finally:
        engine.close()
    assert served.choices[0].message.content == expected
    assert base.choices[0].message.content != expected


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 16}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather now in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 24}},
            "required": ["city"],
        },
    },
}


def test_each_sampled_choice_follows_the_json_schema(client):
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Make up a person."}],
        max_tokens=48,
        temperature=1.0,
        seed=3,
        n=3,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON},
        },
    )
    assert len(reply.choices) == 3
    for choice in reply.choices:
        person = json.loads(choice.message.content)
        assert set(person) == {"name", "age"}
        assert isinstance(person["age"], int)


def test_each_choice_with_a_required_tool_is_a_call(client):
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_tokens=48,
        temperature=1.0,
        seed=5,
        n=2,
        tools=[WEATHER],
        tool_choice="required",
    )
    assert [c.index for c in reply.choices] == [0, 1]
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
