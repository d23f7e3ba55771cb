"""Errors of document question answering; each message says what to do next."""

from __future__ import annotations


class RagError(Exception):
    """A document QA problem the user can fix (bad path, unknown collection, ...)."""


class UnreadableFileError(RagError):
    """One file could not be read or parsed; ingestion reports it and goes on."""


class NoFilesError(RagError):
    """A path given to ingest is missing, empty, or holds no supported files."""


class UnknownCollectionError(RagError):
    """The collection does not exist in this store."""


class EmptyCollectionError(RagError):
    """The collection exists but holds no chunks, so there is nothing to search."""


class EmbeddingModelMismatchError(RagError):
    """A collection built with one embedding model was used with another."""
