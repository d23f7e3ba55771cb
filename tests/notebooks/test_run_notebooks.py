"""scripts/run_notebooks.py: executes notebooks in place, or into temp copies with --check,
and leaves a notebook untouched when one of its cells fails."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "run_notebooks", ROOT / "scripts" / "run_notebooks.py"
)
run_notebooks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebooks)


def make_notebook(folder: Path, name: str, *sources: str) -> Path:
    nb = new_notebook(cells=[new_markdown_cell("# demo"), *(new_code_cell(s) for s in sources)])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    path = folder / name
    nbformat.write(nb, path)
    return path


def outputs(path: Path) -> list[str]:
    nb = nbformat.read(path, as_version=4)
    return [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]


@pytest.mark.slow
@pytest.mark.notebook
def test_runs_in_place_with_the_notebook_folder_as_cwd(tmp_path, capsys):
    path = make_notebook(tmp_path, "01_Demo.ipynb", "import os\nprint(os.getcwd())", "print(6 * 7)")
    assert run_notebooks.main(["--folder", str(tmp_path)]) == 0
    assert outputs(path) == [f"{tmp_path}\n", "42\n"]
    assert "ok   01_Demo.ipynb: updated" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.notebook
def test_check_mode_and_failures_leave_files_unchanged(tmp_path, capsys):
    good = make_notebook(tmp_path, "01_Good.ipynb", "print('fine')")
    bad = make_notebook(tmp_path, "02_Bad.ipynb", "print('before')", "1 / 0")
    original = {p: p.read_bytes() for p in (good, bad)}
    assert run_notebooks.main(["--folder", str(tmp_path), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "ok   01_Good.ipynb: ran" in out
    assert "FAIL 02_Bad.ipynb: ZeroDivisionError: division by zero (file left unchanged)" in err
    assert "1 of 2 notebooks failed: 02_Bad.ipynb" in err
    assert {p: p.read_bytes() for p in (good, bad)} == original
    assert run_notebooks.main(["--folder", str(tmp_path), "02_Bad"]) == 1
    assert bad.read_bytes() == original[bad]


def test_unknown_notebook_name_lists_the_available_ones(tmp_path, capsys):
    make_notebook(tmp_path, "01_Demo.ipynb", "print(1)")
    assert run_notebooks.main(["--folder", str(tmp_path), "99_Nope"]) == 2
    err = capsys.readouterr().err
    assert f"No notebook '99_Nope' in {tmp_path}. Available: 01_Demo.ipynb" in err


def test_finds_names_with_or_without_suffix(tmp_path):
    a = make_notebook(tmp_path, "01_A.ipynb", "1")
    b = make_notebook(tmp_path, "02_B.ipynb", "2")
    assert run_notebooks.find_notebooks(tmp_path, []) == [a, b]
    assert run_notebooks.find_notebooks(tmp_path, ["02_B", "01_A.ipynb"]) == [b, a]
