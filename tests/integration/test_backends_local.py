"""The one interface on both in-process engines, run on the real default model (SmolLM2 135M)."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab import backends, registry
from llmlab.backends import hf_checkpoint
from llmlab.backends.llamacpp import LlamaCppBackend
from llmlab.backends.transformers_backend import TransformersBackend
from llmlab.settings import get_settings

pytestmark = pytest.mark.slow

SKY = [{"role": "user", "content": "What color is the sky?"}]
ENGINES = ["llama.cpp", "transformers"]


@pytest.fixture(scope="module")
def module_settings(tmp_path_factory):
    # Module-scoped models outlive the per-test LLMLAB_HOME, so they get their own home.
    return get_settings(home=tmp_path_factory.mktemp("llmlab-home"))


@pytest.fixture(scope="module")
def models(module_settings):
    spec = registry.resolve(None, module_settings)
    loaded = {
        "llama.cpp": LlamaCppBackend(spec, settings=module_settings),
        "transformers": TransformersBackend(spec, settings=module_settings),
    }
    yield loaded
    for model in loaded.values():
        model.close()


@pytest.fixture(params=ENGINES)
def model(request, models):
    return models[request.param]


def common_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def test_chat_replies_with_counts_and_timings(model):
    result = model.chat(SKY, max_tokens=16, temperature=0)
    assert "blue" in result.text.lower()
    assert result.finish_reason in ("stop", "length")
    # The template's control tokens (<|im_start|>) count as one token each.
    prompt_ids = model._encode(model.apply_chat_template(SKY), add_bos=False, special=True)
    assert result.usage.prompt_tokens == len(prompt_ids)
    assert 0 < result.usage.completion_tokens <= 16
    assert result.timings.completion_tokens == result.usage.completion_tokens
    assert 0 < result.timings.time_to_first_token <= result.timings.total_seconds


def test_stream_equals_non_stream_at_temperature_zero(model):
    whole = model.chat(SKY, max_tokens=16, temperature=0)
    chunks = list(model.stream_chat(SKY, max_tokens=16, temperature=0))
    assert "".join(c.text for c in chunks) == whole.text
    assert all(c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert (last.finish_reason, last.usage) == (whole.finish_reason, whole.usage)
    assert last.timings.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_ends_with_length(model):
    result = model.complete("The capital of France is", max_tokens=3, temperature=0)
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == 3
    assert result.text.strip().startswith("Paris")


def test_chat_template_is_the_smollm2_one_from_the_file(model):
    prompt = model.apply_chat_template(SKY)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>assistant\n")
    assert not model.apply_chat_template(SKY, add_generation_prompt=False).endswith("assistant\n")


def test_tokens_round_trip_and_counts(model):
    ids = model.tokenize("Hello world")
    assert [model.token_piece(i) for i in ids] == ["Hello", " world"]
    assert model.detokenize(ids) == "Hello world"
    assert model.count_tokens("Hello world") == 2
    assert model.vocab_size == 49152
    assert model.tokenize("<|im_end|>") != [2]  # plain text: the control token is not parsed
    assert 2 in model.eos_token_ids and set(model.eos_token_ids) <= set(model.stop_token_ids)


def test_next_token_logits_predict_paris(model):
    logits = model.next_token_logits(model.tokenize("The capital of France is"))
    assert logits.dtype == np.float32 and logits.shape == (model.vocab_size,)
    assert model.token_piece(int(logits.argmax())) == " Paris"


def test_info_has_the_documented_keys(model):
    info = model.info()
    for key in ("backend", "model", "path", "context_length", "threads", "device", "dtype"):
        assert key in info
    assert info["model"] == "smollm2-135m-instruct:q4_1"
    assert info["threads"] == get_settings().threads
    assert info["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")  # both engines: the GGUF
    if info["backend"] == "transformers":
        assert info["loaded_from"] in ("gguf", "cache")
        assert info["checkpoint"].endswith("hf-checkpoint")


def test_stop_string_cuts_the_reply(model):
    full = model.chat(SKY, max_tokens=16, temperature=0).text
    word = full.split()[3]
    result = model.chat(SKY, max_tokens=16, temperature=0, stop=[word])
    assert result.text == full[: full.index(word)]
    assert result.finish_reason == "stop"


def test_context_overflow_is_refused_with_the_numbers(model):
    with pytest.raises(backends.ContextOverflowError) as info:
        model.chat(SKY, max_tokens=model.context_length)
    assert info.value.over == info.value.prompt_tokens
    assert "--max-tokens" in str(info.value)


def test_closing_a_stream_early_leaves_the_model_usable(model):
    stream = model.stream_chat(SKY, max_tokens=32, temperature=0)
    first = next(stream)
    stream.close()  # what a consumer that stops reading (or Ctrl-C) does
    assert first.text
    assert "blue" in model.chat(SKY, max_tokens=16, temperature=0).text.lower()


def test_close_then_reuse_reloads(model):
    before = model.complete("The capital of France is", max_tokens=3, temperature=0).text
    model.close()
    assert model.loaded is False
    assert model.complete("The capital of France is", max_tokens=3, temperature=0).text == before
    assert model.loaded is True


def test_greedy_replies_of_both_engines_agree(models):
    """Same file, same prompt ids, greedy: the engines agree token for token on this prompt.

    They compute in different precisions (llama.cpp: Q4_1 weights with 8-bit activations
    and an f16 KV cache; transformers: dequantized fp32), so where two candidates are
    nearly tied the greedy choice can differ; this prompt has a clear margin.
    """
    llama, hf = models["llama.cpp"], models["transformers"]
    prompt = llama.apply_chat_template(SKY)
    assert prompt == hf.apply_chat_template(SKY)
    assert llama._encode(prompt, False, True) == hf._encode(prompt, False, True)
    a = llama.chat(SKY, max_tokens=16, temperature=0).text
    b = hf.chat(SKY, max_tokens=16, temperature=0).text
    assert common_prefix(llama.tokenize(a), hf.tokenize(b)) >= 12, (a, b)


def test_both_engines_compute_nearly_the_same_logits(models):
    llama, hf = models["llama.cpp"], models["transformers"]
    for text in ("The capital of France is", "Once upon a time, there was a"):
        ids = llama.tokenize(text)
        a, b = llama.next_token_logits(ids), hf.next_token_logits(ids)
        assert np.corrcoef(a, b)[0, 1] > 0.99
        assert a.argmax() == b.argmax()


def test_a_second_request_while_a_stream_is_open_says_what_to_do(models):
    model = models["llama.cpp"]
    stream = model.stream_chat(SKY, max_tokens=8, temperature=0)
    next(stream)
    with pytest.raises(backends.BackendError, match="still streaming.*close"):
        model.chat(SKY, max_tokens=2)
    stream.close()
    assert model.chat(SKY, max_tokens=2, temperature=0).usage.completion_tokens == 2


# --- transformers: the checkpoint cached from the GGUF file ---------------------------

PROMPTS = ["What color is the sky?", "Tell me a story about a dragon.", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One transformers model converted from the GGUF into an empty cache, one read back."""
    cache = tmp_path_factory.mktemp("hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(hf_checkpoint.CACHE_ENV, str(cache))
        settings = get_settings(home=tmp_path_factory.mktemp("llmlab-home"))
        spec = registry.resolve(None, settings)
        fresh = TransformersBackend(spec, settings=settings)
        fresh.ensure_loaded()
        cached = TransformersBackend(spec, settings=settings)
        cached.ensure_loaded()
    yield fresh, cached
    fresh.close()
    cached.close()


def test_transformers_cached_checkpoint_is_the_same_model_as_the_gguf(converted):
    fresh, cached = converted
    a, b = fresh.info(), cached.info()
    assert (a["loaded_from"], b["loaded_from"]) == ("gguf", "cache")
    assert a["path"] == b["path"] and b["path"].endswith(".gguf")
    assert a["checkpoint"] == b["checkpoint"] == str(cached.checkpoint_dir)
    assert hf_checkpoint.read_marker(cached.checkpoint_dir)["source"] == b["path"]
    # Chat template and special tokens survive the round trip through save_pretrained.
    assert cached.tokenizer.chat_template == fresh.tokenizer.chat_template
    assert cached.apply_chat_template(SKY) == fresh.apply_chat_template(SKY)
    assert cached.tokenizer.all_special_tokens == fresh.tokenizer.all_special_tokens
    assert cached.tokenizer.added_tokens_decoder == fresh.tokenizer.added_tokens_decoder
    assert cached.tokenize("<|im_start|>user", special=True)[0] == 1
    assert (cached.eos_token_ids, cached.stop_token_ids) == (
        fresh.eos_token_ids,
        fresh.stop_token_ids,
    )
    ids = fresh.tokenize("The capital of France is")
    assert np.array_equal(cached.next_token_logits(ids), fresh.next_token_logits(ids))
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        want = fresh.chat(messages, max_tokens=24, temperature=0)
        got = cached.chat(messages, max_tokens=24, temperature=0)
        assert (got.text, got.usage) == (want.text, want.usage)


def test_transformers_damaged_cache_is_rebuilt_from_the_gguf(converted, monkeypatch):
    _, cached = converted
    folder = cached.checkpoint_dir
    monkeypatch.setenv(hf_checkpoint.CACHE_ENV, str(folder.parents[2]))
    model = TransformersBackend(cached.spec, settings=cached.settings)
    assert model.checkpoint_dir == folder
    weights = folder / "model.safetensors"
    with weights.open("r+b") as handle:  # same size, so only loading it can tell
        handle.write(b"\xff" * 64)
    with pytest.warns(UserWarning, match="Rebuilding the damaged checkpoint cache"):
        reply = model.chat(SKY, max_tokens=16, temperature=0).text
    assert model.info()["loaded_from"] == "gguf"
    assert reply == cached.chat(SKY, max_tokens=16, temperature=0).text
    assert hf_checkpoint.is_current(folder, cached.spec.path, cached.spec.sha256)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["hf-checkpoint"]
    model.close()
