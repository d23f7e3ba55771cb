"""python part3/batch_process.py INPUT -o OUTPUT [--parallel 8] [--max-tokens 128] [--resume]

Run every prompt in a file through a local model and write one JSON line per prompt.
Prompts are decoded several at a time by the batched engine (``llmlab.engine``), rows are
written as they finish, and ``--resume`` continues a run that was stopped or killed
without losing or repeating a row. The reading, scheduling, resuming and writing live in
``llmlab.batch``; this script wires them to the command line. ``--ray [ADDRESS]`` runs the
rows on engines held by Ray actors instead (``llmlab.batch_ray``), with the same output.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from llmlab import batch, registry
from llmlab.backends.base import BackendError, GenerationParams

EPILOG = """\
examples:
  python part3/batch_process.py prompts.txt -o answers.jsonl
  python part3/batch_process.py questions.csv --column question -o answers.jsonl --parallel 8
  python part3/batch_process.py tasks.jsonl -o out.jsonl --system "Answer in one sentence." \\
      --template "Summarise: {prompt}" --max-tokens 64 --temperature 0
  python part3/batch_process.py tasks.jsonl -o out.jsonl --resume     # continue after a kill
  python part3/batch_process.py tasks.jsonl -o out.jsonl --engine sequential  # one at a time
  python part3/batch_process.py tasks.jsonl -o out.jsonl --exact-model  # the file as given
  python part3/batch_process.py tasks.jsonl -o out.jsonl --ray        # engines on a local Ray
  python part3/batch_process.py tasks.jsonl -o out.jsonl --ray auto   # the Ray cluster of this machine

input formats:
  .jsonl  one JSON object a line: {"id": "q1", "prompt": "..."} or {"id": 7, "messages": [...]}
  .csv    a header row with a "prompt" column (or the one named by --column); an "id" column is used if present
  .txt    one prompt a line (blank lines are skipped)
  Rows without an id get their line number (data-row number for CSV).
  Files are read as UTF-8; --encoding cp1252 (or another name) reads a file saved otherwise.

output: one JSON line per input row, in the order rows finish:
  {"id", "prompt", "output", "finish_reason", "usage", "seconds"} plus "error" where the row failed.
  A row that failed (e.g. a prompt too long for --n-ctx) is listed on stderr and written with
  its "error"; the run goes on.
resume: rows with a readable result in OUTPUT are skipped; a damaged line in it (a torn write,
  a bad edit) is reported with its line number and moved to OUTPUT.damaged, and its row runs again.
ray: --ray starts a local Ray for the run (every core, 127.0.0.1 only, no dashboard) or joins
  the cluster at ADDRESS; each Ray actor holds one engine (--parallel slots, LLMLAB_THREADS
  cores) and results are written as they come back, so --resume works as without Ray. Rows of a
  worker that died are retried once, then written with their "error". Put --ray after INPUT
  (or write --ray=ADDRESS), so INPUT is not taken for the address.
model file: the batched engine runs a version of the model whose format llama.cpp multiplies
  in batches here (for the shipped Q4_1: a Q8_0 made from it once, KL 0.005 nats/token), when
  its KL divergence from the requested file on held-out text is at most 0.02; one line says
  which. --exact-model (or LLMLAB_EXACT_MODEL=1) runs the file exactly as given.
