"""Every notebook in notebooks/ runs headless once, with the small parameters it declares in
``metadata.llmlab.ci_parameters`` (injected by papermill), under nbval (outputs compared
only in cells marked ``# NBVAL_CHECK_OUTPUT``). Notebooks added later are picked
up automatically. Each test also checks that the notebook wrote nothing into the repo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(p for p in NOTEBOOK_DIR.glob("*.ipynb") if not p.name.startswith("."))
KERNEL = "python3"
SANITIZE = Path(__file__).with_name("nbval_sanitize.cfg")  # install paths in recorded outputs
ids = [p.stem for p in NOTEBOOKS]


def ci_parameters(nb: nbformat.NotebookNode) -> dict:
    """The CI-sized parameters a notebook declares for itself (may be empty)."""
    return dict(nb.metadata.get("llmlab", {}).get("ci_parameters", {}))


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode | None:
    return next(
        (c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])), None
    )


def snapshot(folder: Path) -> dict[str, int]:
    """Files under ``folder`` with their modification times, to spot anything a run wrote.
    Notebooks and READMEs are left out: authors add and edit them, running them does not."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and p.suffix not in {".ipynb", ".md"}
    }


def written(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Files that appeared or changed between two snapshots."""
    return sorted(name for name, mtime in after.items() if before.get(name) != mtime)


def _uses_this_python(argv0: str) -> bool:
    found = shutil.which(argv0) or argv0
    return Path(found).absolute().parent == Path(sys.executable).absolute().parent


@pytest.fixture(scope="session")
def kernel_env(tmp_path_factory) -> dict[str, str]:
    """Environment in which the ``python3`` kernel is this interpreter.

    ``make setup`` installs that kernelspec into the venv, but a user-level ``python3``
    kernelspec (from another Python) would win; then a spec pointing at this interpreter
    is put first on JUPYTER_PATH for the test run.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv0 = KernelSpecManager().get_kernel_spec(KERNEL).argv[0]
    except NoSuchKernel:
        argv0 = ""
    if argv0 and _uses_this_python(argv0):
        return {}
    data_dir = tmp_path_factory.mktemp("jupyter")
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--prefix", str(data_dir), "--name", KERNEL],
        check=True,
        capture_output=True,
    )
    jupyter_path = os.pathsep.join(
        filter(None, [str(data_dir / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")])
    )
    return {"JUPYTER_PATH": jupyter_path}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_follows_the_course_conventions(path):
    nb = nbformat.read(path, as_version=4)
    assert re.match(r"^\d\d_\w+\.ipynb$", path.name), (
        f"{path.name}: name must look like NN_Title.ipynb"
    )
    cell = parameters_cell(nb)
    assert cell is not None, f"{path.name}: no cell tagged 'parameters' (papermill needs one)"
    assigned = set(re.findall(r"^(\w+)\s*=", cell.source, flags=re.M))
    unknown = set(ci_parameters(nb)) - assigned
    assert not unknown, (
        f"{path.name}: ci_parameters {sorted(unknown)} are not set in the parameters cell"
    )
    unrun = [
        i
        for i, c in enumerate(nb.cells)
        if c.cell_type == "code" and c.source.strip() and not c.execution_count
    ]
    assert not unrun, (
        f"{path.name}: cells {unrun} have no outputs; run: python scripts/run_notebooks.py {path.name}"
    )


def ci_sized_copy(path: Path) -> Path:
    """A copy of the notebook with its CI parameters injected after the parameters cell
    (papermill's own injection, so learners can run the same sizes with papermill).

    The copy sits next to the original, so relative paths in the lesson resolve as they do
    for a learner; its name starts with a dot and it is removed after the run."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = load_notebook_node(str(path))  # papermill's reader fills in the metadata it expects
    params = ci_parameters(nb)
    if params:
        nb = parameterize_notebook(nb, params, kernel_name=KERNEL, language="python")
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert injected and all(f"{k} = " in injected[0].source for k in params)
    copy = path.with_name(f".ci-{path.name}")
    nbformat.write(nb, copy)
    return copy


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_at_ci_size_and_checked_cells_match(path, kernel_env):
    """One execution per notebook: at its CI parameters, under nbval, which fails on any
    error and compares the cells marked ``# NBVAL_CHECK_OUTPUT`` with the committed outputs
    (so those cells must not depend on the parameters)."""
    before = snapshot(NOTEBOOK_DIR)
    copy = ci_sized_copy(path)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--nbval-lax",
                "--nbval-sanitize-with",
                str(SANITIZE),
                "--nbval-cell-timeout",
                "600",
                "-p",
                "no:cacheprovider",
                "-q",
                str(copy),
            ],  # fmt: skip
            cwd=ROOT,
            env={**os.environ, **kernel_env},
            capture_output=True,
            text=True,
            timeout=1200,
        )
    finally:
        copy.unlink(missing_ok=True)
    assert proc.returncode == 0, f"nbval failed on {path.name}:\n{proc.stdout}\n{proc.stderr}"
    stray = written(before, snapshot(NOTEBOOK_DIR))
    assert not stray, f"{path.name} wrote into notebooks/: {stray}"


def test_kernel_check_tells_this_interpreter_from_another(tmp_path):
    assert _uses_this_python(sys.executable)
    other = tmp_path / "elsewhere" / "bin" / "python3"
    assert not _uses_this_python(str(other))
