"""The document QA bench suite runs in quick mode and reports every figure it promises."""

from __future__ import annotations

import pytest

from llmlab.benchmarks import rag


@pytest.mark.slow  # loads the embedding model and the default chat model
def test_quick_run_reports_ingestion_and_latencies():
    rows = rag.run(quick=True)
    by_case = {row.case.split(" (")[0]: row for row in rows}
    assert (
        by_case["ingest sample corpus"].unit == "chunks/s"
        and by_case["ingest sample corpus"].value > 0
    )
    assert by_case["ingest again, nothing changed"].baseline == "ingest, all files new"
    assert by_case["ingest again, nothing changed"].note.endswith("chunks skipped")
    for case in (
        "embed the question only",
        "answer: not in the documents",
        "answer with citations",
    ):
        assert by_case[case].baseline == "retrieval (top 3)"
        assert by_case[case].ratio is not None and by_case[case].value > 0
    chroma = by_case["document_qa.py search, new process, onnxruntime, store read through chromadb"]
    assert chroma.baseline == "document_qa.py search, new process, sentence-transformers"
    assert chroma.ratio is not None and chroma.value > 0 and "no torch import" in chroma.note
    onnx = by_case["document_qa.py search, new process, onnxruntime"]
    assert onnx.baseline == chroma.case
    assert onnx.ratio is not None and onnx.value > 0 and "no chromadb import" in onnx.note
    further = by_case["document_qa.py search, one process, each further query"]
    assert further.baseline == onnx.case and further.ratio is not None
    assert "after the first" in further.note
    assert all(row.suite == "rag" for row in rows)
