"""The engine's persistent ggml thread pool: its workers live as long as the engine (not one
start and join per decode), they go when it closes, and greedy text is the same without it
(the fallback for a build that does not export the thread pool API)."""

from __future__ import annotations

import os

import pytest

from llmlab.engine import Engine, threadpool

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc"),
]

PROMPT = [{"role": "user", "content": "Name three colours."}]


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_workers_live_between_decodes_and_go_when_the_engine_closes():
    before = native_threads()
    with Engine(parallel=1, n_ctx=256, threads=2) as engine:
        assert engine.chat(PROMPT, max_tokens=8, temperature=0).text
        # The engine's decode thread plus one ggml worker (2 threads: the caller computes too),
        # still there while the engine waits for work.
        assert native_threads() == before + 2
    assert native_threads() == before


def test_greedy_text_is_the_same_with_ggml_starting_threads_per_call(monkeypatch):
    with Engine(parallel=1, n_ctx=256, threads=2) as engine:
        pooled = engine.chat(PROMPT, max_tokens=16, temperature=0).text
    monkeypatch.setattr(threadpool, "_functions", lambda: None)
    before = native_threads()
    with Engine(parallel=1, n_ctx=256, threads=2) as engine:
        per_call = engine.chat(PROMPT, max_tokens=16, temperature=0).text
        assert native_threads() == before + 1  # only the decode thread: no worker kept
    assert per_call == pooled
