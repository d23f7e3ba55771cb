"""The per-slot sampler on the real default model: greedy is the argmax, a seed repeats,
top-k / top-p / temperature act in llama.cpp's order (frequencies checked against the
distribution computed by hand from the logits), a grammar restricts the tokens, and the
same seed and settings give the llama.cpp backend's sampled text."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from llmlab import backends, structured
from llmlab.backends.base import GenerationParams
from llmlab.sampling import Grammar, SlotSampler

pytestmark = pytest.mark.slow

STORY = "Once upon a time, there was a little"
QUESTION = [{"role": "user", "content": "Tell me about your favourite animal."}]


class RawModel:
    """The default model through llama.cpp's C API: one context, one sequence, built as
    llama-cpp-python's ``Llama`` builds the backend's (same n_ctx, batch, attention kernel)."""

    def __init__(self, path: str, n_ctx: int, flash_attn: bool):
        import llama_cpp as ll

        self.ll = ll
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(path.encode(), ll.llama_model_default_params())
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = min(n_ctx, 512)
        cparams.n_threads = cparams.n_threads_batch = 1
        cparams.flash_attn_type = (
            ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)

    def decode(self, tokens: list[int]) -> np.ndarray:
        """Decode ``tokens`` after what is in the cache; a copy of the last one's logits."""
        ll = self.ll
        array = (ll.llama_token * len(tokens))(*tokens)
        assert ll.llama_decode(self.ctx, ll.llama_batch_get_one(array, len(tokens))) == 0
        row = ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self.n_vocab,)).copy()

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        return self.decode(tokens)

    def generate(self, prompt: list[int], sampler: SlotSampler, max_tokens: int) -> list[int]:
        """Tokens sampled after ``prompt`` until end of generation or ``max_tokens``."""
        self.prefill(prompt)
        out: list[int] = []
        while len(out) < max_tokens:
            token = sampler.sample(self.ctx, -1)
            if self.ll.llama_vocab_is_eog(self.vocab, token):
                break
            sampler.accept(token)
            out.append(token)
            if len(out) < max_tokens:
                self.decode([token])
        return out

    def close(self) -> None:
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


@pytest.fixture(scope="module")
def backend():
    model = backends.load(None, backend="llama.cpp", threads=1)
    model.ensure_loaded()
    yield model
    model.close()


@pytest.fixture(scope="module")
def raw(backend):
    from llmlab.settings import get_settings

    model = RawModel(str(backend.spec.path), backend.n_ctx, get_settings().flash_attn)
    yield model
    model.close()


def sampler(raw: RawModel, grammar: str | None = None, grammar_first: bool = False, **params):
    return SlotSampler(
        GenerationParams(**params), grammar, vocab=raw.vocab, grammar_first=grammar_first
    )


def story_logits(raw: RawModel, backend) -> np.ndarray:
    return raw.prefill(backend.tokenize(STORY, add_bos=True))


def draws(s: SlotSampler, raw: RawModel, n: int) -> collections.Counter:
    """``n`` tokens drawn from the same logits (the last decode's)."""
    with s:
        return collections.Counter(s.sample(raw.ctx, -1) for _ in range(n))


def llama_cpp_order(logits: np.ndarray, top_k: int, top_p: float, temp: float) -> dict:
    """Token probabilities as llama.cpp's chain gives them: top-k on the logits, top-p on
    the softmax of what is left, then temperature on the survivors."""
    ids = np.argsort(-logits, kind="stable")[:top_k]
    probs = np.exp(logits[ids] - logits[ids[0]])
    probs /= probs.sum()
    keep = int(np.argmax(np.cumsum(probs) >= top_p)) + 1
    ids = ids[:keep]
    scaled = np.exp((logits[ids] - logits[ids[0]]) / temp)
    return dict(zip(ids.tolist(), (scaled / scaled.sum()).tolist(), strict=True))


def temperature_first(logits: np.ndarray, top_k: int, top_p: float, temp: float) -> dict:
    """The same settings with temperature applied before top-p (the engine's old NumPy order)."""
    ids = np.argsort(-logits, kind="stable")[:top_k]
    probs = np.exp((logits[ids] - logits[ids[0]]) / temp)
    probs /= probs.sum()
    keep = int(np.argmax(np.cumsum(probs) >= top_p)) + 1
    return dict(zip(ids[:keep].tolist(), (probs[:keep] / probs[:keep].sum()).tolist(), strict=True))


def test_greedy_is_the_argmax_of_the_logits_at_every_step(raw, backend):
    logits = raw.prefill(backend.tokenize(STORY, add_bos=True))
    with sampler(raw, temperature=0, top_k=3, top_p=0.5, seed=1) as greedy:
        for _ in range(12):
            token = greedy.sample(raw.ctx, -1)
            assert token == int(np.argmax(logits))
            greedy.accept(token)
            logits = raw.decode([token])


