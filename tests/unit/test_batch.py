"""Batch job logic without a model: reading every input format, malformed rows, resume
bookkeeping, output lines, and the scheduling loops driven by stand-in engines."""

from __future__ import annotations

import json
import threading

import pytest

from llmlab import batch
from llmlab.backends.base import (
    Chunk,
    ContextOverflowError,
    GenerationParams,
    Result,
    Timings,
    Usage,
)
from llmlab.engine import EngineError, QueueFullError


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_txt_one_prompt_a_line_with_line_number_ids(tmp_path):
    rows = list(batch.read_inputs(write(tmp_path / "p.txt", "First?\n\n  \nSecond?\r\nThird\n")))
    assert [(r.id, r.prompt) for r in rows] == [(1, "First?"), (4, "Second?"), (5, "Third")]
    assert all(r.error is None for r in rows)


def test_jsonl_prompt_messages_ids_and_malformed_lines(tmp_path):
    lines = [
        '{"id": "q1", "prompt": "Hello"}',
        '{"prompt": "no id"}',
        "{not json",
        '{"id": "q4"}',
        '{"id": "q5", "messages": [{"role": "user", "content": "Hi"}]}',
        '{"id": "q6", "messages": [{"role": "user"}]}',
        '["a list"]',
        '{"id": "q8", "prompt": 42}',
        '{"id": true, "prompt": "x"}',
        "",
        '{"id": "q1", "prompt": "again"}',
    ]
    rows = list(batch.read_inputs(write(tmp_path / "p.jsonl", "\n".join(lines) + "\n")))
    by_line = {r.line: r for r in rows}
    assert by_line[1].id == "q1" and by_line[1].prompt == "Hello" and by_line[1].error is None
    assert by_line[2].id == 2 and by_line[2].prompt == "no id"
    assert by_line[3].error.startswith("invalid JSON") and by_line[3].id == 3
    assert by_line[4].error == "no 'prompt' or 'messages' field"
    assert by_line[5].messages == [{"role": "user", "content": "Hi"}] and by_line[5].error is None
    assert "role" in by_line[6].error
    assert by_line[7].error == "expected a JSON object"
    assert by_line[8].error == "'prompt' must be a string"
    assert by_line[9].error == "'id' must be a string or an integer"
    assert 10 not in by_line  # blank line skipped
    assert by_line[11].id == "line 11" and "duplicate id 'q1'" in by_line[11].error
    assert "line 1" in by_line[11].error


def test_csv_prompt_column_named_column_and_bad_rows(tmp_path):
    path = write(
        tmp_path / "p.csv",
        'id,question,topic\nA,"What is 2+2, exactly?",math\n,Name a colour,art\nC,,x\nD,too,many,cells\n',
    )
    with pytest.raises(batch.InputError, match="no 'prompt' column.*--column"):
        list(batch.read_inputs(path))
    rows = list(batch.read_inputs(path, column="question"))
    assert (rows[0].id, rows[0].prompt, rows[0].fields["topic"]) == (
        "A",
        "What is 2+2, exactly?",
        "math",
    )
    assert (rows[1].id, rows[1].prompt) == (2, "Name a colour")  # empty id cell: data-row number
    assert rows[2].error == "'question' is empty" and rows[2].id == "C"
    assert rows[3].error == "more cells than columns" and rows[3].line == 5


def test_template_and_system_build_the_messages(tmp_path):
    rows = list(batch.read_inputs(write(tmp_path / "p.csv", "prompt,lang\nGood morning,French\n")))
    messages = rows[0].to_messages(system="Be brief.", template="Translate to {lang}: {prompt}")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate to French: Good morning"},
    ]
    with pytest.raises(ValueError, match="'missing'"):
        rows[0].to_messages(template="{missing}")
    own_system = batch.InputRow(id=1, line=1, messages=[{"role": "system", "content": "Mine"}])
    assert own_system.to_messages(system="Other")[0]["content"] == "Mine"


