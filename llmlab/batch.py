"""Batch jobs: read prompts from a file, run them, write one JSON line per input, resume after a kill.

The logic behind ``part3/batch_process.py``::

    from llmlab import batch
    rows = list(batch.read_inputs("prompts.jsonl"))          # .jsonl, .csv or .txt
    done = batch.read_finished("answers.jsonl").ids          # ids finished by an earlier run
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
On resume, :func:`read_finished` counts every readable record as done and moves a damaged
line (a torn write, a bad edit) to ``OUTPUT.damaged``, so nothing is dropped unseen.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.backends.base import GenerationParams, Message, Result, Usage

FORMATS = (".jsonl", ".csv", ".txt")
DAMAGED_SUFFIX = ".damaged"  # where read_finished keeps the lines it could not use
RECORD_KEYS = ("id", "output", "finish_reason")  # every output record has these


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


def _read_jsonl(path: Path, column: str, template: str | None, encoding: str) -> Iterator[InputRow]:
    with path.open(encoding=encoding) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputRow(id=line_no, line=line_no, error=f"invalid JSON ({exc.msg})")
                continue
            yield _row_from_record(record, line_no, line_no, column, template)


def _read_csv(path: Path, column: str, template: str | None, encoding: str) -> Iterator[InputRow]:
    with path.open(encoding=encoding, newline="") as f:
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


def _read_txt(path: Path, encoding: str) -> Iterator[InputRow]:
    with path.open(encoding=encoding) as f:
        for line_no, line in enumerate(f, start=1):
            text = line.rstrip("\r\n")
            if text.strip():
                yield InputRow(id=line_no, line=line_no, prompt=text, fields={"prompt": text})


def _decode_error(path: Path, encoding: str) -> InputError:
    """Where ``path`` stops being ``encoding`` text, and what to do about it."""
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - data.rfind(b"\n", 0, exc.start)
        return InputError(
            f"{path}:{line}: byte 0x{data[exc.start]:02x} (column {column}) is not "
            f"{encoding} text. Re-save the file as UTF-8 (in your editor: Save as, encoding "
            "UTF-8), or name the encoding it has with --encoding, e.g. --encoding cp1252 for "
            "a Windows or Latin-1 file."
        )
    return InputError(f"{path} could not be read as {encoding} text.")


def read_inputs(
    path: str | Path,
    column: str = "prompt",
    template: str | None = None,
    encoding: str = "utf-8",
) -> Iterator[InputRow]:
    """Yield every row of ``path`` (``.jsonl``, ``.csv`` or ``.txt``), unusable ones with ``error`` set.

    Ids must be unique: a repeated id becomes an error row with the id ``"line N"``.
    A UTF-8 file may start with a byte-order mark (as Windows editors write it).

    Raises:
        InputError: unknown file type or encoding, text that is not in ``encoding`` (the
            message names the line), or a CSV without the prompt column.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        codec = codecs.lookup(encoding).name
    except LookupError:
        raise InputError(
            f"Unknown encoding {encoding!r}: use e.g. utf-8, cp1252 or latin-1."
        ) from None
    text_encoding = "utf-8-sig" if codec == "utf-8" else encoding
    if suffix == ".jsonl":
        rows = _read_jsonl(path, column, template, text_encoding)
    elif suffix == ".csv":
        rows = _read_csv(path, column, template, text_encoding)
    elif suffix == ".txt":
        rows = _read_txt(path, text_encoding)
    else:
        raise InputError(
            f"Unsupported input type {path.suffix!r}: use one of {', '.join(FORMATS)}."
        )
    if not path.exists():
        raise FileNotFoundError(f"Input file {path} does not exist.")
    seen: dict[str, int] = {}
    try:
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
    except UnicodeDecodeError:
        raise _decode_error(path, encoding) from None


