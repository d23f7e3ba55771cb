"""Batch jobs: read prompts from a file, run them, write one JSON line per input, resume after a kill.

The logic behind ``part3/batch_process.py``::

    from llmlab import batch
    rows = list(batch.read_inputs("prompts.jsonl"))          # .jsonl, .csv or .txt
    done = batch.completed_ids("answers.jsonl")              # ids finished by an earlier run
    todo = [r for r in rows if batch.id_key(r.id) not in done]
    with batch.OutputWriter("answers.jsonl") as out:
        for outcome in batch.run_with_engine(engine, todo, params):
            out.write(outcome)

Inputs: ``.jsonl`` lines with a ``prompt`` or ``messages`` field and an optional ``id``;
``.csv`` with a ``prompt`` column (or another one named by ``column``); ``.txt`` with one
prompt a line. A row without an ``id`` gets its line number (its data-row number in a
CSV). A row that cannot be used (bad JSON, no prompt, a duplicate id) becomes an
:class:`InputRow` with ``error`` set, so it is reported and written, and the run goes on.

Each output line holds ``id``, ``prompt`` (and ``messages`` when the input gave them),
``output``, ``finish_reason``, ``usage``, ``seconds``, and ``error`` when the row failed.
Lines are written and flushed as rows finish, so a killed run keeps every finished row.
"""

from __future__ import annotations

import csv
import json
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.backends.base import GenerationParams, Message, Result, Usage

FORMATS = (".jsonl", ".csv", ".txt")


class InputError(Exception):
    """The input file as a whole cannot be read (unknown format, missing CSV column)."""


@dataclass
class InputRow:
    """One prompt from the input file, or the reason it could not be used (``error``)."""

    id: Any
    line: int
    prompt: str | None = None
    messages: list[Message] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_messages(self, system: str | None = None, template: str | None = None) -> list[Message]:
        """The conversation to send: the row's messages, or its (templated) prompt as a user turn.

        ``template`` is a ``str.format`` pattern over the row's fields, e.g.
        ``"Summarise: {prompt}"``. ``system`` is added first unless the row has its own.

        Raises:
            ValueError: the template names a field the row does not have.
        """
        if self.messages is not None:
            messages = [dict(m) for m in self.messages]
        else:
            text = self.prompt or ""
            if template:
                try:
                    text = template.format_map({**self.fields, "prompt": text})
                except (KeyError, IndexError) as exc:
                    raise ValueError(f"the template needs field {exc} that this row lacks") from exc
            messages = [{"role": "user", "content": text}]
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return messages


def id_key(row_id: Any) -> str:
    """A comparable key for an id as it appears in JSON (so ``5`` and ``"5"`` stay different)."""
    return json.dumps(row_id, sort_keys=True)


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty list"
    for m in messages:
        if not (
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
        ):
            return "each message needs string 'role' and 'content' fields"
    return None


def _row_from_record(
    record: Any,
    number: int,
    line: int,
    column: str,
    template: str | None,
    allow_messages: bool = True,
) -> InputRow:
    """Turn one parsed record into an :class:`InputRow` (with ``error`` if unusable).

    ``number`` is the id a record without its own gets; ``line`` is where it is in the file.
    """
    if not isinstance(record, dict):
        return InputRow(id=number, line=line, error="expected a JSON object")
    row_id = record.get("id", number)
    if not isinstance(row_id, str | int) or isinstance(row_id, bool):
        return InputRow(id=number, line=line, error="'id' must be a string or an integer")
    if allow_messages and "messages" in record:
        problem = _check_messages(record["messages"])
        if problem:
            return InputRow(id=row_id, line=line, error=problem)
        return InputRow(id=row_id, line=line, messages=record["messages"], fields=record)
    prompt = record.get(column)
    if prompt is None and not template:
        return InputRow(id=row_id, line=line, error=f"no {column!r} or 'messages' field")
    if prompt is not None and not isinstance(prompt, str):
        return InputRow(id=row_id, line=line, error=f"{column!r} must be a string")
    if prompt is not None and not prompt.strip():
        return InputRow(id=row_id, line=line, error=f"{column!r} is empty")
    return InputRow(id=row_id, line=line, prompt=prompt, fields=record)


def _read_jsonl(path: Path, column: str, template: str | None) -> Iterator[InputRow]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputRow(id=line_no, line=line_no, error=f"invalid JSON ({exc.msg})")
                continue
            yield _row_from_record(record, line_no, line_no, column, template)


def _read_csv(path: Path, column: str, template: str | None) -> Iterator[InputRow]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        names = reader.fieldnames or []
        if column not in names and not template:
            raise InputError(
                f"{path} has no {column!r} column (columns: {', '.join(names) or 'none'}). "
                "Name the prompt column with --column."
            )
        for number, record in enumerate(reader, start=1):
            if None in record:  # more cells than header names
                yield InputRow(id=number, line=reader.line_num, error="more cells than columns")
                continue
            # Short records leave None in the missing cells; an empty id cell means "no id".
            fields = {
                k: v for k, v in record.items() if v is not None and not (k == "id" and v == "")
            }
            yield _row_from_record(
                fields, number, reader.line_num, column, template, allow_messages=False
            )


def _read_txt(path: Path) -> Iterator[InputRow]:
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield InputRow(id=line_no, line=line_no, prompt=text, fields={"prompt": text})