exit status: 0 all rows done, 1 some rows failed (see their "error"), 2 usage or input problem,
130 interrupted (rerun with --resume).
"""


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="batch_process.py",
        description="Run a file of prompts through a local model, many at a time, with resume.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", type=Path, help="prompts: .jsonl, .csv or .txt")
    parser.add_argument("-o", "--output", type=Path, required=True, help="results file (.jsonl)")
    parser.add_argument(
        "--model", default=None, help="model name from the catalog (default: the lab's default)"
    )
    parser.add_argument(
        "--parallel", type=int, default=8, help="sequences decoded together (default: 8)"
    )
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="most new tokens per row (default: 128)"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy, repeatable (default: 0)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed for temperature > 0")
    parser.add_argument("--system", default=None, help="system message added to every row")
    parser.add_argument(
        "--template",
        default=None,
        help='prompt pattern over the row\'s fields, e.g. "Translate to French: {prompt}"',
    )
    parser.add_argument(
        "--column", default="prompt", help="CSV column (or JSONL field) holding the prompt"
    )
    parser.add_argument(
        "--encoding",
        default="utf-8",
        help="text encoding of INPUT, e.g. cp1252 for a Windows/Latin-1 file (default: utf-8)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="skip rows whose id is already in OUTPUT"
    )
    parser.add_argument("--overwrite", action="store_true", help="start OUTPUT afresh if it exists")
    parser.add_argument(
        "--engine",
        choices=["batched", "sequential"],
        default="batched",
        help="batched: the continuous-batching engine; sequential: one row at a time "
        "through the backend (default: batched)",
    )
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: a local Ray for the run, or the cluster at ADDRESS "
        "(auto, HOST:PORT or ray://HOST:10001)",
    )
    parser.add_argument(
        "--ray-actors",
        type=int,
        default=None,
        metavar="N",
        help="engines on Ray (default: as many as the cluster's CPUs hold at LLMLAB_THREADS each)",
    )
    parser.add_argument(
        "--exact-model",
        action="store_true",
        default=None,
        help="run the model's file exactly as given; by default a batch-friendly version of it "
        "runs when it is nearly the same model (see README; also LLMLAB_EXACT_MODEL=1)",
    )
    parser.add_argument(
        "--n-ctx",
        "--ctx",
        dest="n_ctx",
        metavar="N",
        type=int,
        default=None,
        help="context window per sequence (default: LLMLAB_N_CTX)",
    )
    return parser


class Reporter:
    """A rich progress bar with rows/s and tokens/s on a terminal; a line every few seconds otherwise."""

    def __init__(self, total: int, console: Console):
        self.total, self.console = total, console
        self.rows = self.errors = self.tokens = 0
        self.start = self._last_line = time.perf_counter()
        self.progress = None
        # A real terminal only: a notebook or a pipe gets plain lines instead of a bar.
        if console.is_terminal and sys.stdout.isatty():
            self.progress = Progress(
                TextColumn("[bold]rows"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                console=console,
            )
            self.task = self.progress.add_task("rows", total=total, rate="")
            self.progress.start()

    def rates(self) -> tuple[float, float]:
        """Rows per second and completion tokens per second so far."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return self.rows / elapsed, self.tokens / elapsed

    def update(self, record: dict) -> None:
        """Count one written row."""
        self.rows += 1
        self.errors += "error" in record
        self.tokens += record["usage"]["completion_tokens"]
        rows_s, tok_s = self.rates()
        if self.progress is not None:
            self.progress.update(
                self.task, advance=1, rate=f"{rows_s:.2f} rows/s  {tok_s:.1f} tok/s"
            )
        elif time.perf_counter() - self._last_line >= 5 or self.rows == self.total:
            self._last_line = time.perf_counter()
            print(
                f"{self.rows}/{self.total} rows  {rows_s:.2f} rows/s  {tok_s:.1f} tok/s", flush=True
            )

    def stop(self) -> None:
        """Remove the bar."""
        if self.progress is not None:
            self.progress.stop()


def _model(name: str | None) -> registry.ModelSpec:
    """The catalog entry to run, its file checked (sha256, and that it is a GGUF file)."""
    spec = registry.resolve(name)
    if spec.format == "gguf" and spec.path.is_file():
        registry.read_gguf_info(spec.path)  # junk under a model's name: say so before llama.cpp
    return spec


def _outcomes(
    args: argparse.Namespace, rows: list[batch.InputRow], params: GenerationParams, resources: list
) -> Iterator[batch.Outcome]:
    if args.ray is not None:
        from llmlab import batch_ray  # only here: a run without --ray never imports ray

        runner = batch_ray.RayRunner(
            args.ray or None,
            model=args.model,
            parallel=args.parallel,
            n_ctx=args.n_ctx,
            actors=args.ray_actors,
        )
        resources.append(runner)
        return runner.run(rows, params, args.system, args.template)
    spec = _model(args.model)
    if args.engine == "sequential":
        from llmlab import backends

        model = backends.load(spec, n_ctx=args.n_ctx)
        resources.append(model)
        model.count_tokens("hello")  # backends load lazily: a bad file shows up now, not per row
        return batch.run_sequential(model.chat, rows, params, args.system, args.template)
    from llmlab.engine import Engine
    from llmlab.registry import batch_format

    choice = batch_format.choose(spec, exact=args.exact_model, say=_say)
    if choice.message:
        print(choice.message, flush=True)
    # Deterministic: a row's greedy answer does not depend on the rows decoded beside it.
    engine = Engine(choice.spec, parallel=args.parallel, n_ctx=args.n_ctx, deterministic=True)
    resources.append(engine)
    return batch.run_with_engine(engine, rows, params, args.system, args.template)


def _error(message: str) -> None:
    print(message, file=sys.stderr)


def _say(message: str) -> None:
    print(message, flush=True)


