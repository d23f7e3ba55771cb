"""The response cache through the server: a deterministic repeat is answered from memory,
byte for byte, and /metrics counts it; sampled or opted-out requests always reach the model."""

from __future__ import annotations

import httpx
import pytest

from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

GREEDY = {
    "messages": [{"role": "user", "content": "Name a colour."}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    settings = ServerSettings(
        threads=1, home=tmp_path_factory.mktemp("home"), parallel=2, cache_entries=8
    )
    with running_server(settings) as url:
        yield url


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_greedy_repeat_is_answered_from_the_cache_byte_for_byte(http):
    hits = metric(http, "llmlab_cache_hits_total")
    body = {**GREEDY, "messages": [{"role": "user", "content": "Name a fruit."}]}
    first = http.post("/v1/chat/completions", json=body)
    second = http.post("/v1/chat/completions", json=body)
    assert first.status_code == second.status_code == 200
    assert first.headers["x-cache"] == "miss" and second.headers["x-cache"] == "hit"
    assert second.content == first.content
    assert first.json()["choices"][0]["message"]["content"]
    assert metric(http, "llmlab_cache_hits_total") == hits + 1
    assert metric(http, "llmlab_cache_entries") >= 1


def test_any_change_that_can_change_the_reply_misses(http):
    http.post("/v1/chat/completions", json=GREEDY)
    longer = http.post("/v1/chat/completions", json={**GREEDY, "max_tokens": 9})
    assert longer.headers["x-cache"] == "miss"
    stopped = http.post("/v1/chat/completions", json={**GREEDY, "stop": ["\n"]})
    assert stopped.headers["x-cache"] == "miss"


def test_a_sampled_request_without_a_seed_is_never_cached(http):
    body = {**GREEDY, "temperature": 0.9}
    for _ in range(2):
        reply = http.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200 and "x-cache" not in reply.headers


def test_a_seeded_sampled_request_is_cached(http):
    body = {**GREEDY, "temperature": 0.9, "seed": 7}
    first = http.post("/v1/chat/completions", json=body)
    second = http.post("/v1/chat/completions", json=body)
    assert second.headers["x-cache"] == "hit" and second.content == first.content


def test_a_request_can_opt_out_by_body_or_header(http):
    http.post("/v1/chat/completions", json=GREEDY)
    out = http.post("/v1/chat/completions", json={**GREEDY, "cache": False})
    assert out.status_code == 200 and "x-cache" not in out.headers
    out = http.post("/v1/chat/completions", json=GREEDY, headers={"Cache-Control": "no-cache"})
    assert out.status_code == 200 and "x-cache" not in out.headers


def test_a_stream_is_replayed_event_for_event(http):
    body = {**GREEDY, "stream": True, "stream_options": {"include_usage": True}}

    def events():
        with http.stream("POST", "/v1/chat/completions", json=body) as reply:
            lines = [line for line in reply.iter_lines() if line.startswith("data:")]
            return reply.headers.get("x-cache"), lines

    (first_state, first), (second_state, second) = events(), events()
    assert (first_state, second_state) == ("miss", "hit")
    assert second == first and first[-1] == "data: [DONE]"
    # the streamed and the whole reply are kept apart
    whole = http.post("/v1/chat/completions", json={**GREEDY, "stream": False})
    assert whole.json()["object"] == "chat.completion"


def test_text_completions_are_cached_too(http):
    body = {"prompt": "The sky is", "max_tokens": 6, "temperature": 0}
    first = http.post("/v1/completions", json=body)
    second = http.post("/v1/completions", json=body)
    assert second.headers["x-cache"] == "hit" and second.content == first.content


def test_the_cache_is_off_unless_the_server_is_given_room(tmp_path):
    with running_server(ServerSettings(threads=1, home=tmp_path, parallel=1)) as url:
        for _ in range(2):
            reply = httpx.post(f"{url}/v1/chat/completions", json=GREEDY, timeout=120)
            assert reply.status_code == 200 and "x-cache" not in reply.headers
