"""The remote backend against a small OpenAI-compatible server started in the test
(FastAPI + uvicorn on 127.0.0.1, backed by the real llama.cpp backend)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from llmlab import backends, registry
from llmlab.backends.llamacpp import LlamaCppBackend
from llmlab.backends.remote import RemoteBackend
from llmlab.settings import get_settings
from llmlab.structured import StructuredOutputError

MODEL_ID = "smollm2"
SKY = [{"role": "user", "content": "What color is the sky?"}]
HELLO = [{"role": "user", "content": "Say hello in one word."}]


def make_app(model, tokenizer: bool = True, schemas: bool = True) -> FastAPI:
    """The OpenAI routes a client needs, answering with ``model`` (any llmlab Backend).

    ``response_format`` json_schema is honoured (``schemas=False``: ignored, as by a server
    that does not know it); ``app.state.bodies`` records each chat request's body.
    """
    app = FastAPI()
    app.state.bodies = []

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": MODEL_ID,
                    "object": "model",
                    "owned_by": "test",
                    "context_length": model.context_length,
                }
            ],
        }

    if tokenizer:

        @app.post("/tokenize")  # llama-server's route and body
        async def tokenize(request: Request):
            body = await request.json()
            return {"tokens": model.tokenize(body["content"])}

    @app.post("/v1/chat/completions")  # streaming only: RemoteBackend always streams
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") != MODEL_ID:
            return JSONResponse(
                {"error": {"message": f"model {body.get('model')!r} not found"}}, status_code=404
            )
        app.state.bodies.append(body)
        params = {
            k: body[k] for k in ("max_tokens", "temperature", "top_p", "seed", "stop") if k in body
        }
        response_format = body.get("response_format") or {}
        if schemas and response_format.get("type") == "json_schema":
            params["json_schema"] = response_format["json_schema"]["schema"]
        with_usage = (body.get("stream_options") or {}).get("include_usage", False)

        def events():
            base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": MODEL_ID}
            for chunk in model.stream_chat(body["messages"], **params):
                delta = {"content": chunk.text} if chunk.text else {}
                yield f"data: {json.dumps(base | {'choices': [{'index': 0, 'delta': delta, 'finish_reason': chunk.finish_reason}]})}\n\n"
                if chunk.usage and with_usage:
                    usage = {
                        "prompt_tokens": chunk.usage.prompt_tokens,
                        "completion_tokens": chunk.usage.completion_tokens,
                        "total_tokens": chunk.usage.total_tokens,
                    }
                    yield f"data: {json.dumps(base | {'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(app: FastAPI):
    """Run ``app`` in a thread; yields its base URL, stops it afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "test server did not start"
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    settings = get_settings(home=tmp_path_factory.mktemp("llmlab-home"))
    model = LlamaCppBackend(registry.resolve(None, settings), settings=settings)
    yield model
    model.close()


@pytest.fixture(scope="module")
def app(local_model):
    return make_app(local_model)


@pytest.fixture(scope="module")
def base_url(app):
    yield from serve(app)


@pytest.mark.slow
def test_chat_through_the_server_matches_the_local_reply(base_url, local_model):
    remote = backends.load(MODEL_ID, base_url=base_url)
    assert isinstance(remote, RemoteBackend)
    result = remote.chat(SKY, max_tokens=12, temperature=0)
    local = local_model.chat(SKY, max_tokens=12, temperature=0)
    assert result.text == local.text
    assert (result.finish_reason, result.usage) == (
        local.finish_reason,
        local.usage,
    )  # usage sent by the server
    assert result.timings.completion_tokens == local.usage.completion_tokens


@pytest.mark.slow
def test_stream_chat_yields_pieces_then_totals(base_url):
    remote = RemoteBackend(MODEL_ID, base_url=base_url)
    chunks = list(remote.stream_chat(SKY, max_tokens=12, temperature=0))
    assert len(chunks) > 2 and all(c.finish_reason is None for c in chunks[:-1])
    assert "blue" in "".join(c.text for c in chunks).lower()
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens > 0


class Person(BaseModel):
    name: str
    age: int


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_a_schema_goes_to_the_server_and_sampled_replies_come_back_validated(app, base_url, seed):
    remote = RemoteBackend(MODEL_ID, base_url=base_url)
    ask = [{"role": "user", "content": "Invent a person: name and age."}]
    person = remote.chat(ask, schema=Person, temperature=1.0, seed=seed, max_tokens=64)
    assert isinstance(person, Person)
    assert app.state.bodies[-1]["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "Person", "schema": Person.model_json_schema(), "strict": True},
    }


@pytest.mark.slow
def test_a_server_that_ignores_the_schema_is_an_error_naming_what_failed(local_model):
    gen = serve(make_app(local_model, schemas=False))
    url = next(gen)
    try:
        remote = RemoteBackend(MODEL_ID, base_url=url)
        with pytest.raises(StructuredOutputError, match="reply does not validate|not JSON"):
            remote.chat(HELLO, schema=Person, temperature=0, max_tokens=64)
    finally:
        next(gen, None)


@pytest.mark.slow
def test_default_model_info_and_exact_token_counts(base_url, local_model):
    remote = backends.load(backend="remote", base_url=base_url)  # no name: the server's first model
    assert remote.count_tokens("Hello world") == 2
    info = remote.info()
    assert info["model"] == MODEL_ID and info["base_url"] == base_url
    assert info["exact_token_counts"] is True
    assert info["context_length"] == local_model.context_length


@pytest.mark.slow
def test_unknown_model_names_what_the_server_has(base_url):
    remote = RemoteBackend("nope", base_url=base_url)
    with pytest.raises(backends.BackendError, match=r"no model 'nope'.*Models it serves: smollm2"):
        remote.chat(SKY, max_tokens=4)


def test_server_without_tokenizer_gets_approximate_counts():
    gen = serve(make_app(model=type("M", (), {"context_length": 512})(), tokenizer=False))
    url = next(gen)
    try:
        remote = RemoteBackend(MODEL_ID, base_url=url)
        assert remote.count_tokens("x" * 41) == 11  # one token per 4 characters, rounded up
        assert remote.info()["exact_token_counts"] is False
        assert remote.context_length == 512
    finally:
        next(gen, None)


def test_connection_refused_names_the_url_and_what_to_do():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    remote = backends.load("any", backend="openai", base_url=url)
    with pytest.raises(
        backends.BackendError, match=rf"Cannot reach the model server at {url}.*Start the server"
    ):
        remote.chat(SKY, max_tokens=4)
    assert remote.info()["reachable"] is False
