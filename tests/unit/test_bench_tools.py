"""The measuring tools behind ``make bench``."""

from __future__ import annotations

import os

from llmlab.bench import isolated


def test_isolated_runs_a_function_in_a_fresh_process_and_returns_its_result():
    assert isolated(os.getpid) != os.getpid()
    assert isolated(divmod, 17, 5) == (3, 2)
