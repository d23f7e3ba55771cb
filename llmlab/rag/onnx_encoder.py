"""A sentence-transformers folder run through onnxruntime and ``tokenizers``: no torch at query time.

Importing torch and sentence-transformers takes seconds, more than embedding a question.
This runs the same weights (an ONNX graph of the folder's transformer) with the same
tokenizer, mean pooling and normalisation, so the vectors match sentence-transformers'
to float rounding (a test checks cosine >= 0.999)::

    from llmlab.rag.onnx_encoder import load_encoder
    encoder = load_encoder(spec, threads=2)      # exports the graph once if the package has none
    vectors = encoder.encode(["a cat"], normalize_embeddings=True)   # numpy, shape (1, 384)

Where the graph comes from: an ``onnx/model.onnx`` (or ``model.onnx``) shipped in the model
folder; otherwise it is exported once with ``torch.onnx`` (needs torch, transformers and
onnx) into ``$LLMLAB_HOME/models/<name>/<tag>/onnx`` (or ``$LLMLAB_HF_CACHE_DIR/...``),
with its sha256, which is checked on every load. :class:`OnnxUnavailable` says why this
path cannot be used; the embedder then falls back to sentence-transformers.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from llmlab import registry
from llmlab.backends import hf_checkpoint
from llmlab.registry.files import matches_sha256
from llmlab.settings import get_settings

log = logging.getLogger(__name__)

GRAPH = "model.onnx"
CHECKSUM = "model.onnx.sha256"
OPSET = 17
# The modules this encoder reproduces; a folder with any other module falls back.
_SUPPORTED_MODULES = {
    "sentence_transformers.models.Transformer",
    "sentence_transformers.models.Pooling",
    "sentence_transformers.models.Normalize",
}


class OnnxUnavailable(RuntimeError):
    """This model cannot run through onnxruntime here (the message says why)."""


class Tokenizer:
    """A ``tokenizers`` tokenizer called like a Hugging Face one: ``tokenizer(texts)["input_ids"]``.

    Not thread-safe (it keeps its truncation setting): the embedder calls it under its lock.
    """

    def __init__(self, path: Path, max_length: int):
        from tokenizers import Tokenizer as RustTokenizer

        self._tokenizer = RustTokenizer.from_file(str(path))
        self._tokenizer.no_padding()
        self.max_length = max_length

    def __call__(self, texts: list[str], truncation: bool = False) -> dict[str, list[list[int]]]:
        """Token ids, attention masks and type ids of ``texts`` (special tokens included)."""
        if truncation:
            self._tokenizer.enable_truncation(self.max_length)
        else:
            self._tokenizer.no_truncation()
        encodings = self._tokenizer.encode_batch(list(texts))
        return {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }


class OnnxEncoder:
    """The ``encode`` / ``tokenizer`` / ``get_embedding_dimension`` part of a SentenceTransformer."""

    def __init__(
        self, graph: Path, tokenizer: Tokenizer, pooling: str, dimension: int, threads: int
    ):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.dimension = dimension
        self.graph = graph

    def get_embedding_dimension(self) -> int:
        """Length of each vector."""
        return self.dimension

    def encode(
        self,
        texts: list[str],
        batch_size: int = 32,
        normalize_embeddings: bool = True,
        show_progress_bar: bool = False,
    ) -> np.ndarray:
        """Vectors of ``texts`` in their order; batches group texts of similar length
        (as sentence-transformers does) so little padding is computed."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            out[batch] = self._embed([texts[i] for i in batch])
        if normalize_embeddings:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _embed(self, texts: list[str]) -> np.ndarray:
        tokens = self.tokenizer(texts, truncation=True)
        width = max(len(ids) for ids in tokens["input_ids"])
        feed = {}
        for name, rows in tokens.items():
            if name in self._inputs:  # pad to the longest text of the batch
                feed[name] = np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64)
        hidden = self.session.run(None, feed)[0]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = feed["attention_mask"][:, :, None].astype(np.float32)
        return (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def describe_folder(folder: Path) -> tuple[str, int, int]:
    """``(pooling, dimension, max_seq_length)`` of a sentence-transformers folder.

    Raises:
        OnnxUnavailable: a module or pooling mode this encoder does not reproduce.
    """
    try:
        modules = _read_json(folder / "modules.json")
        pooling_dir = next(m["path"] for m in modules if m["type"].endswith(".Pooling"))
        pooling = _read_json(folder / pooling_dir / "config.json")
        max_length = int(
            _read_json(folder / "sentence_bert_config.json").get("max_seq_length", 512)
        )
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise OnnxUnavailable(
            f"{folder} is not a sentence-transformers folder I can read ({exc})"
        ) from exc
    unknown = {m["type"] for m in modules} - _SUPPORTED_MODULES
    if unknown:
        raise OnnxUnavailable(f"modules {', '.join(sorted(unknown))} have no ONNX equivalent here")
    modes = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes == ["pooling_mode_mean_tokens"]:
        mode = "mean"
    elif modes == ["pooling_mode_cls_token"]:
        mode = "cls"
    else:
        raise OnnxUnavailable(f"pooling {modes} has no ONNX equivalent here")
    return mode, int(pooling["word_embedding_dimension"]), max_length


def export_graph(folder: Path, target: Path) -> None:
    """Write the transformer of ``folder`` as an ONNX graph (dynamic batch and length) to ``target``.

    Raises:
        OnnxUnavailable: torch, transformers or onnx is missing, or the export failed.
    """
    try:
        import torch
        from transformers import AutoModel
    except ImportError as exc:
        raise OnnxUnavailable(f"exporting to ONNX needs torch and transformers ({exc})") from exc

    class Encoder(torch.nn.Module):
        """Keyword arguments in, the last hidden state out (the graph's one output)."""

        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    names = ["input_ids", "attention_mask", "token_type_ids"]
    sample = torch.ones(2, 8, dtype=torch.long)
    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "last_hidden_state"]}
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a blink
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about shapes, harmless here
            torch.onnx.export(
                Encoder(model),
                (sample, sample, torch.zeros_like(sample)),
                str(target),
                input_names=names,
                output_names=["last_hidden_state"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:  # noqa: BLE001 - any failure means: use sentence-transformers
        raise OnnxUnavailable(f"the ONNX export failed ({type(exc).__name__}: {exc})") from exc
    finally:
        hf_logging.enable_progress_bar()


def cached_graph(spec: registry.ModelSpec) -> Path:
    """The ONNX graph of ``spec``: shipped in its folder, or exported once and cached.

    A cached graph whose sha256 no longer matches (damaged, half-copied) is exported again.

    Raises:
        OnnxUnavailable: no graph ships and none can be exported.
    """
    folder = Path(spec.path)
    for shipped in (folder / "onnx" / GRAPH, folder / GRAPH):
        if shipped.is_file():
            return shipped
    cache = hf_checkpoint.cache_root(get_settings()) / spec.name / spec.tag / "onnx"
    weights = registry.checksum_file(spec, folder)
    if hf_checkpoint.is_current(cache, weights, spec.sha256) and _checksum_ok(cache):
        return cache / GRAPH
    log.warning("Exporting %s to ONNX once (torch, some seconds); cached in %s", spec.ref, cache)

    def save(tmp: Path) -> None:
        export_graph(folder, tmp / GRAPH)
        (tmp / CHECKSUM).write_text(registry.sha256_file(tmp / GRAPH) + "\n")

    hf_checkpoint.write(cache, weights, spec.sha256, save, opset=OPSET)
    return cache / GRAPH


def _checksum_ok(cache: Path) -> bool:
    try:
        recorded = (cache / CHECKSUM).read_text().strip()
        return matches_sha256(cache / GRAPH, recorded)
    except OSError:  # a checksum or a graph missing: export again
        return False


def load_encoder(spec: registry.ModelSpec, threads: int) -> OnnxEncoder:
    """An :class:`OnnxEncoder` for a resolved sentence-transformers entry.

    Raises:
        OnnxUnavailable: onnxruntime or tokenizers is missing, the folder has modules this
            encoder does not reproduce, or no ONNX graph can be had.
    """
    try:
        import onnxruntime  # noqa: F401
        import tokenizers  # noqa: F401
    except ImportError as exc:
        raise OnnxUnavailable(f"onnxruntime and tokenizers are needed ({exc})") from exc
    folder = Path(spec.path)
    pooling, dimension, max_length = describe_folder(folder)
    tokenizer = Tokenizer(folder / "tokenizer.json", max_length)
    return OnnxEncoder(cached_graph(spec), tokenizer, pooling, dimension, threads)
