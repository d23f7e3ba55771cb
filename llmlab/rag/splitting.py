"""Cut text units into overlapping chunks that remember where they came from.

Uses LangChain's ``RecursiveCharacterTextSplitter``: it tries paragraph breaks first,
then lines, then words, so chunks end at natural places. Markdown files split at headings
first and Python files at ``class`` / ``def`` first (``from_language``)::

    from llmlab.rag.splitting import split_units
    chunks = split_units(load_file(path), chunk_size=400, chunk_overlap=50)
    chunks[0].location      # 'lines 1-14' or 'page 2'
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.rag.loaders import TextUnit

if TYPE_CHECKING:  # imported when a splitter is made: a search needs none
    from langchain_text_splitters import RecursiveCharacterTextSplitter

DEFAULT_CHUNK_SIZE = 400
DEFAULT_CHUNK_OVERLAP = 50

_LANGUAGES = {".md": "markdown", ".markdown": "markdown", ".py": "python"}  # LangChain's Language


@dataclass
class TextChunk:
    """One piece of a file, ready to embed.

    ``start_line``/``end_line`` are lines of the original file (1-based, inclusive);
    ``page`` is set for PDFs. ``content_hash`` is the sha256 of ``text``.
    """

    text: str
    source: Path
    index: int
    start_line: int
    end_line: int
    page: int | None
    content_hash: str

    @property
    def location(self) -> str:
        """Where to look in the file: ``page 2`` or ``lines 10-24``."""
        if self.page is not None:
            return f"page {self.page}"
        if self.start_line == self.end_line:
            return f"line {self.start_line}"
        return f"lines {self.start_line}-{self.end_line}"


def make_splitter(
    suffix: str = ".txt",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> RecursiveCharacterTextSplitter:
    """The splitter for a file type: markdown- and python-aware, plain text otherwise.

    Raises:
        ValueError: the size is not positive or the overlap is not smaller than it.
    """
    if chunk_size < 1:
        raise ValueError(f"Chunk size must be at least 1 character, not {chunk_size}.")
    if not 0 <= chunk_overlap < chunk_size:
        raise ValueError(
            f"Chunk overlap ({chunk_overlap}) must be between 0 and the chunk size ({chunk_size})."
        )
    from langchain_text_splitters import Language, RecursiveCharacterTextSplitter

    options = {"chunk_size": chunk_size, "chunk_overlap": chunk_overlap, "add_start_index": True}
    language = _LANGUAGES.get(suffix.lower())
    if language is not None:
        return RecursiveCharacterTextSplitter.from_language(Language(language), **options)
    return RecursiveCharacterTextSplitter(**options)


def split_units(
    units: list[TextUnit],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> list[TextChunk]:
    """Split the units of one file into numbered chunks with line ranges and hashes."""
    chunks: list[TextChunk] = []
    for unit in units:
        splitter = make_splitter(unit.source.suffix, chunk_size, chunk_overlap)
        line_starts = [0] + [i + 1 for i, ch in enumerate(unit.text) if ch == "\n"]
        for doc in splitter.create_documents([unit.text]):
            start = doc.metadata["start_index"]
            # start_index is -1 only if the splitter could not find the chunk (not expected).
            start = max(start, 0)
            end = start + max(len(doc.page_content) - 1, 0)
            first = unit.source_line(bisect.bisect_right(line_starts, start) - 1)
            last = unit.source_line(bisect.bisect_right(line_starts, end) - 1)
            chunks.append(
                TextChunk(
                    text=doc.page_content,
                    source=unit.source,
                    index=len(chunks),
                    start_line=first,
                    end_line=last,
                    page=unit.page,
                    content_hash=hashlib.sha256(doc.page_content.encode()).hexdigest(),
                )
            )
    return chunks
