"""Document QA suite for ``make bench``: ingestion speed and query latency on the sample corpus.

Measured in one run, on ``part3/data/docs`` in a throw-away store:

* ingestion of the whole corpus (load, split, embed, store) in chunks per second, and a
  second ingestion of the unchanged corpus (skipped by file hash) against the first;
* query latency: embedding the question alone, retrieval (embed + vector search), a
  "not in the documents" answer (retrieval only, no model) and a full answer with the
  default chat model, each as a median over the question set and compared with retrieval;
* one question from the command line: ``document_qa.py search`` in a new process, start-up
  included, with the embedding model run by onnxruntime against sentence-transformers
  (``LLMLAB_EMBEDDING_RUNTIME``), the median of a few runs each; and each further query of
  one ``document_qa.py search`` process that reads its queries line by line (start-up paid
  once): the time of a process given 1 + N queries, less that of one given 1, over N.

Models are loaded before timing starts, so the in-process figures are per-query costs,
not start-up; the command-line rows are what a learner waits for.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llmlab.bench import Row, timer
from llmlab.rag import DocumentStore, QuestionAnswerer, get_embedder, snapshot
from llmlab.rag.evaluate import SAMPLE_DOCS, load_questions

SUITE = "rag"
SCRIPT = Path(__file__).resolve().parents[2] / "part3" / "document_qa.py"


def _median_ms(fn, items) -> float:
    """Median wall time of ``fn(item)`` over ``items``, in milliseconds."""
    times = []
    for item in items:
        with timer() as t:
            fn(item)
        times.append(t.seconds * 1000)
    return statistics.median(times)


def _cli_search_ms(
    db: Path, question: str, runtime: str, runs: int, saved_table: bool = True
) -> float:
    """Median wall time of ``document_qa.py search`` in a new process, in milliseconds;
    ``saved_table=False`` deletes the saved chunk table first, so the store is read
    through chromadb (as every search was before the table was saved)."""
    env = {**os.environ, "LLMLAB_EMBEDDING_RUNTIME": runtime}
    argv = [sys.executable, str(SCRIPT), "search", question, "--db", str(db), "--collection"]
    times = []
    for _ in range(runs):
        if not saved_table:
            snapshot.discard(db, "bench")
        with timer() as t:
            subprocess.run(
                [*argv, "bench", "--top-k", "3"], env=env, check=True, capture_output=True
            )
        times.append(t.seconds * 1000)
    return statistics.median(times)


def _cli_session_ms(db: Path, questions: list[str]) -> float:
    """Wall time of one ``document_qa.py search --json`` process reading ``questions``."""
    argv = [sys.executable, str(SCRIPT), "search", "--db", str(db), "--collection", "bench"]
    with timer() as t:
        subprocess.run(
            [*argv, "--top-k", "3", "--json"],
            input="\n".join(questions) + "\n",
            text=True,
            check=True,
            capture_output=True,
            env={**os.environ, "LLMLAB_EMBEDDING_RUNTIME": "onnx"},
        )
    return t.seconds * 1000


def session_row(db: Path, questions: list[str], baseline: Row) -> Row:
    """Each further query of one interactive ``search`` process, against a new process each."""
    one = _cli_session_ms(db, questions[:1])
    more = _cli_session_ms(db, questions[:1] + questions)
    return Row.compared(
        SUITE,
        "document_qa.py search, one process, each further query",
        "latency",
        (more - one) / len(questions),
        "ms",
        baseline=baseline,
        note=f"onnxruntime; queries read line by line, {len(questions)} after the first",
    )


def cli_rows(db: Path, question: str, runs: int) -> list[Row]:
    """``document_qa.py search`` start to finish: onnxruntime against sentence-transformers."""
    torch_side = Row(
        SUITE,
        "document_qa.py search, new process, sentence-transformers",
        "latency",
        _cli_search_ms(db, question, "sentence-transformers", runs),
        "ms",
        note=f"median of {runs}",
    )
    through_chroma = Row.compared(
        SUITE,
        "document_qa.py search, new process, onnxruntime, store read through chromadb",
        "latency",
        _cli_search_ms(db, question, "onnx", runs, saved_table=False),
        "ms",
        baseline=torch_side,
        note=f"median of {runs}; no torch import; the saved chunk table deleted first",
    )
    onnx = Row.compared(
        SUITE,
        "document_qa.py search, new process, onnxruntime",
        "latency",
        _cli_search_ms(db, question, "onnx", runs),
        "ms",
        baseline=through_chroma,
        note=f"median of {runs}; no torch, no chromadb import (the saved chunk table)",
    )
    return [torch_side, through_chroma, onnx]


def run(quick: bool = False) -> list[Row]:
    """Ingest the sample corpus and time queries; quick: three files, two questions, 8 tokens."""
    questions = load_questions()
    answerable = [q.question for q in questions if q.answerable]
    unanswerable = [q.question for q in questions if not q.answerable]
    paths = sorted(SAMPLE_DOCS.iterdir())[:3] if quick else [SAMPLE_DOCS]
    if quick:
        answerable, unanswerable = answerable[:2], unanswerable[:2]
    max_tokens = 8 if quick else 48
    db = Path(tempfile.mkdtemp(prefix="llmlab-bench-rag-"))
    try:
        embedder = get_embedder()
        embedder.embed_query("warm-up")  # loads the model before anything is timed
        store = DocumentStore("bench", db_dir=db, embedder=embedder, create=True)
        first = store.ingest(paths)
        again = store.ingest(paths)
        ingest = Row(
            SUITE,
            f"ingest sample corpus ({first.chunks_added} chunks)",
            "speed",
            first.chunks_added / first.seconds,
            "chunks/s",
        )
        full_time = Row(SUITE, "ingest, all files new", "time", first.seconds * 1000, "ms")
        rerun = Row.compared(
            SUITE,
            "ingest again, nothing changed",
            "time",
            again.seconds * 1000,
            "ms",
            baseline=full_time,
            note=f"{again.chunks_skipped} chunks skipped",
        )

        embed = Row(
            SUITE,
            "embed the question only",
            "latency",
            _median_ms(embedder.embed_query, answerable),
            "ms",
        )
        retrieval = Row(
            SUITE,
            "retrieval (top 3)",
            "latency",
            _median_ms(lambda q: store.search(q, 3), answerable),
            "ms",
        )
        qa = QuestionAnswerer(store, max_tokens=max_tokens)
        try:
            qa.ask(answerable[0])  # loads the chat model
            not_found = Row.compared(
                SUITE,
                "answer: not in the documents",
                "latency",
                _median_ms(qa.ask, unanswerable),
                "ms",
                baseline=retrieval,
                note="no model call",
            )
            answered = Row.compared(
                SUITE,
                f"answer with citations ({max_tokens} tokens max)",
                "latency",
                _median_ms(qa.ask, answerable),
                "ms",
                baseline=retrieval,
                note="default chat model, greedy",
            )
        finally:
            qa.close()
        cli = cli_rows(db, answerable[0], runs=1 if quick else 3)
        return [
            ingest,
            full_time,
            rerun,
            Row.compared(
                SUITE, embed.case, embed.metric, embed.value, embed.unit, baseline=retrieval
            ),
            retrieval,
            not_found,
            answered,
            *cli,
            session_row(db, answerable + unanswerable, baseline=cli[-1]),
        ]
    finally:
        shutil.rmtree(db, ignore_errors=True)
