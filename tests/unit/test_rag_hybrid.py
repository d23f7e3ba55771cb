"""Hybrid retrieval: reciprocal rank fusion and BM25 by hand, then the three retrieval modes
on the sample corpus, measured on the questions held out from tuning."""

from __future__ import annotations

import pytest

from llmlab.rag import DocumentStore
from llmlab.rag.evaluate import (
    HELDOUT2_QUESTIONS,
    HELDOUT3_QUESTIONS,
    HELDOUT_QUESTIONS,
    SAMPLE_DOCS,
    SAMPLE_QUESTIONS,
    load_questions,
    mean_reciprocal_rank,
    recall_at_k,
)
from llmlab.rag.hybrid import BM25Index, reciprocal_rank_fusion


def test_rrf_adds_one_over_k_plus_rank_and_ranks_agreement_first():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["b", "c", "d"]], k=60)
    assert [doc for doc, _ in fused] == ["b", "c", "a", "d"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)
    assert fused[2][1] == pytest.approx(1 / 61)
    assert reciprocal_rank_fusion([["x", "y"], []]) == reciprocal_rank_fusion([["x", "y"]])


def test_bm25_finds_the_rare_word_and_leaves_out_chunks_sharing_none():
    index = BM25Index(
        ["c1", "c2", "c3"],
        ["the laser cutter bed", "the wood lathe", "MAX_BOOKING_HOURS = 3 for the laser"],
    )
    assert [i for i, _ in index.search("max_booking_hours", 3)] == ["c3"]
    assert [i for i, _ in index.search("laser bed", 3)][0] == "c1"
    assert index.search("zebra", 3) == [] and index.search("the", 3) == []  # "the": stop word
    assert BM25Index([], []).search("laser", 3) == []


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = DocumentStore("sample", db_dir=tmp_path_factory.mktemp("db"), create=True)
    store.ingest([SAMPLE_DOCS])
    return store


@pytest.mark.slow  # embeds the sample corpus
def test_every_mode_scores_hits_by_cosine_and_bm25_mode_ranks_by_keywords(store):
    query = "How big is the bed of the laser cutter?"
    dense = store.search(query, 3, mode="dense")
    bm25 = store.search(query, 3, mode="bm25")
    hybrid = store.search(query, 3, mode="hybrid")
    assert bm25[0].source.endswith("equipment.html") and "900 x 600" in bm25[0].text
    by_id = {h.chunk_id: h.score for h in store.search(query, store.count(), mode="dense")}
    for hit in dense + bm25 + hybrid:
        assert hit.score == pytest.approx(by_id[hit.chunk_id], abs=1e-5)
    with pytest.raises(
        ValueError, match="Unknown retrieval mode 'sparse'. Use dense, bm25, hybrid"
    ):
        store.search(query, mode="sparse")


@pytest.mark.slow
def test_hybrid_recall_on_the_held_out_questions_is_at_least_dense_and_higher_at_3(store):
    held_out = load_questions(HELDOUT_QUESTIONS)
    dense = recall_at_k(store, held_out, [1, 3], mode="dense")
    hybrid = recall_at_k(store, held_out, [1, 3], mode="hybrid")
    assert hybrid[1] >= dense[1]
    assert hybrid[3] > dense[3]  # measured: 23/23 against 22/23
    everything = load_questions(SAMPLE_QUESTIONS) + held_out
    assert (
        recall_at_k(store, everything, [1], "hybrid")[1]
        >= recall_at_k(store, everything, [1], "dense")[1]
    )
    assert mean_reciprocal_rank(store, held_out, mode="hybrid") > mean_reciprocal_rank(
        store, held_out, mode="dense"
    )


# Both written from the documents alone and committed before any retrieval ran on them.
# Measured, recall@1 (dense, bm25, hybrid): second set 28, 20, 30 of 33 (MRR 0.912 ->
# 0.943); third set, by another author, 25, 23, 27 of 30 (MRR 0.911 -> 0.940). On each
# hybrid wins 4 questions at rank 1 (copied exact terms) and loses 2 (mostly paraphrases
# BM25 finds nothing for), so the margin is two questions; at recall@3 there is none.
@pytest.mark.slow
@pytest.mark.parametrize("path", [HELDOUT2_QUESTIONS, HELDOUT3_QUESTIONS], ids=["second", "third"])
def test_hybrid_beats_dense_at_recall_1_on_the_later_held_out_sets(store, path):
    questions = load_questions(path)
    answerable = sum(q.answerable for q in questions)
    dense = recall_at_k(store, questions, [1, 3], mode="dense")
    hybrid = recall_at_k(store, questions, [1, 3], mode="hybrid")
    assert hybrid[1] >= dense[1] + 2 / answerable - 1e-9
    assert hybrid[1] > recall_at_k(store, questions, [1], mode="bm25")[1]
    assert hybrid[3] >= dense[3] - 1 / answerable - 1e-9
    assert mean_reciprocal_rank(store, questions, mode="hybrid") > mean_reciprocal_rank(
        store, questions, mode="dense"
    )
