"""A collection's chunks as one numpy table, searched in memory and saved next to the store.

Chroma keeps the collection; searching it needs ``import chromadb``, which takes longer on
a small machine than embedding the question and ranking every chunk. So a search ranks a
:class:`ChunkTable` (ids, texts, metadata and a matrix of unit vectors: exact cosine
similarity, one matrix product), built from Chroma once and saved as
``<store>/llmlab-snapshots/<collection>.npz``. A new process that finds the saved table
current loads it without importing chromadb::

    from llmlab.rag import snapshot
    version = snapshot.store_version(db_dir, "default")   # None: unknown collection or store
    table = snapshot.load(db_dir, "default", version)     # None: missing, stale or damaged
    scores = table.scores(query_vector)                    # cosine similarity of every chunk
    table.best(scores, 3)                                  # row numbers, best first

Whether a saved table is current is told by the store itself: Chroma numbers every write
(add, update, delete) and records, per collection, the number of the last one applied.
:func:`store_version` reads that number from Chroma's sqlite file with the standard
library (a millisecond), and a table is current only if it was built at the same number.
If the file cannot be read that way (another Chroma layout), there is no version, and the
table is built from Chroma again for each search: slower, never stale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from llmlab.rag.hybrid import BM25Index

log = logging.getLogger(__name__)
SNAPSHOT_DIR = "llmlab-snapshots"
_FORMAT = 1
_VERSION_QUERY = """
SELECT c.id, COALESCE(m.seq_id, 0)
FROM collections AS c
JOIN segments AS s ON s.collection = c.id AND s.scope = 'METADATA'
LEFT JOIN max_seq_id AS m ON m.segment_id = s.id
WHERE c.name = ?
"""


class ChunkTable:
    """Every chunk of one collection: ``ids``, ``texts``, ``metadatas`` and ``vectors``
    (one unit-length row per chunk), as of store ``version``."""

    def __init__(
        self,
        version: str | None,
        embedding_model: str | None,
        ids: list[str],
        texts: list[str],
        metadatas: list[dict[str, Any]],
        vectors: np.ndarray,
    ):
        self.vectors = np.asarray(vectors, dtype=np.float32)
        if self.vectors.ndim != 2 or not len(ids) == len(texts) == len(metadatas) == len(vectors):
            raise ValueError("ids, texts, metadatas and vectors need one entry (row) per chunk")
        self.version = version
        self.embedding_model = embedding_model
        self.ids = list(ids)
        self.texts = list(texts)
        self.metadatas = list(metadatas)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_collection(cls, collection: Any, version: str | None) -> ChunkTable:
        """Read every chunk of a Chroma collection (``version``: the store's, read before)."""
        data = collection.get(include=["documents", "metadatas", "embeddings"])
        vectors = data["embeddings"]
        return cls(
            version,
            (collection.metadata or {}).get("embedding_model"),
            data["ids"],
            data["documents"] or [],
            [dict(m) for m in data["metadatas"] or []],
            np.zeros((0, 0)) if vectors is None or len(vectors) == 0 else np.asarray(vectors),
        )

    def scores(self, vector: Any) -> np.ndarray:
        """Cosine similarity of each chunk to a unit-length query vector."""
        return self.vectors @ np.asarray(vector, dtype=np.float32)

    @staticmethod
    def best(scores: np.ndarray, n: int) -> list[int]:
        """The row numbers of the ``n`` highest scores, best first (ties: the earlier row)."""
        return [int(i) for i in np.argsort(-scores, kind="stable")[:n]]

    @cached_property
    def bm25(self) -> BM25Index:
        """The keyword index of the texts, built on first use."""
        return BM25Index(self.ids, self.texts)

    @cached_property
    def row_of(self) -> dict[str, int]:
        """Row number by chunk id."""
        return {chunk_id: row for row, chunk_id in enumerate(self.ids)}


def store_version(db_dir: Path, name: str) -> str | None:
    """``collection id:number of its last applied write`` from Chroma's sqlite file, or None
    if there is no such collection, no store, or a layout this function does not know."""
    path = Path(db_dir) / "chroma.sqlite3"
    if not path.is_file():
        return None
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=5)) as db:
            row = db.execute(_VERSION_QUERY, (name,)).fetchone()
    except sqlite3.Error:
        return None
    return None if row is None else f"{row[0]}:{row[1]}"


def snapshot_path(db_dir: Path, name: str) -> Path:
    """Where a collection's table is saved."""
    return Path(db_dir) / SNAPSHOT_DIR / f"{name}.npz"


def save(db_dir: Path, name: str, table: ChunkTable) -> None:
    """Write ``table`` atomically (a reader sees the old file or the new one); a table
    without a version, or a store folder that cannot be written, is not saved."""
    if table.version is None:
        return
    header = {
        "format": _FORMAT,
        "version": table.version,
        "embedding_model": table.embedding_model,
        "ids": table.ids,
        "texts": table.texts,
        "metadatas": table.metadatas,
    }
    encoded = np.frombuffer(json.dumps(header, ensure_ascii=False).encode(), dtype=np.uint8)
    target = snapshot_path(db_dir, name)
    try:
        target.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    except OSError as exc:
        log.debug("not saving the chunk table of %s: %s", name, exc)
        return
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez(out, header=encoded, vectors=table.vectors)
        os.replace(tmp, target)
    except OSError as exc:
        log.debug("not saving the chunk table of %s: %s", name, exc)
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def load(db_dir: Path, name: str, version: str | None) -> ChunkTable | None:
    """The saved table of ``name`` if it was built at store ``version``; None if there is no
    version, no file, a file of another version, or a damaged file."""
    path = snapshot_path(db_dir, name)
    if version is None or not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes())
            vectors = data["vectors"]
        if header.get("format") != _FORMAT or header.get("version") != version:
            return None
        return ChunkTable(
            version,
            header["embedding_model"],
            header["ids"],
            header["texts"],
            header["metadatas"],
            vectors,
        )
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None


def discard(db_dir: Path, name: str) -> None:
    """Delete a collection's saved table, if there is one."""
    with contextlib.suppress(FileNotFoundError):
        snapshot_path(db_dir, name).unlink()
