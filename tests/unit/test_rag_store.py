"""The vector store and the answerer with the real MiniLM embeddings: incremental ingestion,
scores, the relevance threshold, citations, and the LangChain views of the same collection."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from llmlab.backends.base import Backend, Chunk, Result, Timings, Usage
from llmlab.rag import (
    NOT_FOUND,
    DocumentStore,
    EmptyCollectionError,
    QuestionAnswerer,
    UnknownCollectionError,
    list_collections,
    remove_collection,
)
from llmlab.rag.answer import tidy_citations
from llmlab.rag.evaluate import SAMPLE_DOCS, load_questions, recall_at_k

pytestmark = pytest.mark.slow  # loads the embedding model (a few seconds, once per session)


@pytest.fixture
def docs(tmp_path):
    """A private copy of the sample corpus that tests may edit."""
    return shutil.copytree(SAMPLE_DOCS, tmp_path / "docs")


@pytest.fixture
def store(docs):
    store = DocumentStore("sample", create=True)
    store.ingest([docs])
    return store


class ScriptedModel(Backend):
    """A stand-in chat model that replies with fixed text and records the prompts it got."""

    name = "scripted"

    def __init__(self, reply: str):
        self.reply = reply
        self.prompts: list[list[dict[str, str]]] = []

    def chat(self, messages, **params: Any) -> Result:
        self.prompts.append(messages)
        return Result(self.reply, "stop", Usage(10, 5), Timings())

    def stream_chat(self, messages, **params: Any) -> Iterator[Chunk]:
        self.prompts.append(messages)
        for word in self.reply.split(" "):
            yield Chunk(word + " ")
        yield Chunk("", "stop", Usage(10, 5), Timings())

    def complete(self, prompt: str, **params: Any) -> Result:
        raise AssertionError("document QA uses chat, not complete")

    def count_tokens(self, text: str) -> int:
        return len(text) // 4

    def info(self) -> dict[str, Any]:
        return {"backend": self.name}

    def close(self) -> None:
        pass

    @property
    def context_length(self) -> int:
        return 2048


def test_ingest_then_reingest_adds_nothing(store, docs):
    assert store.count() > 20
    again = store.ingest([docs])
    assert again.chunks_added == 0 and again.chunks_removed == 0
    assert again.chunks_skipped == store.count()
    assert again.count("unchanged") == 8


def test_changed_file_replaces_its_chunks_only(store, docs):
    before = store.sources()
    faq = docs / "faq.md"
    faq.write_text(faq.read_text().replace("tidewater-members", "harbor-hackers"))
    report = store.ingest([docs])
    assert [f.path.name for f in report.files if f.status == "updated"] == ["faq.md"]
    after = store.sources()
    assert after[str(faq)]["ids"] != before[str(faq)]["ids"]
    assert report.chunks_removed == len(before[str(faq)]["ids"])
    assert store.count() == sum(len(e["ids"]) for e in after.values())
    assert store.search("What is the wifi network called?", 1)[0].text.count("harbor-hackers") == 1


def test_new_chunking_reembeds_and_prune_removes_deleted_files(store, docs):
    report = store.ingest([docs], chunk_size=300, chunk_overlap=30)
    assert report.count("updated") == 8
    (docs / "history.txt").unlink()
    without_prune = store.ingest([docs], chunk_size=300, chunk_overlap=30)
    assert without_prune.chunks_removed == 0
    assert str(docs / "history.txt") in store.sources()
    pruned = store.ingest([docs], chunk_size=300, chunk_overlap=30, prune=True)
    assert [f.path.name for f in pruned.files if f.status == "removed"] == ["history.txt"]
    assert str(docs / "history.txt") not in store.sources()


def test_unreadable_file_is_reported_and_keeps_its_old_chunks(store, docs):
    report_pdf = docs / "annual_report_2024.pdf"
    old_ids = store.sources()[str(report_pdf)]["ids"]
    report_pdf.write_bytes(b"%PDF-1.4 truncated")
    (docs / "notes.md").write_text("# Notes\n\nThe spare key is in the red tin.")
    report = store.ingest([docs])
    assert [f.path.name for f in report.failed] == ["annual_report_2024.pdf"]
    assert [f.path.name for f in report.files if f.status == "added"] == ["notes.md"]
    assert store.sources()[str(report_pdf)]["ids"] == old_ids


def test_search_scores_are_cosine_similarities_best_first(store):
    hits = store.search("Who was the volunteer of the year?", 5)
    assert hits[0].metadata["file_name"] == "annual_report_2024.pdf"
    assert hits[0].location in ("page 1", "page 2")
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0 <= s <= 1.0 for s in scores)
    vector = store.embedder.embed_query("Who was the volunteer of the year?")
    top = store.embedder.embed_documents([hits[0].text])[0]
    assert hits[0].score == pytest.approx(
        sum(a * b for a, b in zip(vector, top, strict=True)), abs=1e-4
    )


def test_recall_on_the_sample_questions(store):
    recall = recall_at_k(store, load_questions(), [1, 3])
    assert recall[3] >= 0.9
    assert recall[1] <= recall[3]


def test_unanswerable_question_needs_no_model(store):
    qa = QuestionAnswerer(store, model="model-that-does-not-exist")
    answer = qa.ask("What is the capital of Mongolia?")
    assert answer.text == NOT_FOUND and not answer.found
    assert answer.sources == [] and answer.best_score < qa.threshold
    assert answer.to_dict() == {"answer": NOT_FOUND, "sources": []}


def test_answer_prompt_numbers_sources_and_keeps_model_citations(store):
    model = ScriptedModel("A Full membership costs 60 euros per month [1]. See also [9].")
    answer = QuestionAnswerer(store, model).ask("How much does a Full membership cost per month?")
    prompt = model.prompts[0][-1]["content"]
    assert "[1] " in prompt and "60 euros per month" in prompt
    assert answer.text == "A Full membership costs 60 euros per month [1]. See also ."
    assert answer.cited == [1]
    assert answer.sources[0].metadata["file_name"] == "membership.md"
    assert answer.to_dict()["sources"][0]["source"].endswith("membership.md")


def test_uncited_answer_gets_its_sources_listed_and_streams(store):
    model = ScriptedModel("Sixty euros.")
    pieces: list[str] = []
    answer = QuestionAnswerer(store, model, top_k=2).ask(
        "How much is a Full membership?", on_text=pieces.append
    )
    assert answer.text == "Sixty euros.\n(Sources: [1], [2])"
    assert "".join(pieces).replace(" \n", "\n").strip() == answer.text


def test_tidy_citations_drops_numbers_without_a_source():
    assert tidy_citations("Yes [2] and [5].", 3) == ("Yes [2] and .", [2], "")


def test_missing_and_empty_collections(tmp_path):
    with pytest.raises(UnknownCollectionError, match="ingest PATH --collection nope"):
        DocumentStore("nope")
    empty = DocumentStore("empty", create=True)
    with pytest.raises(EmptyCollectionError, match="is empty"):
        empty.search("anything")
    assert [c.name for c in list_collections()] == ["empty"]
    assert remove_collection("empty") == 0
    assert list_collections() == []


def test_langchain_retriever_and_vectorstore_read_the_same_collection(store):
    from llmlab.rag.langchain_adapters import LabRetriever, as_langchain_vectorstore

    question = "Where is the first aid kit?"
    docs = LabRetriever(store=store, k=2).invoke(question)
    assert len(docs) == 2 and "above the sink" in docs[0].page_content
    assert docs[0].metadata["score"] == pytest.approx(store.search(question, 1)[0].score)
    vectorstore = as_langchain_vectorstore(store)
    found = vectorstore.similarity_search(question, k=1)
    assert found[0].page_content == docs[0].page_content
    assert found[0].metadata["file_name"] == "safety_rules.txt"


def test_chromadb_is_imported_with_overrides_marking_only_and_the_checks_come_back():
    import overrides

    from llmlab.rag.store import _unchecked_overrides

    class Base:
        def f(self, a): ...

    original = overrides.override
    with _unchecked_overrides():

        class Marked(Base):
            @overrides.override
            def f(self): ...  # a signature the real check refuses

    assert Marked.f.__override__ is True and overrides.override is original
    with pytest.raises(TypeError):

        class Checked(Base):
            @overrides.override
            def f(self): ...
