"""Small helpers the notebook builders in this folder share: markdown and code cells
from indented strings, and writing a notebook with the lab's kernel and CI parameters.

The committed ``.ipynb`` files are the source of truth; these builders only create a
notebook's first version, which ``python scripts/run_notebooks.py NAME`` then executes
in place so it is committed with outputs.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (llmlab)", "language": "python"}


def md(text: str) -> nbformat.NotebookNode:
    """A markdown cell from an indented triple-quoted string."""
    return new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str, *tags: str) -> nbformat.NotebookNode:
    """A code cell from an indented triple-quoted string, with optional cell tags."""
    cell = new_code_cell(textwrap.dedent(text).strip())
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def write(name: str, cells: list, ci_parameters: dict) -> Path:
    """Write ``notebooks/<name>`` (unexecuted) with ``ci_parameters`` in its metadata."""
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = KERNELSPEC
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["llmlab"] = {"ci_parameters": ci_parameters}
    path = NOTEBOOKS / name
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return path
