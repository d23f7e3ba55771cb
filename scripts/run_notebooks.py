"""python scripts/run_notebooks.py [NAME ...] [--check]

Re-executes the course notebooks so they are committed with the outputs of a real run
(``make notebooks``). With no names, every ``notebooks/*.ipynb`` in order. Each notebook
runs with its own folder as the working directory. A notebook whose run fails is left
untouched and the error is printed; the exit code is 1 if any failed.

``--check`` executes each notebook into a temporary copy instead, leaving the
committed files as they are (a quick "do they all still run?").
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from tqdm import tqdm

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
EPILOG = """examples:
  python scripts/run_notebooks.py                           every notebook, in place
  python scripts/run_notebooks.py 02_Tokens_and_Generation  one notebook (.ipynb optional)
  python scripts/run_notebooks.py --check                   run all into temp copies only
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Execute the course notebooks and save their outputs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all in notebooks/)")
    parser.add_argument(
        "--check", action="store_true", help="execute into temp copies; change nothing"
    )
    parser.add_argument(
        "--timeout", type=int, default=600, help="seconds per cell (default: %(default)s)"
    )
    parser.add_argument(
        "--kernel", default="python3", help="Jupyter kernel name (default: %(default)s)"
    )
    parser.add_argument(
        "--folder", type=Path, default=NOTEBOOKS, help="notebook folder (default: %(default)s)"
    )
    return parser


def find_notebooks(folder: Path, names: list[str]) -> list[Path]:
    """The notebooks named (with or without ``.ipynb``), or all of them in order.

    Raises:
        FileNotFoundError: a named notebook is not in ``folder``; the message lists those that are.
    """
    available = sorted(folder.glob("*.ipynb"))
    if not names:
        return available
    chosen = []
    for name in names:
        path = folder / Path(name).name
        path = path if path.suffix == ".ipynb" else path.with_name(path.name + ".ipynb")
        if not path.exists():
            listed = ", ".join(p.name for p in available) or "none"
            raise FileNotFoundError(f"No notebook {name!r} in {folder}. Available: {listed}")
        chosen.append(path)
    return chosen


def execute(path: Path, out: Path, kernel: str, timeout: int, bar: tqdm) -> None:
    """Run every cell of ``path`` with its folder as cwd and write the result to ``out``.

    ``out`` is written only when every cell succeeded.
    """
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,  # no timestamps in the committed files: smaller, stable diffs
    )
    bar.reset(total=sum(c.cell_type == "code" and bool(c.source.strip()) for c in nb.cells))
    bar.set_description(path.stem)
    client.on_cell_executed = lambda **_: bar.update(1)  # called for each code cell run
    client.execute()
    nbformat.write(nb, out)


def first_error_line(exc: Exception) -> str:
    """The exception line of a failed cell (nbclient's message holds the whole traceback)."""
    if isinstance(exc, CellExecutionError) and exc.ename:
        return f"{exc.ename}: {exc.evalue}"
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = find_notebooks(args.folder, args.names)
    except FileNotFoundError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not paths:
        print(f"No notebooks in {args.folder}.", file=sys.stderr)
        return 2
    failed = []
    with tempfile.TemporaryDirectory() as tmp, tqdm(total=0, unit="cell", file=sys.stderr) as bar:
        for path in paths:
            out = Path(tmp) / path.name if args.check else path
            start = time.perf_counter()
            try:
                execute(path, out, args.kernel, args.timeout, bar)
            except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
                failed.append(path.name)
                bar.write(
                    f"FAIL {path.name}: {first_error_line(exc)} (file left unchanged)",
                    file=sys.stderr,
                )
                continue
            verb = "ran" if args.check else "updated"
            bar.write(f"ok   {path.name}: {verb} in {time.perf_counter() - start:.0f} s")
    if failed:
        print(
            f"{len(failed)} of {len(paths)} notebooks failed: {', '.join(failed)}", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
