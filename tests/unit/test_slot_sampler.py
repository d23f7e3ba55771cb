"""llama.cpp's sampler chain (llmlab.sampling.SlotSampler) on hand-made logits, no model:
greedy, top-k, top-p on the untempered probabilities, temperature last, seeds, the penalty."""

from __future__ import annotations

import numpy as np
import pytest

from llmlab.backends.base import GenerationParams
from llmlab.sampling import SlotSampler

# softmax ~ [.07, .50, .30, .01, .04]
LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 0.5], dtype=np.float32)


def draws(n=400, logits=LOGITS, **params) -> list[int]:
    with SlotSampler(GenerationParams(**params)) as sampler:
        return [sampler.sample_logits(logits) for _ in range(n)]


def test_temperature_zero_is_argmax_whatever_the_other_settings():
    assert set(draws(20, temperature=0, top_k=3, top_p=0.2, seed=1)) == {1}


def test_plain_greedy_takes_the_same_token_as_llama_cpps_greedy_sampler_ties_included():
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal(49152).astype(np.float32) for _ in range(20)]
    tied = np.zeros(49152, dtype=np.float32)
    tied[[7, 300, 40000]] = 5.0  # several largest logits: the first one wins
    rows.append(tied)
    with SlotSampler(GenerationParams(temperature=0)) as fast:
        picked = [fast.sample_logits(row) for row in rows]
    with SlotSampler(GenerationParams(temperature=0)) as chain:
        chain._argmax = False  # the llama.cpp chain itself, as penalised or grammar runs use
        assert picked == [chain.sample_logits(row) for row in rows]
    assert picked[-1] == 7


def test_top_k_one_and_tiny_top_p_are_greedy():
    assert set(draws(temperature=1.0, top_k=1, seed=1)) == {1}
    assert set(draws(temperature=1.0, top_k=0, top_p=0.01, seed=1)) == {1}


def test_top_k_limits_the_candidates():
    assert set(draws(temperature=5.0, top_k=2, top_p=1.0, seed=2)) == {1, 2}


def test_top_p_cuts_on_the_model_probabilities_before_temperature():
    # Untempered, 0.50 + 0.30 covers 0.75: tokens 1 and 2 stay, even though temperature 0.3
    # would make token 1 alone cover it (the engine's old NumPy order kept only token 1).
    picked = draws(2000, temperature=0.3, top_k=0, top_p=0.75, seed=3)
    assert set(picked) == {1, 2}
    # Then temperature reshapes the survivors: exp(3/0.3) : exp(2.5/0.3) is 0.84 : 0.16.
    assert picked.count(2) / len(picked) == pytest.approx(0.159, abs=0.03)


def test_without_limits_frequencies_follow_the_softmax():
    picks = draws(4000, temperature=1.0, top_k=0, top_p=1.0, seed=4)
    counts = np.bincount(picks, minlength=5) / len(picks)
    assert np.allclose(counts, np.exp(LOGITS) / np.exp(LOGITS).sum(), atol=0.03)


def test_same_seed_same_draws_and_reset_repeats_them():
    params = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
    assert draws(seed=7, **params) == draws(seed=7, **params)
    assert draws(seed=7, **params) != draws(seed=8, **params)
    with SlotSampler(GenerationParams(seed=7, **params)) as sampler:
        first = [sampler.sample_logits(LOGITS) for _ in range(50)]
        sampler.reset()
        assert [sampler.sample_logits(LOGITS) for _ in range(50)] == first


def test_repeat_penalty_pushes_accepted_tokens_down():
    with SlotSampler(GenerationParams(temperature=0, repeat_penalty=2.0)) as sampler:
        assert sampler.sample_logits(LOGITS) == 1
        sampler.accept(1)  # 3.0 / 2 = 1.5 < 2.5
        assert sampler.sample_logits(LOGITS) == 2


def test_a_grammar_needs_the_vocab():
    with pytest.raises(ValueError, match="vocab"):
        SlotSampler(GenerationParams(), 'root ::= "a"')
