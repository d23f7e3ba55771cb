"""Measure retrieval on a question set: does the right file come back in the top k?

The sample question set is ``part3/data/questions.jsonl``; each line has a question, the
files its answer lives in (``sources``; empty when the documents do not answer it) and
a short reference answer::

    from llmlab.rag.evaluate import SAMPLE_DOCS, load_questions, recall_at_k
    questions = load_questions()
    recall_at_k(store, questions, ks=[1, 3, 5])      # {1: 0.81, 3: 0.96, 5: 1.0}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.rag.store import DocumentStore

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "part3" / "data"
SAMPLE_DOCS = SAMPLE_DATA / "docs"
SAMPLE_QUESTIONS = SAMPLE_DATA / "questions.jsonl"


@dataclass
class Question:
    """One evaluation question; ``sources`` are file names, empty if unanswerable."""

    question: str
    sources: list[str] = field(default_factory=list)
    answer: str | None = None

    @property
    def answerable(self) -> bool:
        """True when some document holds the answer."""
        return bool(self.sources)


def load_questions(path: str | Path = SAMPLE_QUESTIONS) -> list[Question]:
    """Read a JSON-lines question set."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [Question(**json.loads(line)) for line in lines if line.strip()]


def recall_at_k(store: DocumentStore, questions: list[Question], ks: list[int]) -> dict[int, float]:
    """Share of answerable questions with a chunk of a right file among the top ``k`` hits."""
    answerable = [q for q in questions if q.answerable]
    if not answerable:
        raise ValueError("The question set has no answerable questions to measure recall on.")
    deepest = max(ks)
    ranks = []
    for q in answerable:
        names = [Path(hit.source).name for hit in store.search(q.question, deepest)]
        ranks.append(next((i + 1 for i, name in enumerate(names) if name in q.sources), None))
    return {k: sum(1 for r in ranks if r is not None and r <= k) / len(answerable) for k in ks}
