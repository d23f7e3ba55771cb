"""llama.cpp's grammar sampler for one request (GBNF: JSON mode, structured output)."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np


class Grammar:
    """llama.cpp's grammar sampler for one request: masks every token the grammar forbids.

    Checking all ~50k tokens against the grammar costs about as much as a decode step, so
    the engine first samples as usual and asks ``allows`` about that one token; only when
    the grammar rejects it does ``constrain`` set every forbidden logit to -inf for a second
    draw (llama.cpp's common sampler does the same; the result has exactly the constrained
    distribution). ``accept`` advances the grammar past the chosen token.
    """

    def __init__(self, llama_cpp: Any, vocab: Any, n_vocab: int, gbnf: str):
        self._ll = llama_cpp
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
        if not self._sampler:
            raise ValueError(
                "llama.cpp could not parse the grammar (GBNF with a rule named 'root' is needed)"
            )
        self._candidates = np.zeros(
            n_vocab, dtype=np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        )
        self._candidates["id"] = np.arange(n_vocab, dtype=np.int32)
        self._array = self._token_array(self._candidates)
        self._one = np.zeros(1, dtype=self._candidates.dtype)
        self._one_array = self._token_array(self._one)

    def _token_array(self, candidates: np.ndarray) -> Any:
        return self._ll.llama_token_data_array(
            data=candidates.ctypes.data_as(self._ll.llama_token_data_p),
            size=len(candidates),
            selected=-1,
            sorted=False,
        )

    def _apply(self, array: Any, size: int) -> None:
        # The sampler may have marked the array selected or sorted last time: reset first.
        array.size, array.selected, array.sorted = size, -1, False
        self._ll.llama_sampler_apply(self._sampler, ctypes.byref(array))

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (one candidate checked, not the vocabulary)."""
        self._one[0] = (token, 0.0, 0.0)
        self._apply(self._one_array, 1)
        return bool(np.isfinite(self._one["logit"][0]))

    def constrain(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with every token the grammar forbids here set to -inf (a new array)."""
        self._candidates["logit"] = logits
        self._apply(self._array, len(self._candidates))
        return self._candidates["logit"].copy()

    def accept(self, token: int) -> None:
        """Advance the grammar past ``token``."""
        self._ll.llama_sampler_accept(self._sampler, token)

    def free(self) -> None:
        """Release llama.cpp's sampler (safe to call twice)."""
        if self._sampler:
            self._ll.llama_sampler_free(self._sampler)
            self._sampler = None
