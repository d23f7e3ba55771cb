"""The OpenAI-compatible API of part5/combined_app, spoken to with the official openai client.

One server (real default model, uvicorn in a thread on 127.0.0.1) serves the whole module.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

# threads=1: these tests check behaviour, not speed, and one llama.cpp thread never stalls
# waiting for a second one when other work shares the CPU (many threads can be 20x slower then).

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Name three colours."}]


def test_models_lists_the_served_chat_model_and_the_embedding_model(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    assert client.models.retrieve("smollm2-135m-instruct").owned_by == "llmlab"


def test_chat_completion_returns_a_reply_with_usage(client):
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=HELLO, max_tokens=24, temperature=0
    )
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    assert choice.finish_reason in ("stop", "length")
    assert reply.model == "smollm2-135m-instruct"
    assert 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_stream_sends_the_same_text_in_chunks_then_usage(client):
    whole = client.chat.completions.create(
        messages=HELLO, model="smollm2-135m-instruct", max_tokens=24, temperature=0
    )
    stream = client.chat.completions.create(
        messages=HELLO,
        model="smollm2-135m-instruct",
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3, "the reply should arrive in several pieces"
    assert "".join(pieces) == whole.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [whole.choices[0].finish_reason]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )


def test_stream_ends_with_done_in_openai_sse_format(base_url):
    body = {"messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert (
        first["object"] == "chat.completion.chunk"
        and first["choices"][0]["delta"]["role"] == "assistant"
    )


def test_max_tokens_and_stop_end_the_reply(client):
    short = client.chat.completions.create(
        messages=HELLO, model="smollm2-135m-instruct", max_tokens=3, temperature=0
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    full = (
        client.chat.completions.create(
            messages=HELLO, model="smollm2-135m-instruct", max_tokens=24, temperature=0
        )
        .choices[0]
        .message.content
    )
    word = full.split()[2]
    cut = client.chat.completions.create(
        messages=HELLO, model="smollm2-135m-instruct", max_tokens=24, temperature=0, stop=[word]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[: full.index(word)]


def test_usage_says_how_many_prompt_tokens_the_prefix_cache_saved(client):
    messages = [{"role": "user", "content": "Name three colours, then three animals."}]
    first = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=4, temperature=0
    )
    again = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=messages, max_tokens=4, temperature=0
    )
    # The second request finds the first's prompt in a slot's cache (all of it but the
    # token or so that must be computed again to sample from).
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details is not None
    assert 0 < cached < again.usage.prompt_tokens


def test_same_seed_same_sampled_reply(client):
    def sampled() -> str:
        return (
            client.chat.completions.create(
                messages=HELLO,
                model="smollm2-135m-instruct",
                max_tokens=16,
                temperature=1.0,
                top_p=0.9,
                seed=1234,
            )
            .choices[0]
            .message.content
        )

    assert sampled() == sampled()


def test_json_object_response_format_gives_a_json_object(client):
    messages = [{"role": "user", "content": "Give the name and age of a person as JSON."}]
    reply = client.chat.completions.create(
        messages=messages,
        model="smollm2-135m-instruct",
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_json_reply_cut_by_max_tokens_says_length_and_is_not_patched(client):
    # As OpenAI's: the unfinished object comes back as it is, with finish_reason "length".
    reply = client.chat.completions.create(
        messages=[{"role": "user", "content": "Give the name and age of a person as JSON."}],
        model="smollm2-135m-instruct",
        max_tokens=3,
        temperature=0,
        response_format={"type": "json_object"},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and reply.usage.completion_tokens == 3
    assert choice.message.content.lstrip().startswith("{")
    with pytest.raises(ValueError):
        json.loads(choice.message.content)


def test_json_mode_decoding_follows_the_json_grammar_even_when_sampling(base_url):
    # Without the grammar a 135M model at temperature 1 often writes prose or code fences
    # around (or instead of) an object; with it the reply is an object from the first token.
    messages = [{"role": "user", "content": "Describe your favourite book."}]
    for seed in (1, 2, 3):
        r = httpx.post(
            f"{base_url}/v1/chat/completions",
            timeout=120,
            json={
                "messages": messages,
                "max_tokens": 48,
                "temperature": 1.0,
                "seed": seed,
                "response_format": {"type": "json_object"},
            },
        )
        choice = r.json()["choices"][0]
        content = choice["message"]["content"]
        assert content.lstrip().startswith("{"), content
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(content), dict)


def test_text_completion_continues_the_prompt(client):
    result = client.completions.create(
        model="smollm2-135m-instruct", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0
    )
    assert result.choices[0].text.strip().startswith("5")
    assert result.usage.completion_tokens == 6
    streamed = client.completions.create(
        model="smollm2-135m-instruct",
        prompt="1, 2, 3, 4,",
        max_tokens=6,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == result.choices[0].text


def test_embeddings_are_unit_vectors_that_rank_by_meaning(client):
    # The openai client asks for base64 by default; the server encodes float32 for it.
    result = client.embeddings.create(
        model="all-minilm-l6-v2", input=["a small cat", "a kitten", "corporate tax law"]
    )
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert math.isclose(sum(x * x for x in vectors[0]), 1.0, rel_tol=1e-3)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2])
    assert result.usage.prompt_tokens > 0
    floats = client.embeddings.create(
        model="all-minilm-l6-v2", input="a small cat", encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)


def test_unknown_model_is_a_404_in_openai_error_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert err.value.code == "model_not_found"
    assert "smollm2-135m-instruct" in err.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="smollm2-135m-instruct", input="x")


def test_invalid_requests_are_400_with_the_parameter_named(client, base_url):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=HELLO, temperature=5)
    assert err.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=HELLO, n=3)
    assert err.value.param == "n" and "at most 2" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="smollm2-135m-instruct", messages=HELLO, max_tokens=5000
        )
    assert err.value.param == "max_tokens" and "512" in err.value.body["message"]
    bad_json = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi \\ud83d"}]}'),
        ("/v1/completions", b'{"prompt": "Hi \\ud83d", "max_tokens": 2}'),
        ("/v1/embeddings", b'{"input": "Hi \\ud83d"}'),
        ("/api/batches", b'{"prompts": ["Hi \\ud83d"], "max_tokens": 2}'),
    ],
)
def test_a_lone_surrogate_is_a_400_in_openai_shape_with_the_model_loaded(base_url, route, body):
    # The escape \ud83d with no low half: the tokenizers cannot encode it (was a plain-text 500).
    r = httpx.post(base_url + route, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_unicode" and "surrogate" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_unknown_route_is_a_404_in_openai_error_shape(base_url):
    r = httpx.get(f"{base_url}/v1/nothing-here")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_health_and_prometheus_metrics(client, base_url):
    health = httpx.get(f"{base_url}/health").json()
    assert health["status"] == "ok" and health["parallel"] == 2
    client.chat.completions.create(model="smollm2-135m-instruct", messages=HELLO, max_tokens=4)
    text = httpx.get(f"{base_url}/metrics").text
    assert 'llmlab_requests_total{route="/v1/chat/completions",status="200"}' in text
    for name in (
        "llmlab_completion_tokens_total",
        "llmlab_prompt_tokens_total",
        "llmlab_queue_depth",
        "llmlab_busy_slots",
        "llmlab_request_latency_seconds_bucket",
        "llmlab_time_to_first_token_seconds_bucket",
    ):
        assert name in text
    tokens = next(
        line for line in text.splitlines() if line.startswith("llmlab_completion_tokens_total")
    )
    assert float(tokens.split()[-1]) >= 4


def test_the_web_page_and_its_files_are_served(base_url):
    page = httpx.get(f"{base_url}/")
    assert page.status_code == 200 and "<title>Local LLM Lab</title>" in page.text
    for name in ("app.js", "style.css"):
        assert httpx.get(f"{base_url}/static/{name}").status_code == 200


def test_json_object_mode_streams_the_object_in_pieces_then_usage(client):
    kwargs = {
        "messages": [{"role": "user", "content": "Give the name and age of a person as JSON."}],
        "model": "smollm2-135m-instruct",
        "max_tokens": 60,
        "temperature": 0,
        "response_format": {"type": "json_object"},
    }
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    pieces = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(pieces) > 3 and "".join(pieces) == whole
    assert isinstance(json.loads(whole), dict)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streamed_completion_ends_with_a_finish_reason_and_usage(client):
    chunks = list(
        client.completions.create(
            model="smollm2-135m-instruct",
            prompt="1, 2, 3, 4,",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0