def test_a_seed_gives_the_same_tokens_twice(raw, backend):
    prompt = backend.tokenize(STORY, add_bos=True)
    with (
        sampler(raw, temperature=1.0, seed=5) as first,
        sampler(raw, temperature=1.0, seed=5) as again,
    ):
        tokens = raw.generate(prompt, first, 16)
        assert raw.generate(prompt, again, 16) == tokens
        first.reset()  # the random draws start from the seed again
        assert raw.generate(prompt, first, 16) == tokens
    with sampler(raw, temperature=1.0, seed=6) as other:
        assert raw.generate(prompt, other, 16) != tokens


def test_top_k_only_ever_yields_the_k_most_likely_tokens(raw, backend):
    logits = story_logits(raw, backend)
    top3 = set(np.argsort(-logits)[:3].tolist())
    seen = draws(sampler(raw, temperature=1.5, top_k=3, top_p=1.0, seed=11), raw, 600)
    assert set(seen) == top3


def test_a_small_top_p_always_yields_the_most_likely_token(raw, backend):
    logits = story_logits(raw, backend)
    seen = draws(sampler(raw, temperature=2.0, top_k=0, top_p=0.05, seed=12), raw, 200)
    assert seen == {int(np.argmax(logits)): 200}


def test_sampled_frequencies_follow_llama_cpp_order_top_k_top_p_then_temperature(raw, backend):
    logits = story_logits(raw, backend)
    settings = {"top_k": 5, "top_p": 0.8, "temp": 1.5}
    expected = llama_cpp_order(logits, **settings)
    # The test tells the orders apart: temperature first would keep another set of tokens.
    assert set(temperature_first(logits, **settings)) != set(expected)
    n = 4000
    seen = draws(sampler(raw, temperature=1.5, top_k=5, top_p=0.8, seed=13), raw, n)
    assert set(seen) == set(expected)
    for token, p in expected.items():
        assert abs(seen[token] / n - p) < 0.03, (token, seen[token] / n, p)


@pytest.mark.parametrize("grammar_first", [False, True])
def test_a_grammar_restricts_the_tokens_to_what_it_allows(raw, backend, grammar_first):
    prompt = backend.tokenize(STORY, add_bos=True)
    with sampler(raw, temperature=1.0, seed=4) as free:
        assert not backend.detokenize(raw.generate(prompt, free, 8)).strip().isdigit()
    with sampler(raw, "root ::= [0-9]+", grammar_first, temperature=1.0, seed=4) as digits:
        text = backend.detokenize(raw.generate(prompt, digits, 8))
    assert text and text.isdigit(), text


def test_a_grammar_masks_every_token_it_does_not_allow(raw, backend):
    logits = story_logits(raw, backend)
    grammar = Grammar(raw.vocab, "root ::= [0-9]+")
    try:
        masked = grammar.constrain(logits)
        allowed = np.flatnonzero(np.isfinite(masked))
        assert len(allowed) >= 10 and np.array_equal(masked[allowed], logits[allowed])
        assert all(backend.token_piece(int(t)).isdigit() for t in allowed)
        assert grammar.allows(int(allowed[0])) and not grammar.allows(int(np.argmax(logits)))
    finally:
        grammar.free()
        grammar.free()  # twice is harmless


def test_a_grammar_that_does_not_parse_is_refused_and_a_freed_sampler_says_so(raw):
    with pytest.raises(ValueError, match="could not parse the grammar"):
        sampler(raw, "root ::= (", temperature=1.0)
    s = sampler(raw, temperature=0)
    s.free()
    s.free()  # twice is harmless
    with pytest.raises(RuntimeError, match="freed"):
        s.sample(raw.ctx, -1)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0},
        {"temperature": 0.9, "top_k": 40, "top_p": 0.95, "seed": 7},
        {"temperature": 1.2, "top_k": 0, "top_p": 0.9, "seed": 8},
        {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 9, "repeat_penalty": 1.3},
    ],
)
def test_the_same_seed_and_settings_give_the_llama_cpp_backends_sampled_text(raw, backend, params):
    prompt = backend.tokenize(backend.apply_chat_template(QUESTION), special=True)
    reply = backend.chat(QUESTION, max_tokens=32, **params)
    with sampler(raw, **params) as s:
        tokens = raw.generate(prompt, s, 32)
    assert backend.detokenize(tokens) == reply.text


def test_with_a_grammar_first_the_backends_sampled_json_is_repeated(raw, backend):
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    chat = [{"role": "user", "content": "Give a JSON object with the name of a cat."}]
    prompt = backend.tokenize(backend.apply_chat_template(chat), special=True)
    grammar = structured.grammar_for_schema(schema)
    params = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "seed": 3}
    reply = backend.chat(chat, json_schema=schema, max_tokens=48, **params)
    assert reply.finish_reason == "stop"
    with sampler(raw, grammar, grammar_first=True, **params) as s:
        assert backend.detokenize(raw.generate(prompt, s, 48)) == reply.text
    # Checked after the draw (llama.cpp server's way): valid JSON too, and greedy is the same.
    with sampler(raw, grammar, **params) as s:
        assert "name" in json.loads(backend.detokenize(raw.generate(prompt, s, 48)))
    greedy = backend.chat(chat, json_schema=schema, max_tokens=48, temperature=0)
    with sampler(raw, grammar, temperature=0) as s:
        assert backend.detokenize(raw.generate(prompt, s, 48)) == greedy.text
