"""Use the lab's store from LangChain: a retriever, an Embeddings adapter, and a Chroma vector store.

Both views read the same Chroma collection that ``document_qa.py ingest`` wrote::

    from llmlab.rag import DocumentStore
    from llmlab.rag.langchain_adapters import LabRetriever, as_langchain_vectorstore
    store = DocumentStore("makerspace")
    docs = LabRetriever(store=store, k=3).invoke("How much is a day pass?")
    vectorstore = as_langchain_vectorstore(store)          # langchain_chroma.Chroma
    vectorstore.similarity_search_with_relevance_scores("day pass", k=3)
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from llmlab.rag.embeddings import Embedder
from llmlab.rag.store import DocumentStore


class LabEmbeddings(Embeddings):
    """LangChain ``Embeddings`` backed by a lab :class:`Embedder` (same model, same vectors)."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """Vectors for many texts."""
        return self.embedder.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        """Vector for one query."""
        return self.embedder.embed_query(text)


class LabRetriever(BaseRetriever):
    """A LangChain retriever over a :class:`DocumentStore`; the score is in ``metadata["score"]``."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    store: DocumentStore
    k: int = 4
    threshold: float = 0.0

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        return [
            Document(hit.text, metadata={**hit.metadata, "score": hit.score})
            for hit in self.store.search(query, self.k)
            if hit.score >= self.threshold
        ]


def as_langchain_vectorstore(store: DocumentStore) -> Any:
    """A ``langchain_chroma.Chroma`` over the store's own collection and embedding model."""
    from langchain_chroma import Chroma

    return Chroma(
        client=store.client,
        collection_name=store.name,
        embedding_function=LabEmbeddings(store.embedder),
    )
