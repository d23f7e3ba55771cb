"""Turn text into vectors with a sentence-transformers model from the registry.

The default is all-MiniLM-L6-v2, which ships in a pip package, so it works offline.
Any catalog entry with the ``embeddings`` capability can be named instead::

    from llmlab.rag.embeddings import get_embedder
    embedder = get_embedder()                    # settings.embedding_model
    vectors = embedder.embed_documents(["a cat", "a kitten"])   # unit length, 384 numbers each
    query = embedder.embed_query("small cat")
    embedder.runtime                             # 'onnx' or 'sentence-transformers'

Vectors are normalised to length 1, so a dot product is the cosine similarity.

Two runtimes give the same vectors (cosine >= 0.999, tested). On the CPU the weights run
through onnxruntime (``llmlab.rag.onnx_encoder``): a search then does not import torch
and sentence-transformers, which takes longer than embedding the question. On a GPU
(``device`` cuda or mps, or auto with a CUDA device present) and wherever the ONNX path
cannot be had (a one-line note says why), sentence-transformers runs them.
An embedder may be shared between threads (a server's uploads and its ``/v1/embeddings``
use the same one): it loads, embeds and counts tokens one call at a time, because a
Hugging Face fast tokenizer used by two threads at once fails ("Already borrowed") or
lets one call's truncation setting leak into the other.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import threading
from typing import Any

from llmlab import registry
from llmlab.hardware import pick_device
from llmlab.rag.onnx_encoder import OnnxUnavailable, cached_graph, load_encoder
from llmlab.settings import get_settings

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "onnx", "sentence-transformers")


def _cuda_visible() -> bool:
    """A cheap sign of an NVIDIA GPU, checked before paying for ``import torch``."""
    return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None


class Embedder:
    """A sentence-transformers model, loaded on first use; thread-safe (see the module docstring).

    ``runtime``: ``onnx`` (CPU, no torch), ``sentence-transformers``, or ``auto``: onnx on
    the CPU when it can be had, else sentence-transformers.
    """

    def __init__(
        self,
        spec: registry.ModelSpec,
        device: str = "auto",
        batch_size: int = 32,
        runtime: str = "auto",
    ):
        if "embeddings" not in spec.capabilities:
            raise registry.RegistryError(
                f"{spec.ref} is not an embedding model (capabilities: {', '.join(spec.capabilities)}). "
                "Name an entry with the 'embeddings' capability, e.g. all-minilm-l6-v2."
            )
        if runtime not in RUNTIMES:
            raise ValueError(f"Unknown embedding runtime {runtime!r}. Use {', '.join(RUNTIMES)}.")
        self.spec = spec
        if runtime == "sentence-transformers":
            self.device = pick_device(device)
        elif runtime == "onnx" or device == "cpu" or (device == "auto" and not _cuda_visible()):
            # Deciding "auto" with torch costs its import; with no GPU in sight it is the CPU.
            self.device = "cpu"
        else:
            self.device = pick_device(device)
        onnx = runtime != "sentence-transformers" and self.device == "cpu"
        self.runtime = "onnx" if onnx else "sentence-transformers"
        self._must_onnx = runtime == "onnx"
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()  # held to load, embed and count tokens

    @property
    def name(self) -> str:
        """The catalog reference (``name:tag``) stored with every collection built with it."""
        return self.spec.ref

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer`` or :class:`~llmlab.rag.onnx_encoder.OnnxEncoder`
        (loads it the first time). Its tokenizer is not thread-safe: use
        :meth:`embed_documents` and :meth:`count_tokens`, which take the lock."""
        with self._lock:
            return self._loaded()

    def _loaded(self) -> Any:
        """The model, loaded if need be (the caller holds the lock)."""
        if self._model is None:
            self._model = self._load()
        return self._model

    def start_loading(self) -> None:
        """Begin loading the ONNX encoder on a daemon thread, so it overlaps other start-up
        work (opening the store); the first embed waits for it. A failure is left for the
        first embed to report (or fall back from). Only the ``onnx`` runtime, and only once
        its graph is on disk: exporting it and the sentence-transformers fallback import
        torch, which stays on the calling thread."""
        if self.runtime != "onnx" or self._model is not None:
            return
        try:
            import onnxruntime  # noqa: F401  # imported here so two threads never import at once
            import tokenizers  # noqa: F401

            spec = self.spec if self.spec.path else registry.resolve(self.spec)
            cached_graph(spec)  # exports it on this thread if it is not there yet
        except (ImportError, OnnxUnavailable, registry.RegistryError):
            return

        def load() -> None:
            # Any failure: the first embed loads again and says why, or falls back.
            with self._lock, contextlib.suppress(Exception):
                if self._model is None:
                    self._model = load_encoder(spec, get_settings().threads)

        threading.Thread(target=load, name="embedder-load", daemon=True).start()

    def _load(self) -> Any:
        spec = self.spec if self.spec.path else registry.resolve(self.spec)
        if self.runtime == "onnx":
            try:
                return load_encoder(spec, get_settings().threads)
            except OnnxUnavailable as exc:
                if self._must_onnx:
                    raise
                log.warning("Embedding with sentence-transformers (slower to start): %s", exc)
                self.runtime = "sentence-transformers"
        return self._load_sentence_transformers(spec.path)

    def _load_sentence_transformers(self, path: Any) -> Any:
        from sentence_transformers import SentenceTransformer
        from transformers.utils import logging as hf_logging

        # transformers draws a "Loading weights" bar for a model that loads in a blink.
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            return SentenceTransformer(str(path), device=self.device, local_files_only=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()

    @property
    def dimensions(self) -> int:
        """Length of each vector."""
        getter = (
            getattr(self.model, "get_embedding_dimension", None)
            or self.model.get_sentence_embedding_dimension
        )
        return int(getter())

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Vectors for many texts (batched), each of length 1."""
        if not texts:
            return []
        with self._lock:
            vectors = self._loaded().encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return vectors.tolist()

    def count_tokens(self, texts: list[str]) -> int:
        """How many tokens ``texts`` are in all, special tokens included and before the
        model's truncation (what an OpenAI-style ``usage`` reports)."""
        if not texts:
            return 0
        with self._lock:
            return sum(len(ids) for ids in self._loaded().tokenizer(texts)["input_ids"])

    def embed_query(self, text: str) -> list[float]:
        """The vector of one search query."""
        return self.embed_documents([text])[0]


_cache_lock = threading.Lock()  # two threads asking at once get the same embedder


@functools.lru_cache(maxsize=4)
def _cached(ref: str, device: str, runtime: str) -> Embedder:
    return Embedder(registry.resolve(ref), device=device, runtime=runtime)


def get_embedder(
    name: str | None = None, device: str | None = None, runtime: str | None = None
) -> Embedder:
    """The embedder for a catalog name (default: ``settings.embedding_model``), shared per process.

    Loading a model takes seconds, so the same name, device and runtime return the same
    object (safe to share between threads). ``runtime`` defaults to
    ``settings.embedding_runtime`` (``LLMLAB_EMBEDDING_RUNTIME``, ``auto``).

    Raises:
        registry.RegistryError: unknown name, model not installed, or not an embedding model.
    """
    settings = get_settings()
    spec = registry.find(name or settings.embedding_model, settings)
    with _cache_lock:
        return _cached(spec.ref, device or settings.device, runtime or settings.embedding_runtime)
