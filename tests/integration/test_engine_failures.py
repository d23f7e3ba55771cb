"""The engine's failure paths on the real default model: a failed ``llama_decode`` (llama.cpp's
function replaced by one that returns an error, as llama.cpp does), callbacks that raise or
submit, and a closed engine asked to tokenize."""

from __future__ import annotations

import threading

import pytest

from llmlab import backends, registry
from llmlab.backends.base import BackendError
from llmlab.engine import Engine, EngineError, Request

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "List three fruits.", "Explain gravity to a child."]


def chat(question, **params):
    return Request.chat([{"role": "user", "content": question}], **params)


def fail_next_decode(monkeypatch) -> None:
    """The next ``llama_decode`` returns -1 (llama.cpp's "invalid batch"); later ones work."""
    import llama_cpp

    real, failures = llama_cpp.llama_decode, [-1]

    def decode(ctx, batch):
        return failures.pop() if failures else real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)


def test_after_a_decode_failure_every_request_says_why_and_close_frees_the_model(monkeypatch):
    import llama_cpp

    freed: list[str] = []
    for name in ("llama_free", "llama_model_free"):
        real = getattr(llama_cpp, name)

        def free(pointer, real=real, name=name):
            freed.append(name)
            return real(pointer)

        monkeypatch.setattr(llama_cpp, name, free)
    engine = Engine(parallel=2, n_ctx=256)
    started, submitted = threading.Event(), threading.Event()
    first = engine.submit(
        chat(QUESTIONS[0], max_tokens=50, temperature=0),
        on_chunk=lambda chunk: (started.set(), submitted.wait(60)),  # holds the decode thread
    )
    assert started.wait(120)
    handles = [first] + [engine.submit(chat(q, max_tokens=8)) for q in QUESTIONS[1:]]
    fail_next_decode(monkeypatch)  # the next step prefills the second; the third waits
    submitted.set()
    for handle in handles:
        with pytest.raises(EngineError, match="llama_decode returned -1"):
            handle.result(120)
    engine.close()
    assert freed == ["llama_free", "llama_model_free"]
    engine.close()
    assert freed == ["llama_free", "llama_model_free"]  # freed once


def test_a_decode_failure_is_reported_once_and_new_requests_are_refused_with_the_reason(
    monkeypatch,
):
    told: list[EngineError] = []
    with Engine(parallel=1, n_ctx=256, on_failure=told.append) as engine:
        fail_next_decode(monkeypatch)
        with pytest.raises(EngineError):
            engine.submit(chat(QUESTIONS[0], max_tokens=8)).result(120)
        assert len(told) == 1 and told[0] is engine.failure
        assert "llama_decode returned -1" in str(engine.failure)
        with pytest.raises(EngineError, match="stopped after a failure .*llama_decode returned -1"):
            engine.submit(chat(QUESTIONS[1], max_tokens=2))


def test_a_callback_that_raises_fails_only_its_own_request():
    def broken(chunk):
        raise ValueError("the client's queue is gone")

    with Engine(parallel=2, n_ctx=256) as engine:
        bad = engine.submit(chat(QUESTIONS[0], max_tokens=16, temperature=0), on_chunk=broken)
        good = engine.submit(chat(QUESTIONS[1], max_tokens=16, temperature=0))
        with pytest.raises(EngineError, match="on_chunk callback raised ValueError: the client's"):
            bad.result(120)
        with pytest.raises(EngineError, match="on_chunk callback"):
            list(bad.stream())
        assert good.result(120).usage.completion_tokens >= 1
        after = engine.chat([{"role": "user", "content": QUESTIONS[2]}], max_tokens=4)
        assert after.usage.completion_tokens >= 1  # the engine goes on
        assert engine.active == 0 and engine.failure is None


def test_the_callback_of_a_cancelled_waiting_request_may_submit():
    # Not `with`: before the fix the decode thread deadlocked, and close() would wait forever.
    engine = Engine(parallel=1, n_ctx=256)
    started, release = threading.Event(), threading.Event()
    running = engine.submit(
        chat(QUESTIONS[2], max_tokens=50, temperature=0),
        on_chunk=lambda chunk: (started.set(), release.wait(60)),
    )
    follow_ups = []

    def resubmit(chunk):
        if chunk.finish_reason is not None:
            follow_ups.append(engine.submit(chat(QUESTIONS[0], max_tokens=4, temperature=0)))

    assert started.wait(120)
    waiting = engine.submit(chat(QUESTIONS[1], max_tokens=4), on_chunk=resubmit)
    waiting.cancel()
    running.cancel()
    release.set()
    assert waiting.result(120).finish_reason == "interrupted"
    assert len(follow_ups) == 1
    assert follow_ups[0].result(120).usage.completion_tokens >= 1
    assert running.result(120).finish_reason == "interrupted"
    engine.close()


def test_a_closed_engine_refuses_to_tokenize():
    engine = Engine(parallel=1, n_ctx=128)
    assert engine.prompt_tokens(Request.completion("Hello"))
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.prompt_tokens(Request.completion("Hello"))


@pytest.mark.parametrize(
    "params, words",
    [
        (
            {"seed": -1},
            "seed must be at least 0",
        ),  # np.random.default_rng(-1) raised on the decode thread
        ({"temperature": 1e-300}, "temperature must be 0, or at least 0.001"),  # NaN probabilities
        ({"repeat_penalty": 5e-324}, "repeat_penalty must be at least 0.01"),  # llama.cpp aborted
    ],
)
def test_out_of_range_sampling_is_refused_at_submit_and_the_engine_goes_on(params, words):
    # Found by fuzzing the server: each of these stopped the decode loop for every request
    # (or, the last one with a JSON grammar, aborted the process).
    with Engine(parallel=2, n_ctx=256) as engine:
        with pytest.raises(ValueError, match=words):
            engine.submit(chat(QUESTIONS[0], max_tokens=4, **params))
        reply = engine.submit(chat(QUESTIONS[1], max_tokens=4, temperature=0)).result(120)
        assert reply.usage.completion_tokens == 4


def test_a_file_llama_cpp_cannot_load_gets_the_same_advice_from_the_engine_as_the_backend(
    tmp_path,
):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00junk" * 1000)
    registry.save_user_entry(
        registry.ModelSpec(
            name="junk",
            format="gguf",
            capabilities=["chat"],
            source=registry.Source(kind="path", path=str(junk)),
            user=True,
        )
    )
    with pytest.raises(BackendError) as by_backend:
        backends.load("junk", backend="llama.cpp").count_tokens("hello")
    with pytest.raises(BackendError) as by_engine:
        Engine("junk", parallel=1, threads=1)
    assert str(by_engine.value) == str(by_backend.value)
    assert f"could not load junk:latest: {junk} is not a GGUF model file" in str(by_engine.value)
