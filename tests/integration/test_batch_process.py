"""part3/batch_process.py end to end on the default model: every input format, malformed
rows, resume after an interrupted and after a killed run, and the usage errors."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab import batch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "part3" / "batch_process.py"
_spec = importlib.util.spec_from_file_location("batch_process", SCRIPT)
batch_process = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(batch_process)

QUESTIONS = [
    "What is 2+2?",
    "Name a colour.",
    "Say hello.",
    "Name a fruit.",
    "Name a city.",
    "Count to three.",
]
FAST = ["--max-tokens", "4", "--parallel", "3", "--n-ctx", "256"]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
def test_txt_input_one_line_per_prompt_with_every_field(tmp_path, capsys):
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(QUESTIONS[:3]) + "\n\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert batch_process.main([str(src), "-o", str(out), *FAST]) == 0
    rows = sorted(lines(out), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == [1, 2, 3]
    assert [r["prompt"] for r in rows] == QUESTIONS[:3]
    for row in rows:
        assert set(row) == {"id", "prompt", "output", "finish_reason", "usage", "seconds"}
        assert row["output"] and row["finish_reason"] in ("stop", "length")
        assert 1 <= row["usage"]["completion_tokens"] <= 4 and row["usage"]["prompt_tokens"] > 0
        assert row["seconds"] > 0
    summary = capsys.readouterr().out
    assert "Done: 3 rows" in summary and "0 failed" in summary and str(out) in summary


@pytest.mark.slow
def test_jsonl_with_messages_and_malformed_lines_goes_on_and_reports_them(tmp_path, capsys):
    src = tmp_path / "tasks.jsonl"
    src.write_text(
        '{"id": "a", "prompt": "Say hello."}\n'
        "{oops\n"
        '{"id": "b", "messages": [{"role": "user", "content": "Name a colour."}]}\n'
        '{"id": "c"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out.jsonl"
    assert batch_process.main([str(src), "-o", str(out), *FAST]) == 1
    err = capsys.readouterr().err
    assert f"{src}:2: skipped: invalid JSON" in err
    assert f"{src}:4: skipped: no 'prompt' or 'messages' field" in err
    rows = {r["id"]: r for r in lines(out)}
    assert set(rows) == {"a", "b", 2, "c"}
    assert rows["a"]["output"] and "error" not in rows["a"]
    assert rows["b"]["messages"][0]["content"] == "Name a colour." and rows["b"]["output"]
    assert rows[2]["error"].startswith("invalid JSON") and rows[2]["output"] is None
    assert rows["c"]["finish_reason"] == "error"


@pytest.mark.slow
def test_csv_with_column_template_and_system_same_rows_at_any_parallelism_and_sequentially(
    tmp_path,
):
    src = tmp_path / "q.csv"
    src.write_text(
        'id,question,lang\nx1,"Good morning, friend",French\nx2,Thank you,German\n',
        encoding="utf-8",
    )
    args = [
        "--column",
        "question",
        "--template",
        "Translate to {lang}: {question}",
        "--system",
        "Answer briefly.",
        "--temperature",
        "0",
        *FAST,
    ]
    batched, one, sequential = tmp_path / "b.jsonl", tmp_path / "one.jsonl", tmp_path / "s.jsonl"
    assert batch_process.main([str(src), "-o", str(batched), *args]) == 0
    assert batch_process.main([str(src), "-o", str(one), *args, "--parallel", "1"]) == 0
    assert (
        batch_process.main([str(src), "-o", str(sequential), "--engine", "sequential", *args]) == 0
    )
    b, o, s = ({r["id"]: r for r in lines(path)} for path in (batched, one, sequential))
    assert (
        set(b) == set(o) == set(s) == {"x1", "x2"} and b["x1"]["prompt"] == "Good morning, friend"
    )
    # The engine's greedy text does not depend on what runs beside a row.
    assert {k: (v["output"], v["usage"]) for k, v in b.items()} == {
        k: (v["output"], v["usage"]) for k, v in o.items()
    }
    # The backend renders the same conversation (same prompt tokens); its attention kernel
    # may round differently, so its text is only checked to be there.
    assert {k: v["usage"]["prompt_tokens"] for k, v in b.items()} == {
        k: v["usage"]["prompt_tokens"] for k, v in s.items()
    }
    assert all(v["output"] and "error" not in v for v in s.values())


@pytest.mark.slow
def test_resume_after_an_interrupted_run_gives_each_id_once(tmp_path, monkeypatch, capsys):
    src = tmp_path / "prompts.txt"
    src.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    real_write = batch.OutputWriter.write
    written = []

    def write_then_interrupt(self, outcome):
        record = real_write(self, outcome)
        written.append(record["id"])
        if len(written) == 2:
            raise KeyboardInterrupt  # as Ctrl-C between two rows
        return record

    monkeypatch.setattr(batch.OutputWriter, "write", write_then_interrupt)
    assert batch_process.main([str(src), "-o", str(out), *FAST]) == 130
    assert "--resume" in capsys.readouterr().err
    assert [r["id"] for r in lines(out)] == written
    with out.open("a", encoding="utf-8") as f:  # and a kill in the middle of a line
        f.write('{"id": 6, "prompt": "Count to th')
    monkeypatch.setattr(batch.OutputWriter, "write", real_write)

    assert batch_process.main([str(src), "-o", str(out), *FAST]) == 2  # refuses to clobber
    assert "--resume" in capsys.readouterr().err
    assert batch_process.main([str(src), "-o", str(out), "--resume", *FAST]) == 0
    assert "Resuming: 2 of 6 rows" in capsys.readouterr().out
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == [1, 2, 3, 4, 5, 6]
    assert batch_process.main([str(src), "-o", str(out), "--resume", *FAST]) == 0
    assert "Nothing to do: all 6 rows" in capsys.readouterr().out
    assert len(lines(out)) == 6


@pytest.mark.slow
def test_resume_after_the_process_is_killed(tmp_path):
    src = tmp_path / "prompts.jsonl"
    rows = [
        {"id": f"r{i}", "prompt": f"Write a short poem about the number {i}."} for i in range(12)
    ]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        str(SCRIPT),
        str(src),
        "-o",
        str(out),
        "--max-tokens",
        "48",
        "--parallel",
        "2",
        "--n-ctx",
        "256",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy()
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_text(encoding="utf-8").count("\n") >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = [r["id"] for r in lines(out)] if out.read_text(encoding="utf-8").endswith("\n") else None
    assert kept is None or 1 <= len(kept) < 12

    assert (
        batch_process.main(
            [str(src), "-o", str(out), "--resume", "--max-tokens", "4", "--n-ctx", "256"]
        )
        == 0
    )
    ids = [r["id"] for r in lines(out)]
    assert sorted(ids) == sorted(r["id"] for r in rows)  # none lost, none doubled


def test_usage_errors_exit_2_with_a_hint(tmp_path, capsys):
    assert batch_process.main([str(tmp_path / "none.txt"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "not found" in capsys.readouterr().err
    csv_file = tmp_path / "q.csv"
    csv_file.write_text("question\nHi\n", encoding="utf-8")
    assert batch_process.main([str(csv_file), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "--column" in capsys.readouterr().err
    doc = tmp_path / "q.docx"
    doc.write_text("x", encoding="utf-8")
    assert batch_process.main([str(doc), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "Unsupported input type" in capsys.readouterr().err
    txt = tmp_path / "p.txt"
    txt.write_text("Hi\n", encoding="utf-8")
    assert (
        batch_process.main([str(txt), "-o", str(tmp_path / "o.jsonl"), "--model", "no-such-model"])
        == 2
    )
    assert "Unknown model 'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        batch_process.main(["--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "examples:" in text and ".jsonl" in text
