"""part3/batch_process.py end to end on the default model: every input format, malformed
rows, resume after an interrupted and after a killed run, and every bad input (one
parametrised test: the message, the exit code, no traceback, nothing finished lost)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmlab import batch, registry

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


# --- every bad input at once ---------------------------------------------------------------


@dataclass
class Step:
    """One run of the program: its arguments, exit code and the phrases it must print."""

    args: list[str]
    code: int
    says: list[str]
    interrupt_after: int | None = None  # Ctrl-C after this many rows are written


@dataclass
class Case:
    files: Callable[[Path], None]  # writes the case's files into the (current) folder
    steps: list[Step]
    ids: list | None = None  # every input id, once each, in out.jsonl at the end


def _prompts_txt(folder: Path, n: int = 4) -> None:
    (folder / "in.txt").write_text("\n".join(QUESTIONS[:n]) + "\n", encoding="utf-8")


def _finished_output(folder: Path, n: int = 6, damaged_line: int | None = None) -> None:
    """in.txt with ``n`` prompts and out.jsonl holding results for all but the last one."""
    _prompts_txt(folder, n)
    records = [
        {
            "id": i,
            "prompt": QUESTIONS[i - 1],
            "output": f"answer {i}",
            "finish_reason": "stop",
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
            "seconds": 0.1,
        }
        for i in range(1, n)
    ]
    lines = [json.dumps(r) for r in records]
    if damaged_line:
        lines[damaged_line - 1] = lines[damaged_line - 1][:25] + "\x00 torn"
    (folder / "out.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _register_default_copy(folder: Path, name: str, damage: Callable[[Path], None]) -> None:
    """Register a copy of the default model as ``name``, then damage the copy."""
    _prompts_txt(folder, 2)
    copy = folder / "copy.gguf"
    shutil.copyfile(registry.resolve().path, copy)
    registry.add(copy, name=name)
    damage(copy)


def _junk_same_size(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes((b"not a model " * (size // 12 + 1))[:size])


def _junk_registered_without_checksum(folder: Path) -> None:
    """A hand-written catalog entry pointing at a file of junk bytes (no size or sha256)."""
    _prompts_txt(folder, 2)
    (folder / "junk.gguf").write_bytes(b"\x00junk" * 1000)
    spec = registry.ModelSpec(
        name="junk",
        format="gguf",
        capabilities=["chat"],
        source=registry.Source(kind="path", path=str(folder / "junk.gguf")),
        user=True,
    )
    registry.save_user_entry(spec)


OUT = ["-o", "out.jsonl", *FAST]

CASES = {
    "missing input file": Case(
        lambda d: None,
        [Step(["none.txt", *OUT], 2, ["input file none.txt not found", "Pass a .jsonl"])],
    ),
    "a folder for the input file": Case(
        lambda d: (d / "docs").mkdir(),
        [Step(["docs", *OUT], 2, ["docs is a folder", "Pass one .jsonl, .csv or .txt file"])],
    ),
    "empty input file": Case(
        lambda d: (d / "in.txt").write_text("\n\n", encoding="utf-8"),
        [Step(["in.txt", *OUT], 2, ["in.txt holds no prompts", "Add one prompt a line"])],
    ),
    "a CSV with only its header": Case(
        lambda d: (d / "in.csv").write_text("prompt\n", encoding="utf-8"),
        [Step(["in.csv", *OUT], 2, ["in.csv holds no prompts", "and a header"])],
    ),
    "a folder for the output file": Case(
        lambda d: (_prompts_txt(d), (d / "results").mkdir()),
        [Step(["in.txt", "-o", "results"], 2, ["-o results is a folder", "results/answers.jsonl"])],
    ),
    "the input file as the output": Case(
        _prompts_txt,
        [Step(["in.txt", "-o", "in.txt", "--overwrite"], 2, ["is the input file"])],
    ),
    "wrong model name": Case(
        _prompts_txt,
        [Step(["in.txt", *OUT, "--model", "smolm2"], 2, ["Unknown model 'smolm2'", "list"])],
    ),
    "a GGUF path instead of a model name": Case(
        lambda d: (_prompts_txt(d), (d / "junk.gguf").write_bytes(b"junk" * 100)),
        [
            Step(
                ["in.txt", *OUT, "--model", "junk.gguf"],
                2,
                ["is a file, not a catalog name", "model_registry.py add PATH"],
            )
        ],
    ),
    "corrupt GGUF registered without a checksum": Case(
        _junk_registered_without_checksum,
        [
            Step(
                ["in.txt", *OUT, "--model", "junk"],
                2,
                ["junk.gguf is not a GGUF model file", "Convert the model to GGUF"],
            ),
            Step(
                ["in.txt", *OUT, "--model", "junk", "--engine", "sequential"],
                2,
                ["junk.gguf is not a GGUF model file"],
            ),
        ],
    ),
    "registered GGUF overwritten (wrong checksum)": Case(
        lambda d: _register_default_copy(d, "mine", _junk_same_size),
        [
            Step(
                ["in.txt", *OUT, "--model", "mine"],
                2,
                ["does not match its sha256", "model_registry.py remove mine:latest"],
            )
        ],
    ),
    "registered GGUF truncated": Case(
        lambda d: _register_default_copy(d, "cut", lambda p: os.truncate(p, 4096)),
        [Step(["in.txt", *OUT, "--model", "cut"], 2, ["has 4096 bytes", "truncated or corrupt"])],
    ),
    "a prompt too long for the context, then --resume": Case(
        lambda d: (d / "in.jsonl").write_text(
            json.dumps({"id": "a", "prompt": "Say hello."})
            + "\n"
            + json.dumps({"id": "long", "prompt": "word " * 400})
            + "\n"
            + json.dumps({"id": "b", "prompt": "Name a colour."})
            + "\n",
            encoding="utf-8",
        ),
        [
            Step(
                ["in.jsonl", *OUT],
                1,
                [
                    "in.jsonl:2: failed: ContextOverflowError",
                    "context window of 256",
                    "--max-tokens",
                    "--ctx",
                    "Done: 3 rows",
                ],
            ),
            Step(["in.jsonl", *OUT, "--resume"], 0, ["Nothing to do: all 3 rows"]),
        ],
        ids=["a", "long", "b"],
    ),
    "malformed JSON lines": Case(
        lambda d: (d / "in.jsonl").write_text(
            '{"id": "a", "prompt": "Say hello."}\n{oops\n[1]\n{"id": "a", "prompt": "x"}\n',
            encoding="utf-8",
        ),
        [
            Step(
                ["in.jsonl", *OUT],
                1,
                [
                    "in.jsonl:2: skipped: invalid JSON",
                    "in.jsonl:3: skipped: expected a JSON object",
                    "in.jsonl:4: skipped: duplicate id 'a'",
                ],
            )
        ],
        ids=["a", 2, 3, "line 4"],
    ),
    "malformed CSV lines": Case(
        lambda d: (d / "in.csv").write_text(
            'id,prompt\nx,"Say hello."\ny,too,many\nz,\n', encoding="utf-8"
        ),
        [
            Step(
                ["in.csv", *OUT],
                1,
                [
                    "in.csv:3: skipped: more cells than columns",
                    "in.csv:4: skipped: 'prompt' is empty",
                ],
            )
        ],
        ids=["x", 2, "z"],
    ),
    "a CSV without the prompt column": Case(
        lambda d: (d / "in.csv").write_text("question\nHi\n", encoding="utf-8"),
        [Step(["in.csv", *OUT], 2, ["no 'prompt' column", "--column"])],
    ),
    "a Latin-1 text file, then --encoding": Case(
        lambda d: (d / "in.txt").write_bytes("Say hello.\nCaf\u00e9?\n".encode("latin-1")),
        [
            Step(
                ["in.txt", *OUT],
                2,
                [
                    "in.txt:2: byte 0xe9 (column 4) is not utf-8 text",
                    "Re-save the file as UTF-8",
                    "--encoding cp1252",
                ],
            ),
            Step(["in.txt", *OUT, "--encoding", "latin-1"], 0, ["Done: 2 rows"]),
        ],
        ids=[1, 2],
    ),
    "an interrupted run, then --resume": Case(
        lambda d: _prompts_txt(d, 6),
        [
            Step(["in.txt", *OUT], 130, ["Interrupted: 2 rows", "--resume"], interrupt_after=2),
            Step(["in.txt", *OUT], 2, ["already has results", "--resume"]),
            Step(["in.txt", *OUT, "--resume"], 0, ["Resuming: 2 of 6 rows"]),
        ],
        ids=[1, 2, 3, 4, 5, 6],
    ),
    "a damaged line in the middle of the output, then --resume": Case(
        lambda d: _finished_output(d, 6, damaged_line=3),
        [
            Step(
                ["in.txt", *OUT, "--resume"],
                0,
                [
                    "out.jsonl:3: damaged line (not valid JSON)",
                    "out.jsonl.damaged",
                    "Resuming: 4 of 6 rows",
                ],
            )
        ],
        ids=[1, 2, 3, 4, 5, 6],
    ),
    "--resume into a file of notes": Case(
        lambda d: (_prompts_txt(d), (d / "notes.txt").write_text("my notes\n", encoding="utf-8")),
        [
            Step(
                ["in.txt", "-o", "notes.txt", "--resume"],
                2,
                ["notes.txt is not a results file", "Choose another -o file"],
            ),
            Step(["in.txt", "-o", "notes.txt", "--overwrite"], 2, ["is not a results file"]),
        ],
    ),
}


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _nothing_finished_lost(before: dict[Path, bytes], folder: Path) -> None:
    """Every file is as it was, except the output, which kept each finished line it had
    (a damaged one moved to OUTPUT.damaged)."""
    for path, data in before.items():
        if path.name != "out.jsonl":
            if path.name != "copy.gguf":  # the damaged model copies stay damaged
                assert path.read_bytes() == data, f"{path.name} changed"
            continue
        now = path.read_bytes().splitlines() + (
            path.with_name("out.jsonl.damaged").read_bytes().splitlines()
            if path.with_name("out.jsonl.damaged").exists()
            else []
        )
        assert all(line in now for line in data.splitlines()), "a finished row was lost"


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
def test_every_bad_input_gets_a_message_the_right_exit_code_and_loses_nothing(
    case, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    case.files(tmp_path)
    real_write = batch.OutputWriter.write
    for step in case.steps:
        before = _snapshot(tmp_path)
        monkeypatch.setattr(batch.OutputWriter, "write", real_write)
        if step.interrupt_after:

            def write_then_interrupt(self, outcome, limit=step.interrupt_after):
                record = real_write(self, outcome)
                if self.written == limit:
                    raise KeyboardInterrupt  # as Ctrl-C between two rows
                return record

            monkeypatch.setattr(batch.OutputWriter, "write", write_then_interrupt)
        code = batch_process.main(step.args)
        out, err = capsys.readouterr()
        said = out + err
        assert code == step.code, said
        for phrase in step.says:
            assert phrase in said, f"{phrase!r} not in:\n{said}"
        assert "Traceback" not in said
        if code == 2:
            assert err.startswith("error: ") and not out, said
        _nothing_finished_lost(before, tmp_path)
    if case.ids is not None:
        ids = [r["id"] for r in lines(tmp_path / "out.jsonl")]
        assert sorted(map(json.dumps, ids)) == sorted(map(json.dumps, case.ids))


@pytest.mark.slow
def test_the_default_model_runs_as_a_q8_0_made_once_and_exact_model_keeps_the_shipped_file(
    tmp_path, capsys, monkeypatch
):
    import llmlab.engine
    from llmlab.registry import kernels
    from part5.combined_app.scripts.server import main as server_main

    if "Q4_1" in kernels.batched_formats(kernels.build_features()):
        pytest.skip("Q4_1 has a batched kernel in this build (AMX): nothing to choose")
    monkeypatch.delenv("LLMLAB_EXACT_MODEL")  # the suite runs the shipped file by default
    loaded: list[Path] = []
    real_engine = llmlab.engine.Engine

    def engine(spec, **kwargs):
        loaded.append(spec.path)
        return real_engine(spec, **kwargs)

    monkeypatch.setattr(llmlab.engine, "Engine", engine)
    src, out = tmp_path / "prompts.txt", tmp_path / "out.jsonl"
    src.write_text("\n".join(QUESTIONS[:2]) + "\n", encoding="utf-8")
    shipped = registry.resolve().path
    choice = re.compile(
        r"using smollm2-135m-instruct Q8_0 \(made from the shipped Q4_1: batched kernels here, "
        r"KL 0\.0[01]\d < 0\.02\); --exact-model keeps the file as given"
    )

    assert batch_process.main([str(src), "-o", str(out), *FAST]) == 0
    first = capsys.readouterr().out
    assert "Making smollm2-135m-instruct Q8_0 from the Q4_1 file" in first
    assert choice.search(first) and "Done: 2 rows" in first
    assert loaded[-1].name == "SmolLM2-135M-Instruct.Q8_0.gguf" and loaded[-1] != shipped
    assert all(row["output"] for row in lines(out))

    assert batch_process.main([str(src), "-o", str(out), "--overwrite", *FAST]) == 0
    second = capsys.readouterr().out  # the cached variant: no making, the same choice
    assert "Making" not in second and choice.search(second).group() == choice.search(first).group()

    assert (
        batch_process.main([str(src), "-o", str(out), "--overwrite", "--exact-model", *FAST]) == 0
    )
    exact = capsys.readouterr().out
    assert loaded[-1] == shipped and not choice.search(exact)
    assert "using smollm2-135m-instruct Q4_1 as given (--exact-model)" in exact
    assert len(lines(out)) == 2

    with socket.socket() as busy:  # the server script decides the same way, from the cache
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert server_main(["--port", str(busy.getsockname()[1])]) == 2
    served = capsys.readouterr().out
    assert choice.search(served) and "Making" not in served