def test_template_alone_makes_prompt_optional(tmp_path):
    path = write(tmp_path / "p.jsonl", '{"id": 1, "city": "Oslo"}\n')
    assert list(batch.read_inputs(path))[0].error
    row = list(batch.read_inputs(path, template="Describe {city}."))[0]
    assert (
        row.error is None
        and row.to_messages(template="Describe {city}.")[0]["content"] == "Describe Oslo."
    )


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(batch.InputError, match=r"\.jsonl, \.csv, \.txt"):
        list(batch.read_inputs(write(tmp_path / "p.docx", "x")))
    with pytest.raises(FileNotFoundError):
        list(batch.read_inputs(tmp_path / "absent.txt"))


def outcome(row_id, text="ok", error=None):
    row = batch.InputRow(id=row_id, line=1, prompt=f"prompt {row_id}")
    result = None if error else Result(text, "stop", Usage(5, 2), Timings(0.1, 0.5, 2))
    return batch.Outcome(row, result, error, seconds=0.5)


def test_output_lines_and_a_torn_last_line_kept_aside(tmp_path):
    path = tmp_path / "out.jsonl"
    with batch.OutputWriter(path) as out:
        first = out.write(outcome("a"))
        out.write(outcome(2, error="bad row"))
    assert first == {
        "id": "a",
        "prompt": "prompt a",
        "output": "ok",
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
        "seconds": 0.5,
    }
    failed = json.loads(path.read_text().splitlines()[1])
    assert (
        failed["error"] == "bad row"
        and failed["output"] is None
        and failed["finish_reason"] == "error"
    )
    # A kill in the middle of a write leaves half a line: it is set aside and that row reruns.
    torn = '{"id": "c", "prompt": "prompt c", "out'
    with path.open("a") as f:
        f.write(torn)
    found = batch.read_finished(path)
    assert found.ids == {batch.id_key("a"), batch.id_key(2)} and found.failed == 1
    assert found.damaged == [(3, "cut short: the run was stopped while writing it")]
    assert found.aside == tmp_path / "out.jsonl.damaged"
    assert found.aside.read_text() == torn + "\n"
    assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 2
    with batch.OutputWriter(path) as out:
        out.write(outcome("c"))
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["a", 2, "c"]


def test_a_damaged_line_in_the_middle_loses_no_finished_row(tmp_path):
    path = tmp_path / "out.jsonl"
    with batch.OutputWriter(path) as out:
        for n in range(1, 6):
            out.write(outcome(n))
    good = path.read_text().splitlines()
    broken = good[2][:20] + "#" + good[2][21:]  # an edit that broke line 3
    path.write_text("\n".join([*good[:2], broken, *good[3:]]) + "\n")
    found = batch.read_finished(path)
    assert found.ids == {batch.id_key(n) for n in (1, 2, 4, 5)}  # all but the broken one
    assert found.damaged == [(3, "not valid JSON")]
    assert (tmp_path / "out.jsonl.damaged").read_text() == broken + "\n"
    assert path.read_text().splitlines() == [*good[:2], *good[3:]]
    # A second look finds nothing more to set aside, and the file is left as it is.
    again = batch.read_finished(path)
    assert again.ids == found.ids and again.damaged == [] and again.aside is None


def test_lines_that_are_no_result_and_second_results_are_set_aside(tmp_path):
    path = write(
        tmp_path / "out.jsonl",
        '{"id": 1, "output": "x"}\n[1, 2]\n{"note": "mine"}\n\n{"id": 1, "output": "y"}\n'
        '\xff\n{"id": 2, "output": "z"}',
    )
    found = batch.read_finished(path)
    assert {k: r["output"] for k, r in found.records.items()} == {"1": "x", "2": "z"}
    assert found.damaged == [
        (2, "not a result record (no 'id')"),
        (3, "not a result record (no 'id')"),
        (5, "a second result for id 1 (the first is on line 1)"),
        (6, "not valid JSON"),
    ]
    # The last record had no newline: it is kept, whole, and gets one.
    assert path.read_text() == '{"id": 1, "output": "x"}\n{"id": 2, "output": "z"}\n'
    assert len(found.aside.read_text().splitlines()) == 4


