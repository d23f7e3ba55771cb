"""The saved chunk table: a new process searches without chromadb, the same hits as Chroma's
own ranking, and any write to the store (from this object, another one, or Chroma directly)
makes the saved table stale, so a search never reads old chunks."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys

import pytest

from llmlab.rag import DocumentStore, remove_collection, snapshot
from llmlab.rag.evaluate import SAMPLE_DOCS, load_questions

pytestmark = pytest.mark.slow  # loads the embedding model (a few seconds, once per session)

SEARCH_IN_A_NEW_PROCESS = """
import json, sys
from llmlab.rag import DocumentStore
store = DocumentStore("sample", retrieval="hybrid")
hits = store.search(sys.argv[1], 3)
print(json.dumps({"chromadb": "chromadb" in sys.modules,
                  "hits": [[h.chunk_id, round(h.score, 5)] for h in hits]}))
"""


@pytest.fixture
def docs(tmp_path):
    return shutil.copytree(SAMPLE_DOCS, tmp_path / "docs")


@pytest.fixture
def store(docs):
    store = DocumentStore("sample", create=True, retrieval="hybrid")
    store.ingest([docs])
    return store


def _search_elsewhere(query: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", SEARCH_IN_A_NEW_PROCESS, query],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(done.stdout)


def test_a_new_process_searches_the_saved_table_without_chromadb(store):
    query = "How much does a day pass cost?"
    expected = [[h.chunk_id, round(h.score, 5)] for h in store.search(query, 3)]
    assert snapshot.snapshot_path(store.db_dir, "sample").is_file()
    found = _search_elsewhere(query)
    assert found == {"chromadb": False, "hits": expected}


def test_dense_ranking_equals_chromas_own_query(store):
    for item in load_questions():
        question = item.question
        ours = store.search(question, 5, mode="dense")
        theirs = store.collection.query(
            query_embeddings=[store.embedder.embed_query(question)],
            n_results=5,
            include=["distances"],
        )
        assert [h.chunk_id for h in ours] == theirs["ids"][0], question
        for hit, distance in zip(ours, theirs["distances"][0], strict=True):
            assert hit.score == pytest.approx(1.0 - distance, abs=1e-5)


def test_every_kind_of_write_changes_the_store_version(store, docs):
    versions = [snapshot.store_version(store.db_dir, "sample")]
    chunk_id = store.chunk_table().ids[0]
    writes = [
        lambda c: c.update(ids=[chunk_id], documents=["changed"], embeddings=[[0.1] * 384]),
        lambda c: c.upsert(
            ids=["new"], embeddings=[[0.0] * 384], documents=["x"], metadatas=[{"source": "s"}]
        ),
        lambda c: c.delete(ids=["new"]),
    ]
    for write in writes:
        write(store.collection)
        versions.append(snapshot.store_version(store.db_dir, "sample"))
    assert None not in versions and len(set(versions)) == len(versions)


def test_a_write_from_elsewhere_is_seen_by_the_next_search(store, docs):
    reader = DocumentStore("sample", retrieval="dense")
    assert reader._client is None  # opened from the saved table
    question = "Who was the volunteer of the year?"
    assert reader.search(question, 1)[0].metadata["file_name"] == "annual_report_2024.pdf"
    report = store.sources()[str(docs / "annual_report_2024.pdf")]
    store.collection.delete(ids=report["ids"])  # as part5's document routes do
    files = {h.metadata["file_name"] for h in reader.search(question, 10)}
    assert "annual_report_2024.pdf" not in files
    assert reader.count() == store.count()
    assert _search_elsewhere(question)["hits"][0][0] not in report["ids"]


def test_a_damaged_saved_table_is_rebuilt(store):
    path = snapshot.snapshot_path(store.db_dir, "sample")
    path.write_bytes(b"PK\x03\x04 not a zip")
    expected = [h.chunk_id for h in store.search("Where is the first aid kit?", 3)]
    again = DocumentStore("sample", retrieval="hybrid")
    assert [h.chunk_id for h in again.search("Where is the first aid kit?", 3)] == expected
    version = snapshot.store_version(store.db_dir, "sample")
    assert snapshot.load(store.db_dir, "sample", version) is not None


def test_a_removed_and_rebuilt_collection_is_not_read_from_the_old_table(store, tmp_path):
    old_version = snapshot.store_version(store.db_dir, "sample")
    assert remove_collection("sample") > 0
    assert not snapshot.snapshot_path(store.db_dir, "sample").exists()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "keys.md").write_text("# Keys\n\nThe spare key is in the red tin by the door.")
    rebuilt = DocumentStore("sample", create=True)
    rebuilt.ingest([notes])
    assert snapshot.store_version(store.db_dir, "sample") != old_version
    hits = DocumentStore("sample").search("Where is the spare key?", 5)
    assert [h.metadata["file_name"] for h in hits] == ["keys.md"]


def test_an_unknown_store_layout_has_no_version_and_searches_stay_correct(store, monkeypatch):
    other = store.db_dir / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE collections (id TEXT)")
    assert snapshot.store_version(store.db_dir / "missing", "sample") is None
    monkeypatch.setattr(snapshot, "_VERSION_QUERY", "SELECT nothing FROM nowhere WHERE 1 = ?")
    assert snapshot.store_version(store.db_dir, "sample") is None
    table = store.chunk_table()
    assert table.version is None and len(table) == store.collection.count()
    assert store.search("Where is the first aid kit?", 1)[0].metadata["file_name"] == (
        "safety_rules.txt"
    )
