"""How one sequence picks its tokens: :class:`SlotSampler`, the one seam between the scheduler
and sampling (``sample`` a token from a logits row, ``accept`` it, ``free`` at the end), and
the NumPy functions behind it (:func:`sample`, :func:`token_logprob`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmlab.backends.base import GenerationParams, TokenLogprob, TopLogprob
from llmlab.engine.grammar import Grammar

# llama.cpp's repeat-penalty window (``penalty_last_n``), so penalties match the backend's.
PENALTY_LAST_N = 64


class SlotSampler:
    """The sampler of one sequence: its settings, seeded random state, grammar and history.

    The scheduler only calls :meth:`sample`, :meth:`accept` and :meth:`free`, so a sampler
    built otherwise (llama.cpp's own sampler chain) can take its place.
    """

    def __init__(self, params: GenerationParams, prompt: list[int], grammar: Grammar | None = None):
        self.params = params
        self.grammar = grammar
        self.rng = np.random.default_rng(params.seed)
        # Tokens the repeat penalty looks back on (prompt and reply so far); kept only if used.
        self._history = list(prompt) if params.repeat_penalty != 1.0 else None

    def sample(self, logits: np.ndarray) -> int:
        """The next token from one row of raw logits (penalty, grammar and settings applied)."""
        token = sample(logits, self.params, self.rng, self._history)
        if self.grammar is not None and not self.grammar.allows(token):
            token = sample(self.grammar.constrain(logits), self.params, self.rng, self._history)
        return token

    def accept(self, token: int) -> None:
        """``token`` was chosen and goes on (not called for end-of-generation)."""
        if self.grammar is not None:
            self.grammar.accept(token)
        if self._history is not None:
            self._history.append(token)

    def free(self) -> None:
        """Release what the sampler holds (the grammar is its request's and freed with it)."""
        self._history = None


def token_logprob(logits: np.ndarray, token: int, top: int, piece: Callable[[int], bytes]):
    """``token``'s log-probability under ``logits`` (log-softmax of the raw row) and the
    ``top`` most likely tokens, as a :class:`TokenLogprob`; ``piece`` gives a token's bytes."""
    logits = np.asarray(logits, dtype=np.float32)
    peak = float(logits.max())
    log_z = peak + float(np.log(np.exp(logits - peak).sum(dtype=np.float64)))
    best: list[int] = []
    if top > 0:
        ids = np.argpartition(-logits, top - 1)[:top]
        best = [int(i) for i in ids[np.argsort(-logits[ids], kind="stable")]]

    def entry(cls, t: int, **extra):
        data = piece(t)
        return cls(data.decode("utf-8", "replace"), list(data), float(logits[t]) - log_z, **extra)

    return entry(TokenLogprob, token, top_logprobs=[entry(TopLogprob, t) for t in best])


def sample(
    logits: np.ndarray,
    params: GenerationParams,
    rng: np.random.Generator,
    recent: list[int] | None = None,
) -> int:
    """Pick the next token from one row of logits: greedy at ``temperature <= 0``, otherwise
    temperature, then top-k, then top-p (nucleus), as llama.cpp's default sampler chain does."""
    logits = np.asarray(logits, dtype=np.float32)
    if params.repeat_penalty != 1.0 and recent:
        logits = logits.copy()
        ids = np.unique(np.asarray(recent[-PENALTY_LAST_N:]))
        vals = logits[ids]
        logits[ids] = np.where(vals > 0, vals / params.repeat_penalty, vals * params.repeat_penalty)
    if params.temperature <= 0:
        return int(np.argmax(logits))
    k = params.top_k if 0 < params.top_k < logits.size else logits.size
    ids = np.argpartition(-logits, k - 1)[:k] if k < logits.size else np.arange(logits.size)
    ids = ids[np.argsort(-logits[ids], kind="stable")]
    scaled = logits[ids] / params.temperature
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if 0 < params.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return int(ids[rng.choice(len(ids), p=probs)])
