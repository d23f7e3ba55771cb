"""python scripts/check_env.py [--skip-generation] [--json]

The environment doctor: checks Python, the pinned packages, CPU features, memory, disk,
GPU, llama.cpp, bitsandbytes, the default model and a first real generation (after a 32+
token prompt, in a child process, so a llama.cpp build that crashes on this CPU becomes a
``[FAIL]`` line naming the signal and the rebuild command instead of killing the doctor). Prints one
``[OK]`` / ``[WARN]`` / ``[FAIL]`` line per check, each problem followed by the fix to run.
Exits 1 if any check failed, 0 otherwise (warnings do not fail).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.text import Text

from llmlab import envcheck

STYLES = {envcheck.OK: "green", envcheck.WARN: "yellow", envcheck.FAIL: "bold red"}
EPILOG = """examples:
  python scripts/check_env.py                    all checks, with a 16-token generation
  python scripts/check_env.py --skip-generation  faster: do not load the model
  python scripts/check_env.py --json > env.json  machine-readable list of checks
  LLMLAB_DEFAULT_MODEL=gemma3-270m python scripts/check_env.py --model gemma3-270m
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Check that this machine is ready for Local LLM Lab.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--skip-generation", action="store_true", help="do not load the model and generate"
    )
    parser.add_argument(
        "--json", action="store_true", help="print a JSON list of checks instead of lines"
    )
    parser.add_argument(
        "--model", default=None, help="model to check (default: LLMLAB_DEFAULT_MODEL)"
    )
    parser.add_argument(
        "--requirements",
        type=Path,
        default=envcheck.REQUIREMENTS,
        help="pins to compare installed packages with (default: %(default)s)",
    )
    return parser


def print_check(console: Console, check: envcheck.Check) -> None:
    """One line per check; WARN and FAIL get an indented ``fix:`` line."""
    line = Text()
    line.append(f"[{check.status}]", style=STYLES[check.status])
    line.append(" " * (7 - len(check.status)) + f"{check.name:<13} {check.detail}")
    console.print(line, soft_wrap=True)
    if check.status != envcheck.OK and check.fix:
        console.print(Text(f"         fix: {check.fix}", style="cyan"), soft_wrap=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = {
        "generation": not args.skip_generation,
        "model": args.model,
        "requirements": args.requirements,
    }
    if args.json:
        checks = envcheck.run_checks(**options)
        print(json.dumps([c.to_dict() for c in checks], indent=2))
        return envcheck.exit_code(checks)
    console = Console(highlight=False)
    checks = []
    for check in envcheck.iter_checks(**options):  # print each line as soon as it is known
        print_check(console, check)
        checks.append(check)
    counts = {s: sum(c.status == s for c in checks) for s in STYLES}
    console.print(
        f"{counts['OK']} OK, {counts['WARN']} WARN, {counts['FAIL']} FAIL", soft_wrap=True
    )
    if counts["FAIL"]:
        console.print(
            "Run the fix under each FAIL line, then run this check again.", soft_wrap=True
        )
    return envcheck.exit_code(checks)


if __name__ == "__main__":
    raise SystemExit(main())
