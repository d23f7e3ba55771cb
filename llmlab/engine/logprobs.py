"""Logprobs of generated tokens, from the model's raw logits (before any sampling setting)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmlab.backends.base import TokenLogprob, TopLogprob


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
