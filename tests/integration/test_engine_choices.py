"""The engine's OpenAI extras on the real default model: logprobs (streamed and whole, with
UTF-8 characters split over tokens and stop strings), several choices from one prefill
(``n > 1``), ``cached_tokens``, ``detokenize``, and LoRA adapters chosen per request."""

from __future__ import annotations

import numpy as np
import pytest
from lora_adapters import make_adapter

from llmlab import backends, registry
from llmlab.engine import Engine, Request, next_group
from llmlab.finetune.adapters import AdapterMismatchError

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "List three fruits.", "Name a colour."]


def chat(question, **params):
    return Request.chat([{"role": "user", "content": question}], **params)


@pytest.fixture(scope="module")
def engine():
    with Engine(parallel=4, n_ctx=512) as e:
        yield e


# --- logprobs ---------------------------------------------------------------------------


def _joined(entries) -> bytes:
    return b"".join(bytes(e.bytes) for e in entries)


def test_greedy_logprobs_are_the_log_softmax_of_the_models_scores(engine):
    request = chat(QUESTIONS[0], max_tokens=8, temperature=0, logprobs=3)
    result = engine.submit(request).result()
    assert len(result.logprobs) == result.usage.completion_tokens == 8
    assert _joined(result.logprobs) == result.text.encode()
    for entry in result.logprobs:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and tops[0] <= 0
        # Greedy picks the most likely token: it heads its own list.
        assert (entry.top_logprobs[0].token, entry.top_logprobs[0].logprob) == (
            entry.token,
            entry.logprob,
        )
    model = backends.load(backend="llama.cpp", n_ctx=512)
    try:
        scores = model.next_token_logits(engine.prompt_tokens(request)).astype(np.float64)
    finally:
        model.close()
    log_softmax = scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())
    first = result.logprobs[0]
    assert first.logprob == pytest.approx(log_softmax.max(), abs=1e-3)


def test_streamed_logprobs_go_with_the_text_of_their_chunk_across_split_characters(engine):
    # The grammar forces characters that take several bytes (é) and tokens (the emoji).
    grammar = 'root ::= "Caf\u00e9 \U0001f600\U0001f680 na\u00efve"'
    chunks = list(
        engine.submit(
            Request.completion("Say it:", grammar=grammar, max_tokens=24, temperature=0, logprobs=0)
        ).stream()
    )
    text = "".join(c.text for c in chunks)
    assert text == "Caf\u00e9 \U0001f600\U0001f680 na\u00efve"
    for c in chunks:
        assert _joined(c.logprobs or []) == c.text.encode(), c
        assert all(e.top_logprobs == [] for e in c.logprobs or [])
    # Somewhere a token held part of a character only: its chunk waited for the rest.
    pieces = [bytes(e.bytes) for c in chunks for e in c.logprobs or []]
    assert any(_not_utf8(p) for p in pieces)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_logprobs_stop_where_a_stop_string_cuts_the_text(engine):
    grammar = 'root ::= "Hello, world! Again."'
    request = Request.completion(
        "Say it:", grammar=grammar, stop=["world"], max_tokens=24, temperature=0, logprobs=1
    )
    chunks = list(engine.submit(request).stream())
    result = engine.submit(request).result()
    assert result.text == "Hello, " and result.finish_reason == "stop"
    streamed = [e for c in chunks for e in c.logprobs or []]
    assert streamed == result.logprobs
    # Every token whose text is at least partly shown, and no other.
    joined = _joined(result.logprobs).decode()
    assert joined.startswith(result.text)
    assert len(_joined(result.logprobs[:-1]).decode()) < len(result.text)


def test_logprobs_are_off_unless_asked_and_out_of_range_is_refused(engine):
    result = engine.submit(chat(QUESTIONS[1], max_tokens=4, temperature=0)).result()
    assert result.logprobs is None
    for bad in (21, -1, 2.5, True):
        with pytest.raises(ValueError, match="logprobs must be None or a whole number 0..20"):
            engine.submit(chat(QUESTIONS[1], max_tokens=4, logprobs=bad))


# --- n > 1 ------------------------------------------------------------------------------


def test_greedy_choices_are_the_single_reply_and_the_prompt_is_prefilled_once():
    with Engine(parallel=4, n_ctx=512, prefix_cache=False) as engine:
        alone = engine.submit(chat(QUESTIONS[0], max_tokens=16, temperature=0)).result()
        before = engine.prefilled_tokens
        handles = engine.submit_choices(chat(QUESTIONS[0], max_tokens=16, temperature=0), 3)
        results = [h.result() for h in handles]
        assert engine.prefilled_tokens - before == alone.usage.prompt_tokens
    assert [r.text for r in results] == [alone.text] * 3
    assert [r.usage for r in results] == [alone.usage] * 3


def test_sampled_choice_i_uses_seed_plus_i_and_chunks_name_their_choice(engine):
    seen: list[tuple[int, str]] = []
    request = chat(QUESTIONS[2], max_tokens=12, temperature=1.0, seed=7)
    handles = engine.submit_choices(request, 3, on_chunk=lambda c: seen.append((c.index, c.text)))
    choices = [h.result().text for h in handles]
    singles = [
        engine.submit(chat(QUESTIONS[2], max_tokens=12, temperature=1.0, seed=7 + i)).result().text
        for i in range(3)
    ]
    assert choices == singles and len(set(choices)) > 1
    assert ["".join(t for i, t in seen if i == k) for k in range(3)] == choices


