"""Perplexity arithmetic and window planning, with small stand-in models (no weights)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmlab.perplexity import compare, evaluate, perplexity, reference, token_nll, windows

V = 7  # vocabulary of the stand-in models


class CountingModel:
    """Tokens are digits; it predicts "next = current + 1 (mod V)" with probability ``p``."""

    def __init__(self, p: float = 0.9):
        self.p = p
        self.calls: list[int] = []

    def tokenize(self, text: str, add_bos: bool = False) -> list[int]:
        return [int(c) for c in text]

    def logits(self, ids: list[int]) -> np.ndarray:
        self.calls.append(len(ids))
        other = (1 - self.p) / (V - 1)
        out = np.full((len(ids), V), math.log(other))
        out[np.arange(len(ids)), (np.asarray(ids) + 1) % V] = math.log(self.p)
        return out


class UniformModel(CountingModel):
    def logits(self, ids: list[int]) -> np.ndarray:
        self.calls.append(len(ids))
        return np.zeros((len(ids), V))


def counting_text(n: int) -> str:
    return "".join(str(i % V) for i in range(n))


@pytest.mark.parametrize("n_tokens", [2, 5, 16, 17, 100])
@pytest.mark.parametrize(("n_ctx", "stride"), [(4, 1), (4, 2), (4, 3), (16, 8), (8, 7)])
def test_every_token_is_scored_once_with_enough_context(n_tokens, n_ctx, stride):
    plan = windows(n_tokens, n_ctx, stride)
    targets = [t for _, end, first in plan for t in range(first, end)]
    assert targets == list(range(1, n_tokens))
    for begin, end, first in plan:
        assert end - begin <= n_ctx
        assert begin <= first - 1  # the first target's prediction is inside the window
        if begin > 0:  # later windows keep at least n_ctx - stride tokens of context
            assert first - begin >= n_ctx - stride


def test_a_stride_that_leaves_no_context_is_refused():
    with pytest.raises(ValueError, match="stride"):
        windows(100, n_ctx=8, stride=8)


def test_token_nll_is_the_negative_log_softmax():
    logits = np.array([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, -5.0]])
    nll = token_nll(logits, np.array([1, 0]))
    expected_second = -(10 - math.log(math.exp(10) + 2 + math.exp(-5)))
    assert nll == pytest.approx([math.log(4), expected_second])


def test_a_uniform_guess_has_the_vocabulary_size_as_perplexity():
    assert perplexity(UniformModel(), counting_text(50), n_ctx=8, stride=4) == pytest.approx(V)


def test_predictions_are_matched_with_the_token_they_predict():
    # Right with probability p on every token only if row i is scored against token i+1.
    model = CountingModel(p=0.9)
    result = evaluate(model, counting_text(40), n_ctx=8, stride=3)
    assert result.perplexity == pytest.approx(1 / 0.9)
    assert result.tokens == 39
    assert result.windows == len(windows(40, 8, 3))
    assert all(n <= 8 for n in model.calls)


def test_a_text_that_breaks_the_pattern_scores_worse():
    good = perplexity(CountingModel(), counting_text(30), n_ctx=8)
    bad = perplexity(CountingModel(), "0000000000000000000000000000", n_ctx=8)
    assert bad > good


def test_max_tokens_scores_only_the_beginning():
    model = UniformModel()
    result = evaluate(model, counting_text(100), n_ctx=8, stride=4, max_tokens=20)
    assert result.tokens == 19
    assert sum(model.calls) <= 20 + 4 * len(model.calls)


def test_a_text_of_one_token_is_refused():
    with pytest.raises(ValueError, match="at least two tokens"):
        perplexity(UniformModel(), "3")


def test_the_reference_itself_has_no_divergence():
    text = counting_text(30)
    ref = reference(CountingModel(0.9), text, n_ctx=8, stride=4)
    result = evaluate(CountingModel(0.9), text, n_ctx=8, reference=ref)
    assert result.kl == pytest.approx(0, abs=1e-6)
    assert result.top1 == 1.0
    assert evaluate(CountingModel(0.9), text, n_ctx=8).kl is None


def test_kl_divergence_from_the_reference_matches_the_formula():
    text = counting_text(30)
    ref = reference(CountingModel(0.9), text, n_ctx=8, stride=4)
    result = evaluate(CountingModel(0.5), text, n_ctx=8, reference=ref)
    expected = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert result.kl == pytest.approx(expected, rel=1e-5)
    assert result.top1 == 1.0  # less sure, but still the same favourite
    assert result.perplexity == pytest.approx(2.0)


def test_the_reference_knows_its_own_perplexity():
    text = counting_text(30)
    ref = reference(CountingModel(0.8), text, n_ctx=8, stride=4)
    assert ref.perplexity == pytest.approx(perplexity(CountingModel(0.8), text, n_ctx=8, stride=4))


def test_compare_gives_what_evaluate_gives_against_a_kept_reference():
    text = counting_text(30)
    kept = reference(CountingModel(0.9), text, n_ctx=8, stride=4)
    expected = evaluate(CountingModel(0.5), text, n_ctx=8, reference=kept)
    streamed = compare(CountingModel(0.9), CountingModel(0.5), text, n_ctx=8, stride=4)
    assert streamed.kl == pytest.approx(expected.kl, rel=1e-6)
    assert streamed.perplexity == pytest.approx(expected.perplexity)
    assert (streamed.top1, streamed.tokens) == (expected.top1, expected.tokens)
    same = compare(CountingModel(0.9), CountingModel(0.9), text, n_ctx=8, max_tokens=20)
    assert same.kl == pytest.approx(0, abs=1e-9) and same.tokens == 19
