"""A persistent vector store of chunks (Chroma, embedded, no server) with incremental ingestion.

Each collection lives under ``$LLMLAB_HOME/rag`` (or any folder) and remembers which
embedding model built it. Ingesting again skips unchanged files (same sha256), replaces
the chunks of changed files, and with ``prune=True`` drops files deleted from disk::

    from llmlab.rag.store import DocumentStore
    store = DocumentStore("makerspace", create=True)
    report = store.ingest(["part3/data/docs"])
    report.chunks_added, report.chunks_skipped
    for hit in store.search("How much is a day pass?", top_k=3):
        hit.score, hit.source, hit.location
    store.search("MAX_BOOKING_HOURS", mode="hybrid")    # BM25 fused with the embeddings

Retrieval modes: ``dense`` (the embeddings, by cosine similarity), ``bm25`` (keywords,
``llmlab.rag.hybrid``) and ``hybrid`` (both rankings merged by reciprocal rank fusion).
Every hit's ``score`` is its cosine similarity whatever the mode, so one relevance
threshold works for all three.

Chroma holds the collection; searches rank a copy of it in memory (``llmlab.rag.snapshot``:
exact cosine over every chunk), which is saved next to the store after each ingestion, so
a new process can search without importing chromadb.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.rag import snapshot
from llmlab.rag.embeddings import Embedder, get_embedder
from llmlab.rag.errors import (
    EmbeddingModelMismatchError,
    EmptyCollectionError,
    RagError,
    UnknownCollectionError,
    UnreadableFileError,
)
from llmlab.rag.hybrid import reciprocal_rank_fusion
from llmlab.rag.loaders import file_hash, find_files, load_file
from llmlab.rag.splitting import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, TextChunk, split_units
from llmlab.settings import get_settings

DEFAULT_COLLECTION = "default"
RETRIEVAL_MODES = ("dense", "bm25", "hybrid")
# How deep each ranking goes before fusion (or the whole collection, if smaller).
FUSION_DEPTH = 20
_NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,510}[A-Za-z0-9]$")


def default_db_dir() -> Path:
    """``$LLMLAB_HOME/rag``: where collections live unless a folder is named."""
    return get_settings().home / "rag"


def open_client(db_dir: str | Path | None = None) -> Any:
    """A Chroma ``PersistentClient`` on ``db_dir`` (created if missing), telemetry off.

    Raises:
        RagError: ``db_dir`` is a file, a folder that cannot be created, or a damaged store.
    """
    os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
    _import_chromadb()
    import chromadb
    from chromadb.config import Settings as ChromaSettings
    from chromadb.errors import ChromaError

    path = Path(db_dir) if db_dir else default_db_dir()
    if path.exists() and not path.is_dir():
        raise RagError(
            f"The store {path} is a file, not a folder. Name a folder for the store (--db): "
            "an existing store, or a new folder, which is created."
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RagError(
            f"Cannot create the store folder {path}: {exc.strerror or exc}. "
            "Name a folder you can write to (--db)."
        ) from exc
    try:
        return chromadb.PersistentClient(
            path=str(path), settings=ChromaSettings(anonymized_telemetry=False, allow_reset=False)
        )
    except ChromaError as exc:
        raise RagError(
            f"The store in {path} cannot be opened ({exc}): it is damaged or not a Chroma store. "
            "Move the folder aside and ingest again, or name another folder (--db)."
        ) from exc


def _import_chromadb() -> None:
    """Import chromadb without the two costs of its import that do nothing for the lab.

    - chromadb imports jsonschema, whose format checkers import ``rfc3987_syntax`` when it
      is installed (Jupyter brings it); that module compiles an Earley grammar at import,
      seconds of CPU on a small machine, more than a whole search. chromadb never checks
      IRI formats, so while jsonschema is first imported that module reads as absent; the
      IRI check is then missing for this process only, and only if jsonschema was not
      imported before.
    - chromadb marks ~150 methods with ``overrides.override``, which checks each one's
      signature against its base class while the class is built (0.3 s here). Those checks
      are for chromadb's developers; while chromadb is imported the decorator only marks
      the method, as ``EnforceOverrides`` needs.
    """
    if "chromadb" in sys.modules:
        return
    with contextlib.ExitStack() as stack:
        if "jsonschema" not in sys.modules and "rfc3987_syntax" not in sys.modules:
            stack.enter_context(_absent_module("rfc3987_syntax"))
        stack.enter_context(_unchecked_overrides())
        import chromadb  # noqa: F401


@contextmanager
def _absent_module(name: str) -> Iterator[None]:
    """While inside, ``import name`` raises ImportError."""
    sys.modules[name] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        del sys.modules[name]


@contextmanager
def _unchecked_overrides() -> Iterator[None]:
    """While inside, ``@overrides.override`` (and ``@overrides``) mark without checking."""
    try:
        import overrides
    except ImportError:  # a chromadb that no longer needs it
        yield
        return
    module = sys.modules["overrides.overrides"]  # the package's ``overrides`` is the function

    def mark(method: Any = None, **_options: Any) -> Any:
        if method is None:  # used as @override(check_signature=...)
            return mark
        method.__override__ = True
        return method

    saved = {
        (owner, name): getattr(owner, name)
        for owner in (overrides, module)
        for name in ("override", "overrides")
    }
    for owner, name in saved:
        setattr(owner, name, mark)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def display_path(source: str | Path) -> str:
    """A source path as people want to read it: relative to the current folder when inside it."""
    path = Path(source)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass
class Hit:
    """One retrieved chunk. ``score`` is the cosine similarity (1 - cosine distance)."""

    text: str
    source: str
    location: str
    score: float
    metadata: dict[str, Any] = field(default_factory=dict)
    chunk_id: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape used by the CLI: source, location, score, text."""
        return {
            "source": display_path(self.source),
            "location": self.location,
            "score": round(self.score, 4),
            "text": self.text,
        }


