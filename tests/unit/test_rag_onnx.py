"""The ONNX runtime of the embedder: the same vectors as sentence-transformers, its graph
cached with a checksum (a damaged one is exported again), and a one-line note and
sentence-transformers when it cannot be had."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from llmlab import registry
from llmlab.rag import onnx_encoder
from llmlab.rag.embeddings import Embedder
from llmlab.rag.evaluate import load_questions
from llmlab.rag.onnx_encoder import OnnxUnavailable

pytestmark = pytest.mark.slow  # loads the embedding model with both runtimes

LONG = "The makerspace opened its doors in a former bakery. " * 40  # > 256 tokens: truncated


@pytest.fixture(scope="module")
def spec():
    return registry.resolve("all-minilm-l6-v2")


def test_onnx_vectors_match_sentence_transformers_on_the_question_set(spec):
    texts = [q.question for q in load_questions()] + [LONG, "short"]
    onnx = Embedder(spec, runtime="onnx")
    torch_side = Embedder(spec, runtime="sentence-transformers")
    a = np.array(onnx.embed_documents(texts))
    b = np.array(torch_side.embed_documents(texts))
    assert onnx.runtime == "onnx" and torch_side.runtime == "sentence-transformers"
    assert a.shape == b.shape == (len(texts), 384)
    assert (a * b).sum(axis=1).min() >= 0.999
    assert onnx.count_tokens(texts) == torch_side.count_tokens(texts)
    assert onnx.dimensions == 384


def test_a_damaged_cached_graph_is_exported_again(spec, tmp_path, monkeypatch):
    graph = onnx_encoder.cached_graph(spec)  # the suite's shared cache: exported once
    shutil.copytree(graph.parent, tmp_path / spec.name / spec.tag / "onnx")
    monkeypatch.setenv("LLMLAB_HF_CACHE_DIR", str(tmp_path))
    copy = tmp_path / spec.name / spec.tag / "onnx" / onnx_encoder.GRAPH
    assert onnx_encoder.cached_graph(spec) == copy  # intact: used as it is
    exports = []
    monkeypatch.setattr(
        onnx_encoder,
        "export_graph",
        lambda folder, target: exports.append(target) or shutil.copyfile(graph, target),
    )
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    copy.write_bytes(bytes(data))
    assert onnx_encoder.cached_graph(spec) == copy
    assert len(exports) == 1 and copy.read_bytes() == graph.read_bytes()


def test_without_onnx_the_embedder_says_so_in_one_line_and_uses_sentence_transformers(
    spec, monkeypatch, caplog
):
    def unavailable(spec, threads):
        raise OnnxUnavailable(
            "onnxruntime and tokenizers are needed (No module named 'onnxruntime')"
        )

    monkeypatch.setattr("llmlab.rag.embeddings.load_encoder", unavailable)
    embedder = Embedder(spec)
    with caplog.at_level(logging.WARNING):
        vector = embedder.embed_query("a cat")
    assert len(vector) == 384 and embedder.runtime == "sentence-transformers"
    notes = [r.getMessage() for r in caplog.records]
    assert notes == [
        "Embedding with sentence-transformers (slower to start): onnxruntime and tokenizers "
        "are needed (No module named 'onnxruntime')"
    ]
    with pytest.raises(OnnxUnavailable):
        Embedder(spec, runtime="onnx").embed_query("a cat")


def test_an_unknown_runtime_is_refused(spec):
    with pytest.raises(ValueError, match="Unknown embedding runtime 'tf'. Use auto, onnx"):
        Embedder(spec, runtime="tf")


def test_start_loading_loads_on_a_thread_and_the_first_embed_waits_for_it(spec, monkeypatch):
    import threading

    loaded_on = []
    real = onnx_encoder.load_encoder

    def recording(spec, threads):
        loaded_on.append(threading.current_thread().name)
        return real(spec, threads)

    monkeypatch.setattr("llmlab.rag.embeddings.load_encoder", recording)
    early = Embedder(spec, runtime="onnx")
    early.start_loading()
    vector = early.embed_query("a cat")
    assert loaded_on == ["embedder-load"]  # loaded once, by the thread
    assert vector == Embedder(spec, runtime="onnx").embed_query("a cat")
    early.start_loading()  # already loaded: nothing more
    assert loaded_on == ["embedder-load", "MainThread"]  # only the second embedder's load


def test_a_failed_background_load_is_reported_by_the_first_embed(spec, monkeypatch, caplog):
    def unavailable(spec, threads):
        raise OnnxUnavailable("the ONNX export failed (test)")

    monkeypatch.setattr("llmlab.rag.embeddings.load_encoder", unavailable)
    embedder = Embedder(spec)
    embedder.start_loading()
    with caplog.at_level(logging.WARNING):
        assert len(embedder.embed_query("a cat")) == 384
    assert embedder.runtime == "sentence-transformers"
    assert [r.getMessage() for r in caplog.records] == [
        "Embedding with sentence-transformers (slower to start): the ONNX export failed (test)"
    ]