@dataclass
class Finished:
    """What earlier runs left in an output file (see :func:`read_finished`)."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # by id_key, file order
    damaged: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)
    aside: Path | None = None  # the file the damaged lines were moved to

    @property
    def ids(self) -> set[str]:
        """The finished rows' ids, as :func:`id_key`."""
        return set(self.records)

    @property
    def failed(self) -> int:
        """How many finished rows carry an ``error``."""
        return sum("error" in record for record in self.records.values())


def _check_record(raw: bytes, seen: dict[str, int]) -> tuple[dict[str, Any] | None, str]:
    """One output line as a record, or ``(None, why it cannot be used)``."""
    try:
        record = json.loads(raw)
    except ValueError:  # bad JSON or bytes that are not UTF-8
        if not raw.endswith(b"\n"):
            return None, "cut short: the run was stopped while writing it"
        return None, "not valid JSON"
    if not isinstance(record, dict) or not isinstance(record.get("id"), str | int):
        return None, "not a result record (no 'id')"
    first = seen.get(id_key(record["id"]))
    if first is not None:
        return None, f"a second result for id {record['id']!r} (the first is on line {first})"
    return record, ""


def read_finished(path: str | Path) -> Finished:
    """The rows an earlier run finished in the output ``path``, made safe to append to.

    Every readable record counts as done, wherever it is in the file. A line that cannot
    be used (a torn write, an edit that broke the JSON, a second result for an id) is
    moved, byte for byte, to ``path`` + ``.damaged`` and listed in ``damaged`` with its
    line number, so the caller can say so; its row runs again unless the file has a result
    for it elsewhere. A last record without its newline is kept and gets one.
    """
    path = Path(path)
    found = Finished()
    if not path.exists():
        return found
    data = path.read_bytes()
    kept: list[bytes] = []
    bad: list[bytes] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        if not raw.strip():
            continue
        record, why = _check_record(raw, seen)
        line = raw if raw.endswith(b"\n") else raw + b"\n"
        if record is None:
            found.damaged.append((number, why))
            bad.append(line)
            continue
        seen[id_key(record["id"])] = number
        found.records[id_key(record["id"])] = record
        kept.append(line)
    if bad:
        found.aside = path.with_name(path.name + DAMAGED_SUFFIX)
        with found.aside.open("ab") as f:  # kept aside first: a kill now loses nothing
            f.write(b"".join(bad))
            f.flush()
            os.fsync(f.fileno())
    if bad or (kept and not data.endswith(b"\n")):
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as f:
            f.write(b"".join(kept))
            f.flush()
            os.fsync(f.fileno())
        partial.replace(path)  # atomic: the file is the old one or the repaired one
    return found


def looks_like_output(path: str | Path) -> bool:
    """Whether ``path`` holds results this module wrote (so resuming or overwriting it is safe).

    The first line that is JSON decides: a record with ``id``, ``output`` and
    ``finish_reason``. A file with no JSON line is output only if it is one line cut short
    (a run stopped while writing its first row).
    """
    with Path(path).open("rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            return isinstance(record, dict) and all(key in record for key in RECORD_KEYS)
    data = Path(path).read_bytes()
    return data.startswith(b'{"id": ') and b"\n" not in data


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
        self.written = 0  # lines written by this writer

    def write(self, outcome: Outcome) -> dict[str, Any]:
        """Write ``outcome`` as one line; returns the record written."""
        record = outcome.to_record()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.written += 1
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
    time, so a file of any length never floods the engine's queue. A row the engine
    refuses (a prompt too long for the context window) becomes that row's error, as in
    :func:`run_sequential`; an :class:`~llmlab.engine.EngineError` from ``submit`` (engine
    closed, queue full) ends the run. Stopping early (an exception or ``close()`` of this
    generator) cancels the rows still running.
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
                try:
                    handle = engine.submit(
                        Request(messages=messages, params=params), on_chunk=on_chunk(token)
                    )
                except EngineError:
                    raise  # about the engine, not this row: closed, or its queue is full
                except Exception as exc:  # this row cannot run (too long, ...): the rest go on
                    yield Outcome(row, error=f"{type(exc).__name__}: {exc}")
                    continue
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
