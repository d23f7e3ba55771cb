"""The engine's per-sequence sampler on hand-made logits (no model needed)."""

from __future__ import annotations

import numpy as np

from llmlab.backends.base import GenerationParams
from llmlab.engine import Request, sample

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.5], dtype=np.float32)


def draws(params, n=400, seed=0):
    rng = np.random.default_rng(seed)
    return [sample(LOGITS, params, rng) for _ in range(n)]


def test_temperature_zero_is_argmax():
    assert sample(LOGITS, GenerationParams(temperature=0), np.random.default_rng()) == 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert set(draws(GenerationParams(temperature=1.0, top_k=1))) == {1}
    assert set(draws(GenerationParams(temperature=1.0, top_k=0, top_p=0.01))) == {1}


def test_top_k_limits_the_candidates():
    picked = set(draws(GenerationParams(temperature=5.0, top_k=2, top_p=1.0)))
    assert picked == {1, 2}


def test_top_p_keeps_the_smallest_set_covering_p():
    # softmax(LOGITS) ~ [.07, .50, .30, .01, .04]: 0.5 alone < 0.75, so tokens 1 and 2 remain.
    picked = set(draws(GenerationParams(temperature=1.0, top_k=0, top_p=0.75)))
    assert picked == {1, 2}


def test_without_limits_frequencies_follow_the_softmax():
    picks = draws(GenerationParams(temperature=1.0, top_k=0, top_p=1.0), n=4000)
    counts = np.bincount(picks, minlength=5) / len(picks)
    probs = np.exp(LOGITS) / np.exp(LOGITS).sum()
    assert np.allclose(counts, probs, atol=0.03)


def test_same_seed_same_draws():
    params = GenerationParams(temperature=1.0, top_k=0, top_p=1.0)
    assert draws(params, seed=7) == draws(params, seed=7)
    assert draws(params, seed=7) != draws(params, seed=8)


def test_repeat_penalty_pushes_recent_tokens_down():
    params = GenerationParams(temperature=0, repeat_penalty=2.0)
    assert sample(LOGITS, params, np.random.default_rng(), recent=[1]) == 2


def test_request_constructors_validate_parameter_names():
    request = Request.chat([{"role": "user", "content": "hi"}], max_tokens=3, stop="END")
    assert request.params.max_tokens == 3 and request.params.stop == ["END"]
    assert Request.completion("Once", temperature=0).prompt == "Once"
    try:
        Request.chat([], max_new_tokens=3)
    except TypeError as exc:
        assert "max_new_tokens" in str(exc)
    else:
        raise AssertionError("an unknown parameter name was accepted")
