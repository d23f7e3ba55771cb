"""The batched engine on the real default model: in deterministic mode the same greedy text
alone, beside others and through the llama.cpp backend; in the default mixed mode, valid
replies while a long prompt is prefilled beside running streams; streaming, stop strings,
cancel, a full queue, closing."""

from __future__ import annotations

import threading

import pytest

from llmlab import backends
from llmlab.backends.base import ContextOverflowError
from llmlab.engine import Engine, EngineError, QueueFullError, Request

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about rain.",
    "List three fruits.",
    "Explain gravity to a child.",
]


def chat(question, **params):
    return Request.chat([{"role": "user", "content": question}], **params)


@pytest.fixture(scope="module")
def engine():
    # Deterministic: several tests compare greedy text token for token between runs.
    with Engine(parallel=4, n_ctx=512, deterministic=True) as e:
        yield e


def test_greedy_text_is_the_same_alone_and_beside_others(engine):
    together = [engine.submit(chat(q, max_tokens=24, temperature=0)) for q in QUESTIONS]
    together = [h.result() for h in together]
    assert engine.max_batch_sequences >= 2  # they really were decoded in the same steps
    alone = [
        engine.chat([{"role": "user", "content": q}], max_tokens=24, temperature=0)
        for q in QUESTIONS
    ]
    assert [r.text for r in together] == [r.text for r in alone]
    # The same token counts; the second run found its prompts in the prefix cache.
    assert [(r.usage.prompt_tokens, r.usage.completion_tokens) for r in together] == [
        (r.usage.prompt_tokens, r.usage.completion_tokens) for r in alone
    ]
    assert all(r.usage.cached_tokens > 0 for r in alone)
    assert all(r.text for r in together)


def test_the_standard_attention_kernel_is_also_the_same_alone_and_beside_others():
    with Engine(parallel=4, n_ctx=256, flash_attn=False, deterministic=True) as engine:
        together = [engine.submit(chat(q, max_tokens=16, temperature=0)) for q in QUESTIONS]
        together = [h.result().text for h in together]
        alone = [
            engine.chat([{"role": "user", "content": q}], max_tokens=16, temperature=0).text
            for q in QUESTIONS
        ]
    assert together == alone


def test_greedy_text_equals_the_llama_cpp_backend_on_the_same_attention_kernel():
    import llama_cpp

    model = backends.load(backend="llama.cpp", n_ctx=512)
    try:
        reference = [
            model.chat([{"role": "user", "content": q}], max_tokens=24, temperature=0)
            for q in QUESTIONS
        ]
        flash = model._llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    finally:
        model.close()
    with Engine(parallel=4, n_ctx=512, deterministic=True) as engine:
        assert engine.flash_attn == flash  # the same attention kernel by default
        handles = [engine.submit(chat(q, max_tokens=24, temperature=0)) for q in QUESTIONS]
        results = [h.result() for h in handles]
    assert [r.text for r in results] == [r.text for r in reference]
    tokens = [(r.usage.prompt_tokens, r.usage.completion_tokens) for r in results]
    assert tokens == [(r.usage.prompt_tokens, r.usage.completion_tokens) for r in reference]
    # The same text although the later prompts copied the template's start from the first.
    assert results[0].usage.cached_tokens == 0
    assert all(r.usage.cached_tokens >= 8 for r in results[1:])
    assert [r.finish_reason for r in results] == [r.finish_reason for r in reference]


SAMPLED = [
    {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7},
    {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 9, "repeat_penalty": 1.3},
]


def test_sampled_text_equals_the_llama_cpp_backends_with_the_same_seed_and_settings(engine):
    # Both sample with llama.cpp's chain in llama.cpp's order (top-k, top-p, temperature);
    # the engine's NumPy sampler (temperature first, its own random numbers) did not.
    model = backends.load(backend="llama.cpp", n_ctx=512)
    try:
        reference = [
            model.chat([{"role": "user", "content": QUESTIONS[1]}], max_tokens=24, **params).text
            for params in SAMPLED
        ]
    finally:
        model.close()
    handles = [engine.submit(chat(QUESTIONS[1], max_tokens=24, **params)) for params in SAMPLED]
    assert [h.result().text for h in handles] == reference


