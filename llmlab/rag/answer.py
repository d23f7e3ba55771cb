"""Answer a question from retrieved chunks, citing them as [1], [2] ...

Retrieval comes first. If no chunk scores at least ``threshold`` (cosine similarity), the
answer is that the documents do not contain it, and no language model is loaded at all.
Otherwise the best chunks go into the prompt, numbered, and the model is asked to answer
from them only and cite them::

    from llmlab.rag import DocumentStore, QuestionAnswerer
    qa = QuestionAnswerer(DocumentStore("makerspace"))
    answer = qa.ask("How much is a day pass?")
    answer.text        # '... 12 euros per day [1].'
    answer.sources     # the Hits numbered [1], [2] ... in the prompt
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmlab.backends.base import Backend, Chunk, Message, Result, collect
from llmlab.rag.store import DocumentStore, Hit

DEFAULT_TOP_K = 3
# With all-MiniLM-L6-v2 on the sample corpus, the best chunk for an answerable question
# scores 0.27-0.75 and for an unrelated one at most 0.21 (notebook 05 plots both).
DEFAULT_THRESHOLD = 0.25
NOT_FOUND = "The documents do not contain the answer to this question."

SYSTEM_PROMPT = "Answer the question using only the numbered sources. Cite sources like [1]."

_CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class Answer:
    """An answer and the sources it was generated from (``sources[0]`` is [1])."""

    question: str
    text: str
    sources: list[Hit] = field(default_factory=list)
    found: bool = True
    cited: list[int] = field(default_factory=list)
    best_score: float | None = None
    result: Result | None = None

    def to_dict(self) -> dict[str, Any]:
        """The CLI's JSON: ``{"answer": ..., "sources": [{"source", "location", "score", "text"}]}``."""
        return {"answer": self.text, "sources": [hit.to_dict() for hit in self.sources]}


def format_sources(hits: list[Hit]) -> str:
    """The numbered context block the model reads: ``[1] text``.

    File names stay out of the prompt: a small model tends to copy them into its answer.
    """
    return "\n\n".join(f"[{n}] {hit.text.strip()}" for n, hit in enumerate(hits, start=1))


def build_messages(question: str, hits: list[Hit]) -> list[Message]:
    """A short system prompt, then the numbered sources and the question in one user turn."""
    user = (
        f"Sources:\n{format_sources(hits)}\n\n"
        f"Question: {question}\n"
        "Answer in one sentence with a citation like [1]."
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def tidy_citations(text: str, n_sources: int) -> tuple[str, list[int], str]:
    """Drop citation numbers that point at no source.

    Returns the cleaned text, the source numbers cited, and a suffix to add. A small
    model often forgets to cite; then the suffix lists the sources it was given, so every
    answer says where it came from.
    """
    text = _CITATION.sub(
        lambda m: m.group(0) if 1 <= int(m.group(1)) <= n_sources else "", text
    ).strip()
    cited = sorted({int(n) for n in _CITATION.findall(text)})
    if cited or not n_sources:
        return text, cited, ""
    cited = list(range(1, n_sources + 1))
    return text, cited, f"\n(Sources: {', '.join(f'[{n}]' for n in cited)})"


class QuestionAnswerer:
    """Retrieval plus generation over one :class:`DocumentStore`.

    Args:
        store: the collection to search.
        model: a loaded :class:`Backend`, or a catalog name to load on first need
            (default: the lab's default chat model).
        top_k: chunks retrieved per question.
        threshold: minimum similarity for a chunk to count as relevant.
        max_tokens: longest answer, in tokens.
    """

    def __init__(
        self,
        store: DocumentStore,
        model: Backend | str | None = None,
        top_k: int = DEFAULT_TOP_K,
        threshold: float = DEFAULT_THRESHOLD,
        max_tokens: int = 120,
    ):
        self.store = store
        self.top_k = top_k
        self.threshold = threshold
        self.max_tokens = max_tokens
        self._model = model if isinstance(model, Backend) else None
        self._model_name = None if isinstance(model, Backend) else model

    @property
    def model(self) -> Backend:
        """The chat model, loaded the first time an answer needs it."""
        if self._model is None:
            from llmlab import backends

            self._model = backends.load(self._model_name)
        return self._model

    def retrieve(self, question: str) -> list[Hit]:
        """The relevant chunks: the top ``top_k`` with a score of at least ``threshold``."""
        return [
            hit for hit in self.store.search(question, self.top_k) if hit.score >= self.threshold
        ]

    def ask(self, question: str, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer ``question`` from the documents; ``on_text`` receives the answer as it streams.

        Raises:
            EmptyCollectionError: the collection has no chunks.
            backends.BackendError: the model could not be loaded or run.
        """
        candidates = self.store.search(question, self.top_k)
        best = max((hit.score for hit in candidates), default=None)
        hits = [hit for hit in candidates if hit.score >= self.threshold]
        if not hits:
            if on_text:
                on_text(NOT_FOUND)
            return Answer(question, NOT_FOUND, [], found=False, best_score=best)
        hits = self._fit(question, hits)
        messages = build_messages(question, hits)
        params = {"max_tokens": self.max_tokens, "temperature": 0.0, "repeat_penalty": 1.1}
        if on_text is None:
            result = self.model.chat(messages, **params)
        else:
            result = collect(_tee(self.model.stream_chat(messages, **params), on_text))
        text, cited, suffix = tidy_citations(result.text, len(hits))
        if on_text and suffix:
            on_text(suffix)
        return Answer(question, text + suffix, hits, True, cited, best, result)

    def _fit(self, question: str, hits: list[Hit]) -> list[Hit]:
        """Drop the weakest chunks until the prompt and the answer fit in the context window."""
        budget = self.model.context_length - self.max_tokens
        while len(hits) > 1:
            prompt = "\n".join(m["content"] for m in build_messages(question, hits))
            # 64 tokens of headroom for the chat template's own markers.
            if self.model.count_tokens(prompt) + 64 <= budget:
                break
            hits = hits[:-1]
        return hits

    def close(self) -> None:
        """Free the chat model's memory."""
        if self._model is not None:
            self._model.close()


def _tee(chunks: Iterator[Chunk], on_text: Callable[[str], None]) -> Iterator[Chunk]:
    for chunk in chunks:
        if chunk.text:
            on_text(chunk.text)
        yield chunk