def _check_paths(args: argparse.Namespace) -> str | None:
    """Why INPUT or OUTPUT cannot be used as given (``None`` if they can)."""
    src, out = args.input, args.output
    if src.is_dir():
        return f"error: {src} is a folder. Pass one .jsonl, .csv or .txt file of prompts."
    if not src.is_file():
        return f"error: input file {src} not found. Pass a .jsonl, .csv or .txt file of prompts."
    if out.is_dir():
        return (
            f"error: -o {out} is a folder. Name the results file, e.g. -o {out / 'answers.jsonl'}."
        )
    if out.exists() and out.samefile(src):
        return f"error: -o {out} is the input file. Write the results to another file."
    if not (out.exists() and out.stat().st_size):
        return None
    if not batch.looks_like_output(out):
        return (
            f"error: {out} is not a results file of this program (its lines are not "
            '{"id", "output", "finish_reason", ...} records), so it is left as it is: '
            "--resume and --overwrite only take a file batch_process.py wrote. "
            "Choose another -o file."
        )
    if not (args.resume or args.overwrite):
        return (
            f"error: {out} already has results. Add --resume to continue it, "
            "--overwrite to start again, or choose another -o file."
        )
    return None


def _check_model(name: str | None) -> str | None:
    """Why ``--model`` cannot be used (a file path instead of a catalog name), or ``None``."""
    problem = registry.path_instead_of_name(name)
    return f"error: --model {problem}" if problem else None


def _finished_ids(output: Path) -> set[str]:
    """Ids already in ``output``; damaged lines are set aside and listed on stderr."""
    found = batch.read_finished(output)
    for line, why in found.damaged:
        _error(f"{output}:{line}: damaged line ({why}), moved to {found.aside}")
    if found.damaged:
        _error(
            f"{len(found.damaged)} damaged line(s) kept in {found.aside}; "
            f"the {len(found.ids)} readable results stay, and rows without one run again."
        )
    return found.ids


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.parallel < 1 or args.max_tokens < 1:
        _error("error: --parallel and --max-tokens must be at least 1.")
        return 2
    if args.ray is not None and args.engine == "sequential":
        _error("error: --ray runs the batched engine on each Ray worker; drop --engine sequential.")
        return 2
    if args.ray_actors is not None and (args.ray is None or args.ray_actors < 1):
        _error("error: --ray-actors needs --ray and must be at least 1.")
        return 2
    problem = _check_paths(args) or _check_model(args.model)
    if problem:
        _error(problem)
        return 2
    try:
        rows = list(
            batch.read_inputs(
                args.input, column=args.column, template=args.template, encoding=args.encoding
            )
        )
    except batch.InputError as exc:
        _error(f"error: {exc}")
        return 2
    except OSError as exc:
        _error(f"error: cannot read {args.input} ({exc.strerror}).")
        return 2
    if not rows:
        _error(
            f"error: {args.input} holds no prompts (it is empty or has only blank lines"
            f"{' and a header' if args.input.suffix.lower() == '.csv' else ''}). "
            "Add one prompt a line (.txt), one JSON object a line (.jsonl) or one CSV row each."
        )
        return 2

    done = _finished_ids(args.output) if args.resume else set()
    todo = [row for row in rows if batch.id_key(row.id) not in done]
    for row in todo:
        if row.error:
            print(f"{args.input}:{row.line}: skipped: {row.error}", file=sys.stderr)
    if done:
        print(
            f"Resuming: {len(rows) - len(todo)} of {len(rows)} rows are already in {args.output}."
        )
    if not todo:
        print(f"Nothing to do: all {len(rows)} rows are in {args.output}.")
        return 0

    params = GenerationParams(
        max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed
    )
    resources: list = []
    reporter = writer = None
    try:
        outcomes = _outcomes(args, todo, params, resources)
        try:
            writer = batch.OutputWriter(args.output, append=args.resume)
        except OSError as exc:
            outcomes.close()
            _error(f"error: cannot write {args.output} ({exc.strerror}). Choose another -o file.")
            return 2
        reporter = Reporter(len(todo), Console())
        with writer:
            try:
                for outcome in outcomes:
                    reporter.update(writer.write(outcome))
                    if outcome.error and not outcome.row.error:  # malformed rows: listed above
                        _error(f"{args.input}:{outcome.row.line}: failed: {outcome.error}")
            finally:
                outcomes.close()  # cancels rows still running if we stop early
    except KeyboardInterrupt:
        if reporter:
            reporter.stop()
        written = writer.written if writer else 0
        _error(
            f"Interrupted: {written} rows were written to {args.output}. "
            "Run the same command with --resume to finish the rest."
        )
        return 130
    except (registry.RegistryError, BackendError) as exc:
        if reporter:
            reporter.stop()
        _error(f"error: {exc}")
        return 2
    finally:
        for resource in resources:
            resource.close()
    reporter.stop()
    rows_s, tok_s = reporter.rates()
    elapsed = time.perf_counter() - reporter.start
    print(
        f"Done: {reporter.rows} rows in {elapsed:.1f} s ({rows_s:.2f} rows/s, {tok_s:.1f} tok/s, "
        f"{reporter.tokens} tokens), {reporter.errors} failed. Results: {args.output}"
    )
    if reporter.errors:
        print('Failed rows carry an "error" field saying why (they were also listed above).')
    return 1 if reporter.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
