"""The frameworks bench suite (``make bench``) measures what notebook 09 plots, with ratios."""

from __future__ import annotations

import pytest

from llmlab.benchmarks import frameworks

pytestmark = pytest.mark.slow


def test_engine_figures_and_thread_scaling_rows():
    rows = frameworks.measure(
        engines=["llama.cpp"],
        prompts=["Say hi."],
        max_tokens=4,
        threads=[1, 2],
        scaling=("llama.cpp",),
    )
    by_key = {(r.case, r.metric): r for r in rows}
    assert {m for c, m in by_key if c == "llama.cpp"} == {"load", "ttft", "decode", "memory"}
    assert by_key[("llama.cpp", "decode")].unit == "tok/s"
    assert by_key[("llama.cpp", "memory")].unit == "MiB"
    assert all(r.suite == "frameworks" and r.value >= 0 for r in rows)
    one, two = by_key[("llama.cpp 1 thread", "decode")], by_key[("llama.cpp 2 threads", "decode")]
    assert one.baseline is None
    assert two.baseline == "llama.cpp 1 thread"
    assert two.ratio == pytest.approx(two.value / one.value)


def test_unknown_engines_are_rejected_before_anything_loads():
    with pytest.raises(ValueError, match="Unknown engine tensorflow. Use: llama.cpp"):
        frameworks.measure(engines=["tensorflow"], threads=[1], scaling=())
