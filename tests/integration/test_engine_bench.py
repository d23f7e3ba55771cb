"""Smoke test of the batch bench suite: its rows, names and ratios (never the timings)."""

from __future__ import annotations

import pytest

from llmlab.benchmarks import batch as batch_bench


@pytest.mark.slow
def test_quick_batch_suite_reports_the_loop_and_the_engine_side_by_side():
    rows = batch_bench.run(quick=True)  # LLMLAB_EXACT_MODEL=1: batch_process runs the Q4_1
    assert [r.case for r in rows] == [
        "llama-cpp-python loop",
        "engine parallel=1",
        "engine parallel=4",
        "llama-cpp-python loop, flash_attn",
        "engine parallel=4, same kernel as the loop",
        "plain loop script, shipped Q4_1",
        "batch_process.py --parallel 4 (Q4_1)",
        "decode steps alone, Q4_1, 1 sequence",
        "decode steps alone, Q4_1, 4 sequences",
    ]
    assert {r.suite for r in rows} == {"batch"} and {r.unit for r in rows} == {"tok/s"}
    assert all(r.value > 0 for r in rows)
    assert rows[0].baseline is None and rows[3].baseline is None
    for row in rows[1:3]:
        assert row.baseline == "llama-cpp-python loop"
        assert row.ratio == pytest.approx(row.value / rows[0].value)
    assert rows[4].baseline == "llama-cpp-python loop, flash_attn"
    assert rows[4].ratio == pytest.approx(rows[4].value / rows[3].value)
    assert rows[4].value == rows[2].value  # one engine measurement, two baselines
    assert "4 prompts x 16 new tokens" in rows[0].note
    whole_loop, whole_batch = rows[5:7]
    assert whole_batch.baseline == whole_loop.case and "whole process" in whole_batch.note
    assert whole_batch.ratio == pytest.approx(whole_batch.value / whole_loop.value)
    alone, together = rows[7:]  # what the kernels allow, against one sequence of the file
    assert together.baseline == alone.case and "llama_decode alone" in together.note
    assert together.ratio == pytest.approx(together.value / alone.value)


def test_prompts_are_distinct_chats():
    chats = batch_bench.prompts(32)
    assert len({c[0]["content"] for c in chats}) == 32
    assert all(c[0]["role"] == "user" for c in chats)
