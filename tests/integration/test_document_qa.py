"""part3/document_qa.py through main(): what a learner sees for each command and each mistake."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmlab.rag import NOT_FOUND
from llmlab.rag.evaluate import SAMPLE_DOCS

pytestmark = pytest.mark.slow  # embeds the sample corpus with the real MiniLM model

SCRIPT = Path(__file__).resolve().parents[2] / "part3" / "document_qa.py"
_spec = importlib.util.spec_from_file_location("document_qa", SCRIPT)
document_qa = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(document_qa)
main = document_qa.main


@pytest.fixture
def docs(tmp_path):
    return shutil.copytree(SAMPLE_DOCS, tmp_path / "docs")


@pytest.fixture
def ingested(docs, capsys):
    assert main(["ingest", str(docs)]) == 0
    capsys.readouterr()
    return docs


def test_ingest_prints_each_file_and_a_summary_then_reingest_adds_nothing(docs, capsys):
    assert main(["ingest", str(docs), "--chunk-size", "500", "--chunk-overlap", "50"]) == 0
    out = capsys.readouterr().out
    assert "added     " in out and "annual_report_2024.pdf" in out
    assert "8 files (8 added, 0 updated, 0 unchanged, 0 failed, 0 removed)" in out
    assert main(["ingest", str(docs), "--chunk-size", "500", "--chunk-overlap", "50"]) == 0
    out = capsys.readouterr().out
    assert "8 unchanged" in out and "chunks: 0 added" in out and "0 removed" in out


def test_changed_file_is_replaced_and_deleted_file_pruned(ingested, capsys):
    (ingested / "history.txt").write_text("Tidewater was founded in 1999 by a lighthouse keeper.\n")
    (ingested / "faq.md").unlink()
    assert main(["ingest", str(ingested), "--prune"]) == 0
    out = capsys.readouterr().out
    assert "updated   " in out and "history.txt (1 chunks)" in out
    assert "removed   " in out and "faq.md" in out
    assert "1 updated, 6 unchanged, 0 failed, 1 removed" in out
    assert main(["search", "lighthouse keeper", "--top-k", "1", "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["sources"][0]
    assert top["source"].endswith("history.txt") and "1999" in top["text"]


def test_unreadable_file_is_reported_and_the_rest_ingested(docs, capsys):
    (docs / "scan.pdf").write_bytes(b"%PDF-1.7\n\x00garbage")
    assert main(["ingest", str(docs)]) == 1
    out = capsys.readouterr().out
    assert "skipped (unreadable):" in out and "scan.pdf" in out
    assert "8 added" in out and "1 failed" in out
    assert "the others were ingested" in out


def test_search_json_has_source_objects(ingested, capsys):
    assert main(["search", "Where is the first aid kit?", "--top-k", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["sources"]) == 2
    first = data["sources"][0]
    assert set(first) == {"source", "location", "score", "text"}
    assert first["source"].endswith("safety_rules.txt") and first["location"].startswith("line")
    assert "above the sink" in first["text"] and 0 < first["score"] <= 1


def test_search_text_shows_numbered_passages(ingested, capsys):
    assert main(["search", "volunteer of the year", "--top-k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1] ") and "annual_report_2024.pdf, page 1 (score " in out
    assert "volunteer hours" in out


HEAVY = ("torch", "sentence_transformers", "transformers", "langchain_text_splitters")


def test_search_in_a_new_process_imports_no_torch_nor_sentence_transformers(ingested):
    """A question costs its own embedding, not seconds of importing torch (issue 16)."""
    code = f"""
import runpy, sys
sys.argv = ["document_qa.py", "search", "Where is the first aid kit?", "--top-k", "1", "--json"]
try:
    runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
except SystemExit as stop:
    assert stop.code == 0, stop.code
print(sorted(m for m in {HEAVY!r} if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    found, imported = done.stdout.strip().splitlines()
    assert json.loads(found)["sources"][0]["source"].endswith("safety_rules.txt")
    assert imported == "[]"
    assert done.stderr == ""  # no note: the ONNX path was there


def test_search_without_a_query_reads_one_query_a_line_in_one_process(ingested):
    """Start-up is paid once: piped queries each get a JSON line, an empty line ends it."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "search", "--top-k", "1", "--json"],
        input="Where is the first aid kit?\nlaser cutter safety\n\nnot read\n",
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [r["query"] for r in replies] == ["Where is the first aid kit?", "laser cutter safety"]
    assert all(r["sources"][0]["source"].endswith("safety_rules.txt") for r in replies)


def test_question_not_in_documents_answers_so_without_a_model(ingested, capsys, monkeypatch):
    import llmlab.backends

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded for an unanswerable question")

    monkeypatch.setattr(llmlab.backends, "load", no_model)
    assert main(["ask", "What is the capital of Mongolia?"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(NOT_FOUND)
    assert "below the threshold 0.25" in out
    assert main(["ask", "What is the capital of Mongolia?", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"answer": NOT_FOUND, "sources": []}


def test_interactive_ask_reads_questions_until_an_empty_line(ingested, capsys, monkeypatch):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("Who won the 2010 football world cup?\n\nnever read\n")
    )
    assert main(["ask"]) == 0
    out = capsys.readouterr().out
    assert "Empty line to quit" in out
    assert out.count(NOT_FOUND) == 1


def test_list_and_remove(ingested, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "8 files" in out
    assert main(["remove", "--collection", "default"]) == 0
    assert "Removed collection 'default'" in capsys.readouterr().out
    assert main(["list"]) == 0
    assert "No collections" in capsys.readouterr().out


def test_db_and_collection_options_keep_stores_apart(docs, tmp_path, capsys):
    db = tmp_path / "elsewhere"
    assert main(["ingest", str(docs / "faq.md"), "--db", str(db), "--collection", "faq"]) == 0
    capsys.readouterr()
    assert main(["list", "--db", str(db), "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["name"] == "faq" and info["files"] == 1
    assert main(["list"]) == 0
    assert "No collections" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["ingest", "does/not/exist"], 2, "does not exist"),
        (["ingest", ""], 2, "empty path"),
        (["ingest", "DOCS", "--chunk-size", "100", "--chunk-overlap", "200"], 2, "overlap"),
        (["ask", "Who?", "--collection", "nope"], 2, "There is no collection 'nope'"),
        (["search", "x", "--collection", "nope"], 2, "There is no collection 'nope'"),
        (["remove", "--collection", "nope"], 2, "There is no collection 'nope'"),
        (["ask", "Who?", "--collection", "bad name!"], 2, "not a valid collection name"),
    ],
)
def test_errors_exit_non_zero_and_keep_the_store(ingested, capsys, argv, code, message):
    argv = [str(ingested) if a == "DOCS" else a for a in argv]
    assert main(argv) == code
    assert message in capsys.readouterr().err
    assert main(["list", "--json"]) == 0
    (info,) = json.loads(capsys.readouterr().out)
    assert info["name"] == "default" and info["files"] == 8


def test_question_against_an_empty_collection(docs, capsys):
    from llmlab.rag import DocumentStore

    DocumentStore("empty", create=True)
    assert main(["ask", "Anything?", "--collection", "empty"]) == 1
    assert "Collection 'empty' is empty" in capsys.readouterr().err


def test_ask_answers_with_the_default_model_and_cites(ingested, capsys):
    assert main(["ask", "Where is the first aid kit?", "--json", "--max-tokens", "40"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sources"][0]["source"].endswith("safety_rules.txt")
    assert "kitchen" in data["answer"].lower()
    assert "[1]" in data["answer"]
