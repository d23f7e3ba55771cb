"""Keyword search (BM25) over the chunks and reciprocal rank fusion with the dense ranking.

Embeddings find passages that mean the same thing in other words; BM25 finds the ones that
share the rare words of the question (a name, a number, ``MAX_BOOKING_HOURS``). Reciprocal
rank fusion (RRF, Cormack et al. 2009) merges the two rankings using ranks only, so the
scores of the two methods never have to be made comparable::

    from llmlab.rag.hybrid import BM25Index, reciprocal_rank_fusion
    index = BM25Index(["c1", "c2"], ["the laser cutter", "the wood lathe"])
    index.search("laser", top_k=5)                     # [('c1', 0.46)]: only chunks sharing a word
    reciprocal_rank_fusion([["a", "b"], ["b", "c"]])   # [('b', 0.0325), ('a', 0.0164), ('c', 0.0161)]

``score(d) = sum over rankings of 1 / (k + rank of d)``, rank 1 for the best, ``k = 60``
as in the paper: a document high in both lists beats one first in only one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import TypeVar

RRF_K = 60
Id = TypeVar("Id", bound=Hashable)


def reciprocal_rank_fusion(
    rankings: Sequence[Sequence[Id]], k: int = RRF_K
) -> list[tuple[Id, float]]:
    """Fuse rankings (ids, best first) into one: ``(id, fused score)``, best first.

    Ties keep the order in which the ids were first seen (the first ranking first).
    """
    scores: dict[Id, float] = {}
    for ranking in rankings:
        for rank, doc_id in enumerate(ranking, start=1):
            scores[doc_id] = scores.get(doc_id, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda item: -item[1])


def tokenize(texts: list[str]) -> list[list[str]]:
    """Lower-cased words without English stop words, as bm25s splits them."""
    import bm25s

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)


class BM25Index:
    """An in-memory BM25 index (``bm25s``) of chunk texts, searched by chunk id."""

    def __init__(self, ids: list[str], texts: list[str]):
        import bm25s

        self.ids = list(ids)
        self._bm25 = bm25s.BM25()
        if self.ids:
            self._bm25.index(tokenize(texts), show_progress=False)

    def search(self, query: str, top_k: int) -> list[tuple[str, float]]:
        """Up to ``top_k`` ``(id, BM25 score)``, best first; chunks sharing no word are left out."""
        words = tokenize([query])
        if not self.ids or not words[0]:
            return []
        found, scores = self._bm25.retrieve(words, k=min(top_k, len(self.ids)), show_progress=False)
        return [
            (self.ids[int(i)], float(s)) for i, s in zip(found[0], scores[0], strict=True) if s > 0
        ]