@pytest.mark.parametrize("cancelled", [0, 1])
def test_cancelling_one_choice_leaves_the_others_running(engine, cancelled):
    request = chat(QUESTIONS[1], max_tokens=12, temperature=0)
    want = engine.submit(request).result().text
    handles = engine.submit_choices(request, 3)
    handles[cancelled].cancel()  # choice 0 prefills for all: another takes over
    results = [h.result() for h in handles]
    assert results[cancelled].finish_reason == "interrupted"
    assert [r.text for i, r in enumerate(results) if i != cancelled] == [want, want]


def test_more_choices_than_slots_is_refused(engine):
    with pytest.raises(ValueError, match="n=5 choices need 5 sequences.*parallel=4"):
        engine.submit_choices(chat(QUESTIONS[0]), 5)


# --- cached_tokens, detokenize ----------------------------------------------------------


def test_cached_tokens_count_the_prompt_the_prefix_cache_saved():
    with Engine(parallel=1, n_ctx=512) as engine:
        cold = engine.chat([{"role": "user", "content": QUESTIONS[0]}], max_tokens=4)
        warm = engine.chat([{"role": "user", "content": QUESTIONS[0]}], max_tokens=4)
        other = engine.chat([{"role": "user", "content": QUESTIONS[1]}], max_tokens=4)
        assert engine.reused_prompt_tokens == warm.usage.cached_tokens + other.usage.cached_tokens
    assert cold.usage.cached_tokens == 0
    assert warm.usage.cached_tokens == warm.usage.prompt_tokens - 1  # the last is decoded again
    # The template's system prompt is shared; the question is not.
    assert 0 < other.usage.cached_tokens < other.usage.prompt_tokens - 4


def test_detokenize_is_the_inverse_of_tokenize(engine):
    text = "H\u00e9llo w\u00f6rld \U0001f600 <|im_end|>"
    assert engine.detokenize(engine.tokenize(text, special=True)) == text


# --- LoRA adapters per request -----------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "style": str(make_adapter(root / "style", 1)),
        "other": str(make_adapter(root / "other", 2)),
    }


def _reference(question: str, lora: str | None) -> str:
    model = backends.load(backend="llama.cpp", n_ctx=512, lora=lora)
    try:
        return model.chat(
            [{"role": "user", "content": question}], max_tokens=16, temperature=0
        ).text
    finally:
        model.close()


def test_each_request_gets_its_own_adapter_and_the_replies_interleave_correctly(adapters):
    questions = QUESTIONS[:2]
    want = {
        (q, name): _reference(q, adapters.get(name)) for q in questions for name in (None, "style")
    }
    assert want[(questions[0], None)] != want[(questions[0], "style")]  # the adapter matters
    with Engine(parallel=4, n_ctx=512, adapters=adapters, deterministic=True) as engine:
        keys = list(want)
        handles = [
            engine.submit(chat(q, max_tokens=16, temperature=0, lora={name: 1.0} if name else None))
            for q, name in keys
        ]
        got = {key: h.result().text for key, h in zip(keys, handles, strict=True)}
        assert engine.max_batch_sequences >= 2  # same-adapter sequences shared decode steps
        other = engine.chat(
            [{"role": "user", "content": questions[0]}],
            max_tokens=16,
            temperature=0,
            lora={"other": 1.0},
        )
    assert got == want
    assert other.text not in (want[(questions[0], None)], want[(questions[0], "style")])


def test_a_prefix_computed_under_one_adapter_is_not_reused_under_another(adapters):
    question = QUESTIONS[0]
    with Engine(parallel=1, n_ctx=512, adapters=adapters) as engine:
        base = engine.chat([{"role": "user", "content": question}], max_tokens=16, temperature=0)
        styled = engine.chat(
            [{"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
            lora={"style": 1.0},
        )
        again = engine.chat(
            [{"role": "user", "content": question}],
            max_tokens=16,
            temperature=0,
            lora={"style": 1.0},
        )
    assert styled.usage.cached_tokens == 0 and styled.text == _reference(
        question, adapters["style"]
    )
    assert again.usage.cached_tokens > 0 and again.text == styled.text
    assert base.text != styled.text


def test_unknown_adapter_names_the_loaded_ones(adapters):
    loaded = Engine(parallel=1, n_ctx=256, adapters={"style": adapters["style"]})
    with (
        loaded,
        pytest.raises(ValueError, match="Unknown LoRA adapter 'styel'. Loaded adapters: style"),
    ):
        loaded.submit(chat(QUESTIONS[0], lora={"styel": 1.0}))
    with Engine(parallel=1, n_ctx=256) as bare, pytest.raises(ValueError, match="adapters: none"):
        bare.submit(chat(QUESTIONS[0], lora={"style": 1.0}))


def test_an_adapter_made_for_another_base_model_is_refused_naming_both(tmp_path):
    path = make_adapter(tmp_path / "foreign", 3, base="qwen2.5-0.5b-instruct")
    with pytest.raises(AdapterMismatchError) as info:
        Engine(parallel=1, n_ctx=256, adapters={"foreign": str(path)})
    message = str(info.value)
    assert "qwen2.5-0.5b-instruct" in message and registry.resolve().ref in message


def test_adapter_groups_take_turns():
    base, a, b = (), (("a", 1.0),), (("b", 0.5),)
    order, last = [], None
    for _ in range(6):
        last = next_group([b, base, a], last)
        order.append(last)
    assert order == [base, a, b, base, a, b]
    assert next_group([base, b], a) == b and next_group([base], b) == base