def test_stream_pieces_add_up_to_the_result_and_end_with_usage(engine):
    handle = engine.submit(chat("Name a colour.", max_tokens=12, temperature=0))
    chunks = list(handle.stream())
    result = handle.result()
    assert "".join(c.text for c in chunks) == result.text
    assert chunks[-1].finish_reason == result.finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == result.usage.completion_tokens <= 12
    assert result.usage.prompt_tokens == len(handle.prompt_tokens)


def test_max_tokens_and_stop_strings(engine):
    long = engine.submit(chat(QUESTIONS[3], max_tokens=5, temperature=0)).result()
    assert long.finish_reason == "length" and long.usage.completion_tokens == 5
    full = engine.chat([{"role": "user", "content": QUESTIONS[2]}], max_tokens=24, temperature=0)
    word = full.text.split()[2]
    cut = engine.chat(
        [{"role": "user", "content": QUESTIONS[2]}], max_tokens=24, temperature=0, stop=[word]
    )
    assert cut.finish_reason == "stop" and word not in cut.text
    assert full.text.startswith(cut.text)


def test_seeded_sampling_repeats_and_raw_completion_works(engine):
    a = engine.submit(chat("Tell me a story.", max_tokens=10, temperature=1.0, seed=3))
    b = engine.submit(chat("Tell me a story.", max_tokens=10, temperature=1.0, seed=3))
    assert a.result().text == b.result().text
    raw = engine.submit(
        Request.completion("The capital of France is", max_tokens=4, temperature=0)
    ).result()
    assert raw.usage.completion_tokens >= 1 and raw.text


def test_cancel_frees_the_slot_for_the_next_request():
    with Engine(parallel=1, n_ctx=256) as engine:
        started = threading.Event()
        release = threading.Event()

        def hold(chunk):
            started.set()
            release.wait(30)  # runs on the engine thread: the engine waits here

        first = engine.submit(chat(QUESTIONS[3], max_tokens=200, temperature=0), on_chunk=hold)
        second = engine.submit(chat(QUESTIONS[0], max_tokens=4, temperature=0))
        assert started.wait(120)
        assert engine.active == 1 and engine.queued == 1
        first.cancel()
        release.set()
        assert first.result(120).finish_reason == "interrupted"
        assert first.result().usage.completion_tokens < 200
        assert second.result(120).usage.completion_tokens >= 1
        assert engine.active == 0 and engine.queued == 0


def test_a_full_queue_refuses_and_cancelled_waiting_requests_leave_it():
    with Engine(parallel=1, n_ctx=256, max_queue=1) as engine:
        started, release = threading.Event(), threading.Event()
        running = engine.submit(
            chat(QUESTIONS[3], max_tokens=50, temperature=0),
            on_chunk=lambda c: (started.set(), release.wait(30)),
        )
        assert started.wait(120)
        waiting = engine.submit(chat(QUESTIONS[0], max_tokens=2))
        with pytest.raises(QueueFullError, match="max_queue=1"):
            engine.submit(chat(QUESTIONS[1], max_tokens=2))
        waiting.cancel()
        running.cancel()
        release.set()
        assert waiting.result(120).finish_reason == "interrupted"
        assert waiting.result().usage.completion_tokens == 0
        assert running.result(120).finish_reason == "interrupted"


def test_requests_too_long_are_refused_and_a_closed_engine_says_so():
    engine = Engine(parallel=2, n_ctx=128)
    with pytest.raises(ContextOverflowError):
        engine.submit(chat("word " * 200, max_tokens=8))
    with pytest.raises(ValueError, match="exactly one"):
        engine.submit(Request())
    engine.close()
    with pytest.raises(EngineError, match="closed"):
        engine.submit(chat("hi", max_tokens=2))
    engine.close()  # closing twice is harmless


