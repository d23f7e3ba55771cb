"""Read a learner's files into plain text, keeping where each line came from.

Supported: ``.txt``, ``.md``, ``.py`` (read as text), ``.html`` / ``.htm`` (visible text,
via BeautifulSoup) and ``.pdf`` (one unit per page, via pypdf)::

    from llmlab.rag.loaders import find_files, load_file
    for path in find_files(["part3/data/docs"]):
        for unit in load_file(path):
            unit.page, unit.text[:60]

A file that cannot be read raises :class:`~llmlab.rag.errors.UnreadableFileError`, so a
caller can report it and carry on with the other files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmlab.rag.errors import NoFilesError, UnreadableFileError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".py", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
SUPPORTED_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES


@dataclass
class TextUnit:
    """Text from one file (or one PDF page).

    ``line_numbers[i]`` is the line of the original file that line ``i`` of ``text`` came
    from (1-based), so chunks can point back into the file even after HTML is stripped.
    """

    text: str
    source: Path
    page: int | None = None
    line_numbers: list[int] = field(default_factory=list)

    def source_line(self, text_line: int) -> int:
        """Original file line of 0-based ``text_line`` of :attr:`text`."""
        if not self.line_numbers:
            return text_line + 1
        return self.line_numbers[min(text_line, len(self.line_numbers) - 1)]


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes: unchanged files are recognised by it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """Expand files and folders (recursively) into supported files, absolute and sorted.

    Hidden files and folders (``.git``, ``.venv`` ...) are skipped inside folders.

    Raises:
        NoFilesError: a path is empty, does not exist, or a folder holds no supported file.
    """
    found: set[Path] = set()
    for raw in paths:
        if not str(raw).strip():
            raise NoFilesError("An empty path was given. Name a file or a folder to ingest.")
        path = Path(raw).expanduser()
        if not path.exists():
            raise NoFilesError(f"{raw} does not exist. Check the path and try again.")
        if path.is_file():
            if path.suffix.lower() not in SUPPORTED_SUFFIXES:
                raise NoFilesError(f"{raw} is not a supported file type. {_supported_hint()}")
            found.add(path.resolve())
            continue
        inside = [
            p.resolve()
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not inside:
            raise NoFilesError(f"{raw} holds no supported files. {_supported_hint()}")
        found.update(inside)
    return sorted(found)


def _supported_hint() -> str:
    return "Supported: " + ", ".join(sorted(SUPPORTED_SUFFIXES)) + "."


def load_file(path: Path) -> list[TextUnit]:
    """Read ``path`` into text units (one per PDF page, else one).

    Raises:
        UnreadableFileError: the file cannot be decoded or parsed.
    """
    suffix = path.suffix.lower()
    try:
        if suffix in PDF_SUFFIXES:
            return _load_pdf(path)
        if suffix in HTML_SUFFIXES:
            return [_load_html(path)]
        if suffix in TEXT_SUFFIXES:
            return [TextUnit(_read_text(path), path)]
    except UnreadableFileError:
        raise
    except Exception as exc:  # parsers raise many kinds of errors on broken files
        raise UnreadableFileError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc
    raise UnreadableFileError(f"{path}: unsupported file type. {_supported_hint()}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise UnreadableFileError(f"{path}: looks like a binary file, not text.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnreadableFileError(
            f"{path}: is not UTF-8 text ({exc.reason}). Save it as UTF-8."
        ) from exc


def _load_pdf(path: Path) -> list[TextUnit]:
    from pypdf import PdfReader

    reader = PdfReader(path, strict=False)
    units = []
    for number, page in enumerate(reader.pages, start=1):
        text = page.extract_text() or ""
        if text.strip():
            units.append(TextUnit(text, path, page=number))
    if not units and len(reader.pages):
        raise UnreadableFileError(
            f"{path}: has no extractable text (a scanned PDF needs OCR first)."
        )
    return units


_BLOCKS = {
    "title",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "p",
    "li",
    "tr",
    "dt",
    "dd",
    "pre",
    "blockquote",
    "caption",
    "figcaption",
    "div",
    "section",
    "article",
    "td",
    "th",
}


def _load_html(path: Path) -> TextUnit:
    """Visible text, one line per block (paragraph, heading, list item, table row)."""
    from bs4 import BeautifulSoup
    from bs4.element import PreformattedString

    soup = BeautifulSoup(_read_text(path), "html.parser")
    for tag in soup(["script", "style", "noscript", "template"]):
        tag.decompose()
    blocks: dict[int, tuple[int, list[str]]] = {}
    for string in soup.find_all(string=True):
        if isinstance(string, PreformattedString) or not string.strip():
            continue  # comments, the doctype, whitespace between tags
        # A table cell belongs to its row, so a row reads as one line: "a | b | c".
        block = next((t for t in string.parents if t.name in _BLOCKS - {"td", "th"}), string.parent)
        line, pieces = blocks.setdefault(id(block), (getattr(block, "sourceline", None) or 1, []))
        in_cell = string.find_parent(["td", "th"]) is not None
        pieces.append((" | " if in_cell and pieces else " ") + " ".join(string.split()))
    ordered = sorted(blocks.values(), key=lambda item: item[0])
    return TextUnit(
        "\n".join("".join(pieces).strip(" |") for _, pieces in ordered),
        path,
        line_numbers=[line for line, _ in ordered],
    )