def test_read_finished_of_a_missing_file(tmp_path):
    found = batch.read_finished(tmp_path / "none.jsonl")
    assert found.ids == set() and found.damaged == [] and not (tmp_path / "none.jsonl").exists()


def test_looks_like_output_tells_results_from_other_files(tmp_path):
    results = tmp_path / "out.jsonl"
    with batch.OutputWriter(results) as out:
        out.write(outcome("a"))
    assert batch.looks_like_output(results)
    assert batch.looks_like_output(write(tmp_path / "torn.jsonl", '{"id": 1, "prompt": "Hi", "ou'))
    damaged_first = write(tmp_path / "d.jsonl", "{broken\n" + results.read_text())
    assert batch.looks_like_output(damaged_first)
    assert not batch.looks_like_output(write(tmp_path / "notes.txt", "my notes\nmore notes\n"))
    assert not batch.looks_like_output(write(tmp_path / "in.jsonl", '{"id": 1, "prompt": "Hi"}\n'))


def test_a_file_in_another_encoding_names_its_line_and_what_to_do(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("Caf\u00e9 au lait?\nTwo\n\u20ac price?\n".encode("cp1252"))
    with pytest.raises(batch.InputError) as info:
        list(batch.read_inputs(path))
    message = str(info.value)
    assert message.startswith(f"{path}:1: byte 0xe9 (column 4) is not utf-8 text.")
    assert "Re-save the file as UTF-8" in message and "--encoding cp1252" in message
    rows = list(batch.read_inputs(path, encoding="cp1252"))
    assert [r.prompt for r in rows] == ["Caf\u00e9 au lait?", "Two", "\u20ac price?"]
    with pytest.raises(batch.InputError, match="Unknown encoding 'klingon'"):
        list(batch.read_inputs(path, encoding="klingon"))


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("prompt\nHello\n".encode("utf-8-sig"))
    assert [r.prompt for r in batch.read_inputs(path)] == ["Hello"]


def test_id_keys_keep_numbers_and_strings_apart():
    assert batch.id_key(5) != batch.id_key("5")


def test_run_sequential_keeps_going_after_a_failing_row():
    rows = [
        batch.InputRow(id=i, line=i, prompt=p) for i, p in enumerate(["one", "boom", "three"], 1)
    ]
    rows.append(batch.InputRow(id=4, line=4, error="invalid JSON"))
    seen = []

    def chat(messages, **params):
        seen.append((messages[-1]["content"], params["max_tokens"]))
        if messages[-1]["content"] == "boom":
            raise RuntimeError("model fell over")
        return Result(messages[-1]["content"].upper(), "stop", Usage(3, 1), Timings())

    outs = list(batch.run_sequential(chat, rows, GenerationParams(max_tokens=7)))
    assert [o.row.id for o in outs] == [1, 2, 3, 4]
    assert outs[0].result.text == "ONE" and outs[2].result.text == "THREE"
    assert outs[1].error == "RuntimeError: model fell over"
    assert outs[3].error == "invalid JSON"
    assert seen == [("one", 7), ("boom", 7), ("three", 7)]


class FakeHandle:
    def __init__(self, request, on_chunk, fail=False):
        self.request, self.on_chunk, self.fail = request, on_chunk, fail
        self.cancelled = False
        self.seconds = 0.0

    def finish(self):
        self.on_chunk(Chunk("", "error" if self.fail else "stop"))

    def result(self):
        if self.fail:
            raise EngineError("decode failed")
        text = self.request.messages[-1]["content"]
        return Result(text[::-1], "stop", Usage(1, 1), Timings(0, 0.25, 1))

    def cancel(self):
        self.cancelled = True


class FakeEngine:
    """Finishes requests in reverse order of submission, from another thread."""

    parallel = 2

    def __init__(self):
        self.handles: list[FakeHandle] = []
        self.most_in_flight = 0

    def submit(self, request, on_chunk):
        handle = FakeHandle(request, on_chunk, fail=request.messages[-1]["content"] == "fail")
        self.handles.append(handle)
        running = [h for h in self.handles if not getattr(h, "reported", False)]
        self.most_in_flight = max(self.most_in_flight, len(running))
        if len(running) == 3 or request.messages[-1]["content"] in ("last", "fail"):
            for h in reversed(running):
                h.reported = True
                threading.Thread(target=h.finish).start()
        return handle


def test_run_with_engine_yields_as_rows_finish_and_bounds_what_is_in_flight():
    prompts = ["a", "b", "c", "fail", "d", "e", "f", "last"]
    rows = [batch.InputRow(id=i, line=i, prompt=p) for i, p in enumerate(prompts, 1)]
    rows.insert(2, batch.InputRow(id=99, line=99, error="invalid JSON"))
    engine = FakeEngine()
    outs = list(
        batch.run_with_engine(engine, rows, GenerationParams(), system="S", max_in_flight=3)
    )
    assert sorted(o.row.id for o in outs) == sorted(r.id for r in rows)
    assert engine.most_in_flight <= 3
    assert {o.row.id: o.error for o in outs if o.error} == {99: "invalid JSON", 4: "decode failed"}
    assert next(o for o in outs if o.row.id == 1).result.text == "a"
    assert engine.handles[0].request.messages[0] == {"role": "system", "content": "S"}


def test_stopping_run_with_engine_early_cancels_rows_in_flight():
    class NeverFinishes(FakeEngine):
        def submit(self, request, on_chunk):
            handle = FakeHandle(request, on_chunk)
            self.handles.append(handle)
            if len(self.handles) == 1:
                threading.Thread(target=handle.finish).start()
            return handle

    engine = NeverFinishes()
    rows = [batch.InputRow(id=i, line=i, prompt=str(i)) for i in range(1, 6)]
    outs = batch.run_with_engine(engine, rows, GenerationParams(), max_in_flight=3)
    assert next(outs).row.id == 1
    outs.close()  # what main() does on Ctrl-C
    # Row 1 finished; rows 2 and 3 were running and are cancelled; 4 and 5 never started.
    assert [h.cancelled for h in engine.handles] == [False, True, True]


class RefusesLongPrompts(FakeEngine):
    """Refuses a prompt too long for its context at submit, as Engine.submit does."""

    def submit(self, request, on_chunk):
        if request.messages[-1]["content"].startswith("long"):
            raise ContextOverflowError(prompt_tokens=300, max_tokens=16, context_length=256)
        return super().submit(request, on_chunk)


def test_a_row_too_long_for_the_context_becomes_its_error_and_the_run_goes_on():
    prompts = ["a", "long one", "b", "long two", "last"]
    rows = [batch.InputRow(id=i, line=i, prompt=p) for i, p in enumerate(prompts, 1)]
    outs = list(batch.run_with_engine(RefusesLongPrompts(), rows, GenerationParams()))
    assert sorted(o.row.id for o in outs) == [1, 2, 3, 4, 5]
    errors = {o.row.id: o.error for o in outs if o.error}
    assert set(errors) == {2, 4}
    assert errors[2].startswith("ContextOverflowError: The request needs 300 prompt + 16 reply")
    assert "shorter prompt" in errors[2]
    assert {o.row.id: o.result.text for o in outs if o.result} == {1: "a", 3: "b", 5: "tsal"}


def test_an_engine_wide_refusal_at_submit_ends_the_run():
    class Full(FakeEngine):
        def submit(self, request, on_chunk):
            raise QueueFullError("256 requests are already waiting; retry later")

    rows = [batch.InputRow(id=1, line=1, prompt="a")]
    with pytest.raises(QueueFullError):
        list(batch.run_with_engine(Full(), rows, GenerationParams()))
