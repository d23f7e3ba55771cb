"""python scripts/bench.py [--suite NAME ...] [--quick] [--out DIR]

Run the lab's benchmark suites (``llmlab/benchmarks/*.py``) in one process, print one
table and write it to ``bench-results/bench.json`` and ``bench-results/bench.md`` so the
notebooks can show this machine's own figures. ``make bench`` runs it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import platform
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

import llmlab.benchmarks
from llmlab.bench import Row
from llmlab.hardware import cpu_cores, human_bytes, memory_info

REPO = Path(__file__).resolve().parent.parent

EPILOG = """examples:
  python scripts/bench.py                  # every suite, full sizes
  python scripts/bench.py --suite chat     # one suite
  python scripts/bench.py --quick          # tiny sizes: checks the suites run
"""


def available_suites() -> list[str]:
    """Names of the modules in llmlab/benchmarks."""
    return sorted(m.name for m in pkgutil.iter_modules(llmlab.benchmarks.__path__))


def run_suites(names: list[str], quick: bool, console: Console) -> tuple[list[Row], list[str]]:
    """Run each suite; a suite that fails is reported and the others still run."""
    rows: list[Row] = []
    failures: list[str] = []
    for name in names:
        console.print(f"[bold]== {name}[/bold]")
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"llmlab.benchmarks.{name}")
            rows.extend(module.run(quick=quick))
        except Exception:  # one broken suite must not hide the others' figures
            failures.append(name)
            console.print(f"[red]suite {name} failed:[/red]\n{traceback.format_exc()}")
        console.print(f"   {time.perf_counter() - started:.1f} s")
    return rows, failures


def render(rows: list[Row]) -> Table:
    """A rich table of the rows, ratios beside their baselines."""
    table = Table(title="Local LLM Lab benchmarks (this machine, one run)")
    for column in ("suite", "case", "metric", "value", "unit", "vs", "ratio", "note"):
        table.add_column(column, justify="right" if column in ("value", "ratio") else "left")
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        table.add_row(
            r.suite, r.case, r.metric, f"{r.value:,.2f}", r.unit, r.baseline or "", ratio, r.note
        )
    return table


def machine() -> dict:
    """What the figures were measured on."""
    mem = memory_info()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cores": cpu_cores(),
        "ram": human_bytes(mem.total_ram),
        "gpu": mem.gpu_name,
    }


def write_results(rows: list[Row], out: Path, quick: bool) -> None:
    """bench.json (for notebooks) and bench.md (for people)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine(),
        "quick": quick,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rows": [r.to_dict() for r in rows],
    }
    (out / "bench.json").write_text(json.dumps(payload, indent=2))
    lines = [
        "| suite | case | metric | value | unit | vs | ratio |",
        "|---|---|---|---:|---|---|---:|",
    ]
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        lines.append(
            f"| {r.suite} | {r.case} | {r.metric} | {r.value:,.2f} | {r.unit} | {r.baseline or ''} | {ratio} |"
        )
    (out / "bench.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[2],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--suite", action="append", help="run only this suite (repeatable)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the suites run")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results", help="output folder")
    args = parser.parse_args(argv)
    console = Console()
    suites = available_suites()
    names = args.suite or suites
    unknown = sorted(set(names) - set(suites))
    if unknown:
        console.print(
            f"Unknown suite(s): {', '.join(unknown)}. Available: {', '.join(suites) or 'none'}"
        )
        return 2
    rows, failures = run_suites(names, args.quick, console)
    console.print(render(rows))
    write_results(rows, args.out, args.quick)
    console.print(f"Written to {args.out}/bench.json and bench.md")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
