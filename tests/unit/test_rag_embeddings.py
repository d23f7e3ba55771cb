"""The embedder shared between threads (a server's uploads and /v1/embeddings use one): the
same vectors and token counts as one thread gets, no "Already borrowed", and its Hugging
Face tokenizer never used by two threads at once."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from llmlab.rag.embeddings import get_embedder

pytestmark = pytest.mark.slow  # loads the embedding model (a few seconds, once per session)

LONG = "The makerspace opened its doors in a former bakery. " * 40  # > 256 tokens: truncated
TEXTS = [
    ["a cat", "a kitten sleeps on the mat"],
    [LONG, "short"],
    ["Who founded the club?", LONG + " And then some more words."],
    ["one", "two", "three", "four"],
]
WORKERS = len(TEXTS)


def watch_the_tokenizer(monkeypatch, embedder) -> list[int]:
    """Record the most threads inside the tokenizer at once. Each call waits (a few seconds
    at most, once) for a second thread to come in, so an overlap cannot slip by unseen."""
    tokenizer_type = type(embedder.model.tokenizer)
    real_call = tokenizer_type.__call__
    meet = threading.Barrier(2, timeout=3)
    guard = threading.Lock()
    inside, most = [0], [0]

    def call(tokenizer, *args, **kwargs):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            # No second thread came (or the watch is over): go on alone.
            with contextlib.suppress(threading.BrokenBarrierError):
                meet.wait()
            return real_call(tokenizer, *args, **kwargs)
        finally:
            with guard:
                inside[0] -= 1

    monkeypatch.setattr(tokenizer_type, "__call__", call)
    return most


def run_together(work, jobs):
    start = threading.Barrier(len(jobs))

    def one(job):
        start.wait()
        return work(job)

    with ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(one, jobs))


def test_embeds_from_several_threads_at_once_match_one_thread_and_never_share_the_tokenizer(
    monkeypatch,
):
    embedder = get_embedder()
    alone = [embedder.embed_documents(texts) for texts in TEXTS]
    most = watch_the_tokenizer(monkeypatch, embedder)
    together = run_together(embedder.embed_documents, TEXTS * 2)
    assert most[0] == 1  # one thread at a time in the tokenizer
    for got, want in zip(together, alone * 2, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_counting_tokens_beside_embedding_leaks_no_truncation_setting(monkeypatch):
    embedder = get_embedder()
    vectors = [embedder.embed_documents(texts) for texts in TEXTS]
    tokens = [embedder.count_tokens(texts) for texts in TEXTS]
    assert tokens[1] > 256 + 1  # counted whole, not cut to the model's 256-token window
    most = watch_the_tokenizer(monkeypatch, embedder)
    # Half the threads embed (truncation on), half count (truncation off), at the same time.
    jobs = [("embed", t) for t in TEXTS] + [("count", t) for t in TEXTS]
    results = run_together(
        lambda job: (
            embedder.embed_documents(job[1]) if job[0] == "embed" else embedder.count_tokens(job[1])
        ),
        jobs,
    )
    assert most[0] == 1
    for got, want in zip(results[:WORKERS], vectors, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert results[WORKERS:] == tokens
