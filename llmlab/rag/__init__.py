"""Document question answering: load files, split, embed, store, retrieve, answer with sources.

The pieces, in the order data flows through them::

    loaders     .txt .md .html .pdf .py  ->  text units (page or line numbers kept)
    splitting   text units               ->  chunks (LangChain text splitters)
    embeddings  chunks                   ->  vectors (all-MiniLM-L6-v2 by default)
    store       vectors + chunks         ->  a Chroma collection, ingested incrementally
    answer      question                 ->  retrieved chunks -> model answer citing [1], [2]

Typical use::

    from llmlab.rag import DocumentStore, QuestionAnswerer
    store = DocumentStore("makerspace", create=True)
    print(store.ingest(["part3/data/docs"]).summary())
    print(QuestionAnswerer(store).ask("Who founded the makerspace?").text)

``llmlab.rag.langchain_adapters`` exposes the same store as a LangChain retriever and
vector store.
"""

from llmlab.rag.answer import DEFAULT_THRESHOLD, DEFAULT_TOP_K, NOT_FOUND, Answer, QuestionAnswerer
from llmlab.rag.embeddings import Embedder, get_embedder
from llmlab.rag.errors import (
    EmbeddingModelMismatchError,
    EmptyCollectionError,
    NoFilesError,
    RagError,
    UnknownCollectionError,
    UnreadableFileError,
)
from llmlab.rag.loaders import SUPPORTED_SUFFIXES, TextUnit, find_files, load_file
from llmlab.rag.splitting import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    TextChunk,
    make_splitter,
    split_units,
)
from llmlab.rag.store import (
    DEFAULT_COLLECTION,
    CollectionInfo,
    DocumentStore,
    Hit,
    IngestReport,
    default_db_dir,
    list_collections,
    remove_collection,
)

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_COLLECTION",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TOP_K",
    "NOT_FOUND",
    "SUPPORTED_SUFFIXES",
    "Answer",
    "CollectionInfo",
    "DocumentStore",
    "EmbeddingModelMismatchError",
    "Embedder",
    "EmptyCollectionError",
    "Hit",
    "IngestReport",
    "NoFilesError",
    "QuestionAnswerer",
    "RagError",
    "TextChunk",
    "TextUnit",
    "UnknownCollectionError",
    "UnreadableFileError",
    "default_db_dir",
    "find_files",
    "get_embedder",
    "list_collections",
    "load_file",
    "make_splitter",
    "remove_collection",
    "split_units",
]
