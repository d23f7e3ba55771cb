"""Loaders and splitting: every file type reads, locations point back into the file, bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab.rag import (
    NoFilesError,
    UnreadableFileError,
    find_files,
    load_file,
    make_splitter,
    split_units,
)
from llmlab.rag.evaluate import SAMPLE_DOCS, load_questions

SAMPLE_PDF = SAMPLE_DOCS / "annual_report_2024.pdf"


def test_find_files_expands_folders_and_skips_hidden_and_unsupported(tmp_path):
    (tmp_path / "a.md").write_text("# A")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "c.txt").write_text("hidden")
    assert [p.name for p in find_files([tmp_path])] == ["a.md", "b.txt"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: "", "empty path"),
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: tmp, "holds no supported files"),
        (
            lambda tmp: (tmp / "x.png").write_bytes(b"png") and tmp / "x.png",
            "not a supported file type",
        ),
    ],
)
def test_find_files_errors_say_what_is_wrong(tmp_path, make, message):
    with pytest.raises(NoFilesError, match=message):
        find_files([make(tmp_path)])


def test_pdf_is_read_page_by_page():
    units = load_file(SAMPLE_PDF)
    assert [u.page for u in units] == [1, 2]
    assert "Priya Raman" in units[0].text and "solar panels" in units[1].text


def test_html_keeps_visible_text_rows_together_and_source_lines():
    path = SAMPLE_DOCS / "equipment.html"
    (unit,) = load_file(path)
    assert "console.log" not in unit.text and "border-collapse" not in unit.text
    row = next(line for line in unit.text.splitlines() if line.startswith("Laser cutter"))
    assert row.endswith("| 0.50 euros per minute of cutting")
    source_lines = path.read_text().splitlines()
    index = unit.text.splitlines().index(row)
    assert "Laser cutter" in source_lines[unit.source_line(index) - 1]


def test_corrupt_pdf_and_binary_text_are_unreadable(tmp_path):
    bad_pdf = tmp_path / "broken.pdf"
    bad_pdf.write_bytes(b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(UnreadableFileError, match="broken.pdf"):
        load_file(bad_pdf)
    binary = tmp_path / "data.txt"
    binary.write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(UnreadableFileError, match="binary"):
        load_file(binary)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(UnreadableFileError, match="UTF-8"):
        load_file(latin)


def test_chunks_have_line_ranges_that_match_the_file():
    path = SAMPLE_DOCS / "safety_rules.txt"
    lines = path.read_text().splitlines()
    chunks = split_units(load_file(path), chunk_size=300, chunk_overlap=40)
    assert len(chunks) > 3
    for chunk in chunks:
        expected = f"lines {chunk.start_line}-{chunk.end_line}"
        assert chunk.location == (
            expected if chunk.end_line > chunk.start_line else f"line {chunk.start_line}"
        )
        assert chunk.text.splitlines()[0].strip() in lines[chunk.start_line - 1]
        assert chunk.text.splitlines()[-1].strip() in lines[chunk.end_line - 1]
        assert len(chunk.text) <= 300
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert len({c.content_hash for c in chunks}) == len(chunks)


def test_pdf_chunks_point_at_pages():
    chunks = split_units(load_file(SAMPLE_PDF), chunk_size=300, chunk_overlap=0)
    assert {c.location for c in chunks} == {"page 1", "page 2"}


def test_markdown_and_python_split_at_their_own_boundaries():
    md = split_units(load_file(SAMPLE_DOCS / "membership.md"), chunk_size=400, chunk_overlap=0)
    assert sum(c.text.startswith("## ") for c in md) >= 2
    py = split_units(load_file(SAMPLE_DOCS / "booking_rules.py"), chunk_size=400, chunk_overlap=0)
    assert any(c.text.startswith("def blocked_until") for c in py)


def test_splitter_rejects_bad_sizes():
    with pytest.raises(ValueError, match="overlap"):
        make_splitter(".txt", chunk_size=100, chunk_overlap=100)
    with pytest.raises(ValueError, match="at least 1"):
        make_splitter(".txt", chunk_size=0, chunk_overlap=0)


def test_sample_questions_point_at_files_that_exist():
    questions = load_questions()
    names = {p.name for p in find_files([SAMPLE_DOCS])}
    assert sum(q.answerable for q in questions) >= 20
    assert any(not q.answerable for q in questions)
    for q in questions:
        assert set(q.sources) <= names, q.question
    assert names == {Path(s).name for q in questions for s in q.sources}
