"""llmlab.backends.engine_backend: a shared engine behind the Backend interface (what the
server hands to document QA), on the real default model."""

from __future__ import annotations

import threading

import pytest

from llmlab.backends.engine_backend import EngineBackend
from llmlab.engine import Engine, EngineError, QueueFullError, Request

HI = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def engine():
    with Engine(parallel=1, n_ctx=256, max_queue=1) as e:
        yield e


def test_a_chat_is_the_engines_own_reply_and_the_engine_stays_open(engine):
    model = EngineBackend(engine)
    reply = model.chat(HI, max_tokens=8, temperature=0)
    assert reply.text == engine.chat(HI, max_tokens=8, temperature=0).text
    assert reply.usage.completion_tokens <= 8
    assert model.count_tokens("hello world") == len(
        engine.prompt_tokens(Request(prompt="hello world"))
    )
    assert model.prompt_tokens(HI) == len(engine.prompt_tokens(Request(messages=HI)))
    assert model.info() == {"backend": "engine", "model": engine.spec.ref}
    assert model.context_length == 256
    model.close()
    assert engine.chat(HI, max_tokens=2).usage.completion_tokens >= 1  # still running


def test_a_stream_stopped_early_frees_the_slot(engine):
    stream = EngineBackend(engine).stream_chat(HI, max_tokens=100, temperature=0)
    next(stream)
    stream.close()  # the caller stops reading: the request is cancelled, not left decoding
    assert engine.chat(HI, max_tokens=2).usage.completion_tokens >= 1


def test_the_engine_can_come_from_a_callable_and_its_errors_are_mapped(engine):
    class Busy(Exception):
        pass

    model = EngineBackend(lambda: engine, errors=lambda exc: Busy(f"mapped: {exc}"))
    started, release = threading.Event(), threading.Event()
    running = engine.submit(Request.chat(HI, max_tokens=30),
                            on_chunk=lambda c: (started.set(), release.wait(30)))  # fmt: skip
    try:
        assert started.wait(120)
        waiting = engine.submit(Request.chat(HI, max_tokens=2))  # the one place in the queue
        with pytest.raises(Busy, match="mapped: .*max_queue=1") as busy:
            model.chat(HI, max_tokens=2)
        assert isinstance(busy.value.__cause__, QueueFullError)
    finally:
        running.cancel()
        release.set()
    waiting.result(120)
    running.result(120)


def test_without_a_mapping_the_engines_error_is_raised_as_is():
    closed = Engine(parallel=1, n_ctx=128)
    closed.close()
    with pytest.raises(EngineError, match="closed"):
        EngineBackend(closed).chat(HI, max_tokens=2)