def test_a_grammar_limits_the_reply_to_what_it_allows(engine):
    grammar = 'root ::= ("yes" | "no") "."'
    handles = [
        engine.submit(chat(q, grammar=grammar, max_tokens=8, temperature=t, seed=3))
        for q in ["Is the sky blue?", "Is fire cold?"]
        for t in (0.0, 1.5)
    ]
    replies = [h.result() for h in handles]
    assert {r.text for r in replies} <= {"yes.", "no."}, [r.text for r in replies]
    assert all(r.finish_reason == "stop" for r in replies)  # the grammar ends, then end of turn


def test_json_grammar_gives_an_object_beside_unconstrained_requests(engine):
    import json

    from llama_cpp.llama_grammar import JSON_GBNF

    free = engine.submit(chat(QUESTIONS[0], max_tokens=24, temperature=0))
    json_chat = [
        {"role": "system", "content": "Reply with one valid JSON object and nothing else."},
        {"role": "user", "content": "Give a JSON object with keys name and age for a cat."},
    ]
    constrained = engine.submit(
        Request.chat(json_chat, grammar=JSON_GBNF, max_tokens=120, temperature=0)
    )
    reply = constrained.result()
    assert reply.finish_reason == "stop", reply
    assert isinstance(json.loads(reply.text), dict)
    # The unconstrained neighbour is untouched: same text as alone.
    alone = engine.chat([{"role": "user", "content": QUESTIONS[0]}], max_tokens=24, temperature=0)
    assert free.result().text == alone.text


def test_a_grammar_that_does_not_parse_is_refused_at_submit(engine):
    with pytest.raises(ValueError, match="grammar"):
        engine.submit(chat("Hi", grammar="root ::= (", max_tokens=4))
    assert engine.chat([{"role": "user", "content": "Hi"}], max_tokens=2).usage.completion_tokens


def test_a_prompt_that_starts_like_an_earlier_one_prefills_only_the_rest(engine):
    first = [{"role": "user", "content": "Name a colour."}]
    reply = engine.chat(first, max_tokens=12, temperature=0)
    before = engine.reused_prompt_tokens
    again = engine.chat(first, max_tokens=12, temperature=0)
    prompt_tokens = again.usage.prompt_tokens
    assert engine.reused_prompt_tokens - before == prompt_tokens - 1  # all but the last token
    assert again.text == reply.text
    # A follow-up turn starts with the whole first exchange: that part comes from the cache.
    follow_up = [*first, {"role": "assistant", "content": reply.text}]
    follow_up.append({"role": "user", "content": "And another?"})
    before = engine.reused_prompt_tokens
    cached = engine.chat(follow_up, max_tokens=12, temperature=0)
    assert engine.reused_prompt_tokens - before >= prompt_tokens
    with Engine(parallel=1, n_ctx=512, prefix_cache=False, deterministic=True) as fresh:
        assert fresh.chat(follow_up, max_tokens=12, temperature=0).text == cached.text
        assert fresh.chat(follow_up, max_tokens=12, temperature=0).text == cached.text
        assert fresh.reused_prompt_tokens == 0


def test_mixed_prefill_gives_whole_replies_while_a_long_prompt_goes_in_beside_them():
    # The default mode: prompts are prefilled in chunks inside the running streams' steps.
    with Engine(parallel=4, n_ctx=512, prefill_chunk=16) as engine:
        assert not engine.deterministic and engine.prefill_chunk == 16
        streams = [engine.submit(chat(q, max_tokens=24, temperature=0)) for q in QUESTIONS[:3]]
        long_question = "Summarize this: " + " ".join(["The river runs to the sea."] * 12)
        late = engine.submit(chat(long_question, max_tokens=24, temperature=0))
        results = [h.result(300) for h in [*streams, late]]
        assert late.result().usage.prompt_tokens > 3 * 16  # prefilled over several steps
        assert engine.max_batch_sequences >= 2
    for result in results:
        assert result.finish_reason in ("stop", "length") and result.text.strip()
        assert "\ufffd" not in result.text  # whole UTF-8 characters
        assert result.usage.completion_tokens == 24 or result.finish_reason == "stop"
