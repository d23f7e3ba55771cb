"""API key, body size and prompt limits, a full queue (503), and a client that hangs up mid-stream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from openai import OpenAI

from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

# threads=1: these tests check behaviour, not speed, and one llama.cpp thread never stalls
# waiting for a second one when other work shares the CPU (many threads can be 20x slower then).

pytestmark = pytest.mark.slow

HELLO = [{"role": "user", "content": "Hello"}]
# A counting prompt the model keeps continuing, so a long max_tokens keeps its slot busy.
COUNTING = {"prompt": "1, 2, 3, 4, 5, 6,", "max_tokens": 2000, "temperature": 0, "stream": True}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    settings = ServerSettings(
        threads=1,
        home=tmp_path_factory.mktemp("home"),
        parallel=1,
        api_key="s3cret",
        max_body_bytes=4096,
        max_prompt_tokens=60,
    )
    with running_server(settings) as url:
        yield url


def test_requests_without_the_right_key_get_401(guarded):
    client = OpenAI(base_url=f"{guarded}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.models.list()
    assert err.value.code == "invalid_api_key" and "Wrong API key" in err.value.body["message"]
    bare = httpx.post(f"{guarded}/v1/chat/completions", json={"messages": HELLO})
    assert bare.status_code == 401 and "Missing API key" in bare.json()["error"]["message"]
    assert httpx.get(f"{guarded}/metrics").status_code == 401


def test_the_right_key_works_and_health_and_page_need_none(guarded):
    client = OpenAI(base_url=f"{guarded}/v1", api_key="s3cret", max_retries=0)
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct", messages=HELLO, max_tokens=4
    )
    assert reply.usage.completion_tokens > 0
    assert httpx.get(f"{guarded}/health").json()["status"] == "ok"
    assert httpx.get(f"{guarded}/").status_code == 200


def test_a_body_over_the_limit_is_413(guarded):
    big = {"messages": [{"role": "user", "content": "word " * 2000}]}
    headers = {"Authorization": "Bearer s3cret"}
    r = httpx.post(f"{guarded}/v1/chat/completions", json=big, headers=headers)
    assert r.status_code == 413
    assert (
        r.json()["error"]["code"] == "request_too_large" and "4,096" in r.json()["error"]["message"]
    )

    def chunked():  # no Content-Length: the server counts as it reads
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"word " * 20
        yield b'"}]}'

    r = httpx.post(
        f"{guarded}/v1/chat/completions",
        content=chunked(),
        headers={**headers, "content-type": "application/json"},
    )
    assert r.status_code == 413


def test_a_prompt_over_the_token_limit_is_400(guarded):
    client = OpenAI(base_url=f"{guarded}/v1", api_key="s3cret", max_retries=0)
    long = [{"role": "user", "content": "apple " * 100}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smollm2-135m-instruct", messages=long, max_tokens=4)
    assert err.value.code == "context_length_exceeded" and "60" in err.value.body["message"]


def test_a_chat_prompt_is_rendered_once_for_the_limit_check_and_the_engine(guarded, monkeypatch):
    from llmlab.engine import Engine

    rendered: list[list[dict]] = []
    original = Engine.apply_chat_template

    def counting(self, messages, tools=None):
        rendered.append(messages)
        return original(self, messages, tools)

    monkeypatch.setattr(Engine, "apply_chat_template", counting)
    client = OpenAI(base_url=f"{guarded}/v1", api_key="s3cret", max_retries=0)
    client.chat.completions.create(model="smollm2-135m-instruct", messages=HELLO, max_tokens=2)
    assert len(rendered) == 1
    long = [{"role": "user", "content": "apple " * 100}]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smollm2-135m-instruct", messages=long, max_tokens=2)
    assert len(rendered) == 2


@pytest.fixture(scope="module")
def tiny_queue(tmp_path_factory):
    settings = ServerSettings(
        threads=1,
        home=tmp_path_factory.mktemp("home"),
        parallel=1,
        queue_size=1,
        retry_after=3,
        max_tokens_limit=2000,
    )
    with running_server(settings) as url:
        yield url


def _metric(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def _health(base_url: str) -> dict:
    return httpx.get(f"{base_url}/health").json()


def _wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _first_token(response: httpx.Response) -> Iterator[str]:
    """Read up to the first text; returns the open line iterator. Keep it: dropping it would
    close the connection, which is the disconnect this file tests on purpose elsewhere."""
    assert response.status_code == 200, response.read()
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {") and any(
            c.get("text") for c in json.loads(line[6:])["choices"]
        ):
            return lines
    raise AssertionError("the stream ended before any text")


def test_full_queue_answers_503_with_retry_after(tiny_queue):
    client = OpenAI(base_url=f"{tiny_queue}/v1", api_key="unused", max_retries=0)
    with (
        httpx.Client(base_url=tiny_queue, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=COUNTING) as running,
    ):
        reading = _first_token(running)  # decoding: the only slot is busy
        with http.stream("POST", "/v1/completions", json=COUNTING) as waiting:
            assert waiting.status_code == 200  # queued behind the first
            assert _wait_for(lambda: _health(tiny_queue)["queue_depth"] == 1), _health(tiny_queue)
            with pytest.raises(openai.InternalServerError) as err:
                client.chat.completions.create(model="smollm2-135m-instruct", messages=HELLO)
            assert err.value.status_code == 503
            assert err.value.response.headers["retry-after"] == "3"
            assert err.value.code == "queue_full"
        # The first stream was never disturbed: it goes on.
        assert next(line for line in reading if line.startswith("data: {"))
    assert _metric(tiny_queue, "llmlab_rejected_requests_total") == 1
    # Both streams were dropped by the client: their slot and queue place are freed.
    assert _wait_for(lambda: _health(tiny_queue)["busy_slots"] == 0)
    assert _health(tiny_queue)["queue_depth"] == 0


def test_client_that_disconnects_mid_stream_frees_its_slot(tiny_queue):
    before = _metric(tiny_queue, "llmlab_cancelled_requests_total")
    with (
        httpx.Client(base_url=tiny_queue, timeout=120) as http,
        http.stream("POST", "/v1/completions", json=COUNTING) as r,
    ):
        reading = _first_token(r)
        assert next(line for line in reading if line.startswith("data: {"))
        assert _health(tiny_queue)["busy_slots"] == 1
    # 2000 tokens take far longer than this wait; the slot frees because we left.
    assert _wait_for(lambda: _health(tiny_queue)["busy_slots"] == 0, 5)
    assert _metric(tiny_queue, "llmlab_cancelled_requests_total") == before + 1
    client = OpenAI(base_url=f"{tiny_queue}/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="smollm2-135m-instruct", prompt="1, 2,", max_tokens=2)
    assert reply.usage.completion_tokens == 2


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {**COUNTING, "stream": False}),
        (
            "/v1/chat/completions",
            # Greedy, this reply runs to max_tokens with the default model (a request to
            # count "one per line" ends after ten lines, well inside the client's wait).
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "Write the numbers from 1 to 500 separated by commas.",
                    }
                ],
                "max_tokens": 2000,
                "temperature": 0,
            },
        ),
    ],
    ids=["completion", "chat"],
)
def test_client_that_gives_up_on_a_whole_reply_frees_its_slot(tiny_queue, path, body):
    before = _metric(tiny_queue, "llmlab_cancelled_requests_total")
    with (
        httpx.Client(base_url=tiny_queue, timeout=httpx.Timeout(30, read=2)) as http,
        pytest.raises(httpx.ReadTimeout),
    ):
        http.post(path, json=body)  # the client stops waiting and closes the connection
    # Up to 2000 tokens take far longer than this wait; the slot frees because we left.
    assert _wait_for(lambda: _health(tiny_queue)["busy_slots"] == 0, 5), _health(tiny_queue)
    assert _metric(tiny_queue, "llmlab_cancelled_requests_total") == before + 1
