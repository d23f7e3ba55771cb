"""Shared test set-up: every test gets its own empty LLMLAB_HOME (as simonw/llm does with
LLM_USER_PATH), so no test reads or writes the learner's real catalog, stores or transcripts."""

from __future__ import annotations

import os

import pytest

# Tests run offline: no hub look-ups, even where a library would try one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")  # chromadb


@pytest.fixture(scope="session", autouse=True)
def shared_hf_checkpoints(tmp_path_factory):
    """One transformers checkpoint cache for the whole run (notebook kernels inherit it).

    Each test has its own LLMLAB_HOME, so without this every test that loads the
    transformers backend would convert the GGUF file again (~35 s of CPU each time).
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMLAB_HF_CACHE_DIR", str(tmp_path_factory.mktemp("hf-checkpoints")))
        yield


@pytest.fixture(autouse=True)
def lab_home(tmp_path, monkeypatch):
    """A fresh, empty LLMLAB_HOME for each test; returns its path."""
    home = tmp_path / "llmlab-home"
    home.mkdir()
    monkeypatch.setenv("LLMLAB_HOME", str(home))
    for var in ("LLMLAB_DEFAULT_MODEL", "LLMLAB_BACKEND", "LLMLAB_BASE_URL", "LLMLAB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    # batch_process.py and server.py would make and measure a batch-friendly Q8_0 in every
    # fresh home (tens of seconds each): tests run the shipped file, except those of that
    # choice (tests/unit/test_batch_format.py, test_batch_process.py), which unset this.
    monkeypatch.setenv("LLMLAB_EXACT_MODEL", "1")
    return home