def read_inputs(
    path: str | Path, column: str = "prompt", template: str | None = None
) -> Iterator[InputRow]:
    """Yield every row of ``path`` (``.jsonl``, ``.csv`` or ``.txt``), unusable ones with ``error`` set.

    Ids must be unique: a repeated id becomes an error row with the id ``"line N"``.

    Raises:
        InputError: unknown file type, or a CSV without the prompt column.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = _read_jsonl(path, column, template)
    elif suffix == ".csv":
        rows = _read_csv(path, column, template)
    elif suffix == ".txt":
        rows = _read_txt(path)
    else:
        raise InputError(
            f"Unsupported input type {path.suffix!r}: use one of {', '.join(FORMATS)}."
        )
    if not path.exists():
        raise FileNotFoundError(f"Input file {path} does not exist.")
    seen: dict[str, int] = {}
    for row in rows:
        key = id_key(row.id)
        if key in seen:
            yield InputRow(
                id=f"line {row.line}",
                line=row.line,
                error=f"duplicate id {row.id!r} (first used on line {seen[key]})",
            )
            continue
        seen[key] = row.line
        yield row


def completed_ids(path: str | Path) -> set[str]:
    """Ids (as :func:`id_key`) already written to the output ``path`` by an earlier run.

    A run killed mid-write can leave a partial last line; it is cut off here, so the row
    is run again and the file stays one valid JSON object a line.
    """
    path = Path(path)
    if not path.exists():
        return set()
    data = path.read_bytes()
    done: set[str] = set()
    good_end = 0
    for raw in data.splitlines(keepends=True):
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if not raw.strip():
                good_end += len(raw)
                continue
            break
        if not raw.endswith(b"\n"):
            break  # a complete object without its newline: rewrite it whole
        done.add(id_key(record.get("id")))
        good_end += len(raw)
    if good_end < len(data):
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done


@dataclass
class Outcome:
    """A finished row: its result, or the error that stopped it."""

    row: InputRow
    result: Result | None = None
    error: str | None = None
    seconds: float = 0.0

    def to_record(self) -> dict[str, Any]:
        """The JSON line written for this row."""
        record: dict[str, Any] = {"id": self.row.id, "prompt": self.row.prompt}
        if self.row.messages is not None:
            record["messages"] = self.row.messages
        usage = self.result.usage if self.result else Usage()
        record.update(
            output=self.result.text if self.result else None,
            finish_reason=self.result.finish_reason if self.result else "error",
            usage={
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            seconds=round(self.seconds, 4),
        )
        if self.error:
            record["error"] = self.error
        return record


class OutputWriter:
    """Appends one JSON line per outcome and flushes it at once, so a kill loses nothing finished."""

    def __init__(self, path: str | Path, append: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a" if append else "w", encoding="utf-8")

    def write(self, outcome: Outcome) -> dict[str, Any]:
        """Write ``outcome`` as one line; returns the record written."""
        record = outcome.to_record()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        return record

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Prepared = tuple[InputRow, list[Message] | None, str | None]


def prepare(
    rows: Iterable[InputRow], system: str | None, template: str | None
) -> Iterator[Prepared]:
    """Pair each row with the messages to send, or with the reason it cannot be sent."""
    for row in rows:
        if row.error:
            yield row, None, row.error
            continue
        try:
            yield row, row.to_messages(system, template), None
        except ValueError as exc:
            yield row, None, str(exc)


def run_sequential(
    chat: Callable[..., Result],
    rows: Iterable[InputRow],
    params: GenerationParams,
    system: str | None = None,
    template: str | None = None,
) -> Iterator[Outcome]:
    """Run rows one after another through ``chat(messages, **params)`` (e.g. a backend's ``chat``)."""
    for row, messages, problem in prepare(rows, system, template):
        if problem:
            yield Outcome(row, error=problem)
            continue
        start = time.perf_counter()
        try:
            result = chat(messages, **vars(params))
        except Exception as exc:  # one failed row must not end the job
            yield Outcome(
                row, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - start
            )
            continue
        yield Outcome(row, result, seconds=time.perf_counter() - start)


def run_with_engine(
    engine: Any,
    rows: Iterable[InputRow],
    params: GenerationParams,
    system: str | None = None,
    template: str | None = None,
    max_in_flight: int | None = None,
) -> Iterator[Outcome]:
    """Run rows through a :class:`llmlab.engine.Engine`, yielding each as it finishes.

    At most ``max_in_flight`` rows (default: twice the engine's slots) are submitted at a
    time, so a file of any length never floods the engine's queue. Stopping early (an
    exception or ``close()`` of this generator) cancels the rows still running.
    """
    from llmlab.engine import EngineError, Request

    limit = max_in_flight or 2 * engine.parallel
    finished: queue.Queue = queue.Queue()
    in_flight: dict[int, tuple[InputRow, Any]] = {}
    pending = prepare(rows, system, template)
    exhausted = False
    counter = 0

    def on_chunk(token: int) -> Callable:
        def callback(chunk) -> None:
            if chunk.finish_reason is not None:
                finished.put(token)

        return callback

    try:
        while True:
            while not exhausted and len(in_flight) < limit:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                row, messages, problem = item
                if problem:
                    yield Outcome(row, error=problem)
                    continue
                counter += 1
                token = counter
                handle = engine.submit(
                    Request(messages=messages, params=params), on_chunk=on_chunk(token)
                )
                in_flight[token] = (row, handle)
            if not in_flight:
                return
            row, handle = in_flight.pop(finished.get())
            try:
                result = handle.result()
            except EngineError as exc:
                yield Outcome(row, error=str(exc), seconds=handle.seconds)
                continue
            yield Outcome(row, result, seconds=result.timings.total_seconds)
    finally:
        for _, handle in in_flight.values():
            handle.cancel()