@dataclass
class FileOutcome:
    """What ingestion did with one file: added, updated, unchanged, failed or removed."""

    path: Path
    status: str
    chunks: int = 0
    error: str | None = None


@dataclass
class IngestReport:
    """Totals of one ingestion run."""

    files: list[FileOutcome] = field(default_factory=list)
    chunks_added: int = 0
    chunks_skipped: int = 0
    chunks_removed: int = 0
    seconds: float = 0.0

    def count(self, status: str) -> int:
        """Number of files with this status."""
        return sum(1 for f in self.files if f.status == status)

    @property
    def failed(self) -> list[FileOutcome]:
        """Files that could not be read (their old chunks, if any, were kept)."""
        return [f for f in self.files if f.status == "failed"]

    def summary(self) -> str:
        """One line for people: files by status, chunks added/skipped/removed, seconds."""
        seen = len([f for f in self.files if f.status != "removed"])
        parts = [
            f"{self.count(s)} {s}" for s in ("added", "updated", "unchanged", "failed", "removed")
        ]
        return (
            f"{seen} files ({', '.join(parts)}); chunks: {self.chunks_added} added, "
            f"{self.chunks_skipped} skipped, {self.chunks_removed} removed; {self.seconds:.1f} s"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return {
            "files": [
                {
                    "path": display_path(f.path),
                    "status": f.status,
                    "chunks": f.chunks,
                    "error": f.error,
                }
                for f in self.files
            ],
            "chunks_added": self.chunks_added,
            "chunks_skipped": self.chunks_skipped,
            "chunks_removed": self.chunks_removed,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class CollectionInfo:
    """A collection as ``list`` shows it."""

    name: str
    chunks: int
    files: int
    embedding_model: str | None


def check_name(name: str) -> str:
    """Return ``name`` if Chroma accepts it as a collection name, else raise RagError."""
    if not _NAME_RULE.match(name or "") or ".." in name:
        raise RagError(
            f"{name!r} is not a valid collection name: use 3-512 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit."
        )
    return name


def collection_names(client: Any) -> list[str]:
    """Names of the collections in a client (Chroma returns names or objects by version)."""
    return sorted(c if isinstance(c, str) else c.name for c in client.list_collections())


def list_collections(db_dir: str | Path | None = None) -> list[CollectionInfo]:
    """Every collection in the store with its chunk count, file count and embedding model."""
    client = open_client(db_dir)
    infos = []
    for name in collection_names(client):
        collection = client.get_collection(name)
        metadatas = collection.get(include=["metadatas"])["metadatas"] or []
        files = {m.get("source") for m in metadatas if m}
        model = (collection.metadata or {}).get("embedding_model")
        infos.append(CollectionInfo(name, collection.count(), len(files), model))
    return infos


def remove_collection(name: str, db_dir: str | Path | None = None) -> int:
    """Delete a collection and return how many chunks it held.

    Raises:
        UnknownCollectionError: there is no such collection.
    """
    client = open_client(db_dir)
    _require(client, name)
    count = client.get_collection(name).count()
    client.delete_collection(name)
    snapshot.discard(Path(db_dir) if db_dir else default_db_dir(), name)
    return count


def _require(client: Any, name: str) -> None:
    names = collection_names(client)
    if name not in names:
        known = ", ".join(names) if names else "none yet"
        raise UnknownCollectionError(
            f"There is no collection {name!r} (collections: {known}). "
            f"Create it with: python part3/document_qa.py ingest PATH --collection {name}"
        )


class IngestInterrupted(KeyboardInterrupt):
    """Ctrl-C during :meth:`DocumentStore.ingest`. Every file in ``report`` is stored
    completely; the file being read when it came keeps its earlier chunks, if it had any."""

    def __init__(self, report: IngestReport):
        super().__init__("ingestion interrupted")
        self.report = report


@contextmanager
def _interrupt_after() -> Iterator[None]:
    """Hold Ctrl-C back while the block runs, then deliver it: the store is never left
    half-way through replacing a file's chunks. Only the main thread gets signals, so
    elsewhere (the server's worker threads) this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        signal.raise_signal(signal.SIGINT)  # to the handler that was there: KeyboardInterrupt


def _chunk_id(chunk: TextChunk) -> str:
    key = f"{chunk.source}\n{chunk.index}\n{chunk.content_hash}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


class DocumentStore:
    """One collection of chunks plus the embedder that built it.

    Args:
        collection: collection name.
        db_dir: store folder (default ``$LLMLAB_HOME/rag``).
        embedder: the embedding model; default: the one the collection was built with,
            or ``settings.embedding_model`` for a new collection.
        create: create the collection if missing (ingestion); otherwise a missing
            collection raises :class:`UnknownCollectionError`.
        retrieval: how :meth:`search` ranks chunks by default: dense, bm25 or hybrid.
    """

    def __init__(
        self,
        collection: str = DEFAULT_COLLECTION,
        db_dir: str | Path | None = None,
        embedder: Embedder | None = None,
        create: bool = False,
        retrieval: str = "dense",
    ):
        self.retrieval = _check_mode(retrieval)
        self.name = check_name(collection)
        self.db_dir = Path(db_dir) if db_dir else default_db_dir()
        self._client: Any = None
        self._collection: Any = None
        # A saved table that is current needs no chromadb at all (see llmlab.rag.snapshot).
        version = None if create else snapshot.store_version(self.db_dir, self.name)
        self._table = snapshot.load(self.db_dir, self.name, version)
        if self._table is not None:
            built_with = self._table.embedding_model
        elif self.name in collection_names(self.client):
            self._collection = self.client.get_collection(self.name)
            built_with = (self._collection.metadata or {}).get("embedding_model")
        elif create:
            embedder = embedder or get_embedder()
            built_with = embedder.name
            self._collection = self.client.create_collection(
                self.name, metadata={"hnsw:space": "cosine", "embedding_model": built_with}
            )
        else:
            _require(self.client, self.name)
        if embedder is None:
            embedder = get_embedder(built_with)
        elif built_with and built_with != embedder.name:
            raise EmbeddingModelMismatchError(
                f"Collection {self.name!r} was built with {built_with}, not {embedder.name}; "
                "vectors of different models cannot be compared. Use that model, or another "
                "collection."
            )
        self.embedder = embedder

    @property
    def client(self) -> Any:
        """The Chroma client, opened on first use (a search from a saved table needs none)."""
        if self._client is None:
            self._client = open_client(self.db_dir)
        return self._client

    @property
    def collection(self) -> Any:
        """The Chroma collection, opened on first use."""
        if self._collection is None:
            _require(self.client, self.name)
            self._collection = self.client.get_collection(self.name)
        return self._collection

    def chunk_table(self) -> snapshot.ChunkTable:
        """Every chunk with its vector as of now: the table in memory or saved next to the
        store if the store has not been written since it was built, else read from Chroma
        (and saved for the next process)."""
        version = snapshot.store_version(self.db_dir, self.name)
        table = self._table
        if table is None or version is None or table.version != version:
            table = snapshot.load(self.db_dir, self.name, version)
        if table is None:
            table = snapshot.ChunkTable.from_collection(self.collection, version)
            snapshot.save(self.db_dir, self.name, table)
        self._table = table
        return table

    def count(self) -> int:
        """Number of chunks stored."""
        return len(self.chunk_table())

    def require_chunks(self) -> int:
        """Return the chunk count, or raise EmptyCollectionError (with the command to fix it) if 0."""
        return len(self._nonempty_table())

    def _nonempty_table(self) -> snapshot.ChunkTable:
        table = self.chunk_table()
        if not len(table):
            raise EmptyCollectionError(
                f"Collection {self.name!r} is empty. Add documents first: "
                f"python part3/document_qa.py ingest PATH --collection {self.name}"
            )
        return table

    def sources(self) -> dict[str, dict[str, Any]]:
        """Stored files: ``{source: {"file_hash", "chunking", "ids"}}``."""
        data = self.collection.get(include=["metadatas"])
        files: dict[str, dict[str, Any]] = {}
        for chunk_id, meta in zip(data["ids"], data["metadatas"] or [], strict=True):
            entry = files.setdefault(
                meta["source"],
                {"file_hash": meta.get("file_hash"), "chunking": meta.get("chunking"), "ids": []},
            )
            entry["ids"].append(chunk_id)
        return files

    def ingest(
        self,
        paths: Iterable[str | Path],
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
        prune: bool = False,
        progress: Callable[[FileOutcome], None] | None = None,
    ) -> IngestReport:
        """Add new files, replace changed ones, skip unchanged ones; optionally prune deleted ones.

        A file that cannot be read is reported (status ``failed``) and any chunks it had
        before are kept. ``progress`` is called once per file with its outcome.

        Raises:
            NoFilesError: a path is missing or empty (nothing is changed then).
            ValueError: bad chunk size or overlap.
            IngestInterrupted: Ctrl-C; the files done so far are kept, each one whole.
        """
        started = time.perf_counter()
        paths = list(paths)
        files = find_files(paths)
        roots = [Path(p).expanduser().resolve() for p in paths]
        chunking = f"{chunk_size}/{chunk_overlap}"
        split_units([], chunk_size, chunk_overlap)  # validates the sizes before any work
        stored = self.sources()
        report = IngestReport()
        try:
            for path in files:
                outcome = self._ingest_file(
                    path, stored.get(str(path)), chunking, chunk_size, chunk_overlap, report
                )
                report.files.append(outcome)
                if progress:
                    progress(outcome)
            if prune:
                self._prune(stored, {str(p) for p in files}, roots, report, progress)
        except KeyboardInterrupt as exc:
            report.seconds = time.perf_counter() - started
            raise IngestInterrupted(report) from exc
        report.seconds = time.perf_counter() - started
        self.chunk_table()  # saved now, so the next search in a new process needs no chromadb
        return report

    def _prune(
        self,
        stored: dict[str, dict[str, Any]],
        present: set[str],
        roots: list[Path],
        report: IngestReport,
        progress: Callable[[FileOutcome], None] | None,
    ) -> None:
        """Drop the chunks of files under ``roots`` that were deleted from disk."""
        for source, entry in stored.items():
            inside = any(Path(source).is_relative_to(root) for root in roots)
            if inside and source not in present and not Path(source).exists():
                self.collection.delete(ids=entry["ids"])
                report.chunks_removed += len(entry["ids"])
                outcome = FileOutcome(Path(source), "removed", len(entry["ids"]))
                report.files.append(outcome)
                if progress:
                    progress(outcome)

    def _ingest_file(
        self,
        path: Path,
        old: dict[str, Any] | None,
        chunking: str,
        chunk_size: int,
        chunk_overlap: int,
        report: IngestReport,
    ) -> FileOutcome:
        try:
            digest = file_hash(path)
            if old and old["file_hash"] == digest and old["chunking"] == chunking:
                report.chunks_skipped += len(old["ids"])
                return FileOutcome(path, "unchanged", len(old["ids"]))
            chunks = split_units(load_file(path), chunk_size, chunk_overlap)
        except (UnreadableFileError, OSError) as exc:
            return FileOutcome(path, "failed", error=str(exc))
        if not chunks:
            return FileOutcome(
                path, "failed", error=f"{path}: has no text to index. Add some, or leave it out."
            )
        # Embed first: if that fails or is interrupted, the file's old chunks are still in place.
        vectors = self.embedder.embed_documents([c.text for c in chunks])
        with _interrupt_after():  # the old chunks and the new ones: all swapped, or none
            if old:
                self.collection.delete(ids=old["ids"])
            batch = self.client.get_max_batch_size()
            for start in range(0, len(chunks), batch):
                part = chunks[start : start + batch]
                self.collection.add(
                    ids=[_chunk_id(c) for c in part],
                    embeddings=vectors[start : start + batch],
                    documents=[c.text for c in part],
                    metadatas=[self._metadata(c, digest, chunking) for c in part],
                )
        if old:
            report.chunks_removed += len(old["ids"])
        report.chunks_added += len(chunks)
        return FileOutcome(path, "updated" if old else "added", len(chunks))

    @staticmethod
    def _metadata(chunk: TextChunk, digest: str, chunking: str) -> dict[str, Any]:
        meta = {
            "source": str(chunk.source),
            "file_name": chunk.source.name,
            "file_hash": digest,
            "chunking": chunking,
            "chunk_index": chunk.index,
            "start_line": chunk.start_line,
            "end_line": chunk.end_line,
            "location": chunk.location,
            "content_hash": chunk.content_hash,
        }
        if chunk.page is not None:
            meta["page"] = chunk.page
        return meta

    def search(self, query: str, top_k: int = 4, mode: str | None = None) -> list[Hit]:
        """The ``top_k`` best chunks for ``query``, best first, ranked by ``mode``
        (default: the store's ``retrieval``).

        Raises:
            EmptyCollectionError: nothing has been ingested into this collection.
            RagError: the query is empty.
            ValueError: an unknown mode.
        """
        mode = _check_mode(mode or self.retrieval)
        table = self._nonempty_table()
        if not query.strip():
            raise RagError("The question is empty. Type a question about your documents.")
        scores = table.scores(self.embedder.embed_query(query))
        if mode == "dense":
            return self._hits(table, table.best(scores, top_k), scores)
        lexical = [table.row_of[i] for i, _ in table.bm25.search(query, FUSION_DEPTH)]
        if mode == "bm25":
            return self._hits(table, lexical[:top_k], scores)
        dense = table.best(scores, FUSION_DEPTH)
        fused = [row for row, _ in reciprocal_rank_fusion([dense, lexical])]
        return self._hits(table, fused[:top_k], scores)

    @staticmethod
    def _hits(table: snapshot.ChunkTable, rows: list[int], scores: Any) -> list[Hit]:
        """The chunks in ``rows``, in that order, each with its cosine similarity."""
        hits = []
        for row in rows:
            meta = table.metadatas[row]
            text, chunk_id = table.texts[row], table.ids[row]
            score = float(scores[row])
            hits.append(
                Hit(text, meta["source"], meta.get("location", ""), score, dict(meta), chunk_id)
            )
        return hits


def _check_mode(mode: str) -> str:
    if mode not in RETRIEVAL_MODES:
        raise ValueError(f"Unknown retrieval mode {mode!r}. Use {', '.join(RETRIEVAL_MODES)}.")
    return mode
