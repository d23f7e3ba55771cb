"""Turn text into vectors with a sentence-transformers model from the registry.

The default is all-MiniLM-L6-v2, which ships in a pip package, so it works offline.
Any catalog entry with the ``embeddings`` capability can be named instead::

    from llmlab.rag.embeddings import get_embedder
    embedder = get_embedder()                    # settings.embedding_model, on pick_device()
    vectors = embedder.embed_documents(["a cat", "a kitten"])   # unit length, 384 numbers each
    query = embedder.embed_query("small cat")

Vectors are normalised to length 1, so a dot product is the cosine similarity.
"""

from __future__ import annotations

import functools
from typing import Any

from llmlab import registry
from llmlab.hardware import pick_device
from llmlab.settings import get_settings


class Embedder:
    """A sentence-transformers model, loaded on first use."""

    def __init__(self, spec: registry.ModelSpec, device: str = "auto", batch_size: int = 32):
        if "embeddings" not in spec.capabilities:
            raise registry.RegistryError(
                f"{spec.ref} is not an embedding model (capabilities: {', '.join(spec.capabilities)}). "
                "Name an entry with the 'embeddings' capability, e.g. all-minilm-l6-v2."
            )
        self.spec = spec
        self.device = pick_device(device)
        self.batch_size = batch_size
        self._model: Any = None

    @property
    def name(self) -> str:
        """The catalog reference (``name:tag``) stored with every collection built with it."""
        return self.spec.ref

    @property
    def model(self) -> Any:
        """The loaded ``SentenceTransformer`` (loads it the first time)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            path = self.spec.path or registry.resolve(self.spec).path
            # transformers draws a "Loading weights" bar for a model that loads in a blink.
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self._model = SentenceTransformer(
                    str(path), device=self.device, local_files_only=True
                )
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
        return self._model

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
        vectors = self.model.encode(
            texts, batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        """The vector of one search query."""
        return self.embed_documents([text])[0]


@functools.lru_cache(maxsize=4)
def _cached(ref: str, device: str) -> Embedder:
    return Embedder(registry.resolve(ref), device=device)


def get_embedder(name: str | None = None, device: str | None = None) -> Embedder:
    """The embedder for a catalog name (default: ``settings.embedding_model``), shared per process.

    Loading a model takes seconds, so the same name and device return the same object.

    Raises:
        registry.RegistryError: unknown name, model not installed, or not an embedding model.
    """
    settings = get_settings()
    spec = registry.find(name or settings.embedding_model, settings)
    return _cached(spec.ref, device or settings.device)
