"""Every command-line program against the same list of bad input.

For each program, one parametrised test feeds it the cases that apply to it: a missing file,
a folder where a file goes (or the other way round), an empty file, a wrong model name, a
corrupt GGUF (junk bytes), a wrong checksum, an over-long prompt, malformed JSON or YAML, a
wrong encoding, a port in use. Each case checks what the user sees: the exit code, a message
that says what to do, no traceback, and every file the user had left as it was. Ctrl-C, where
the real process and its signal are the point, is run in a subprocess at the end.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmlab import registry
from llmlab.registry import ModelSpec, Source

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "part3" / "data" / "docs"


def _script(relative: str):
    spec = importlib.util.spec_from_file_location(Path(relative).stem, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class Case:
    """One bad input: argv (``{name}`` is filled from the prepared files), what must happen."""

    argv: list[str]
    code: int
    says: str  # part of the message, the part that says what to do where there is one
    catalog: str | None = None  # content of $LLMLAB_HOME/models.yaml, if the case needs one
    setup: Callable[[dict[str, str]], None] | None = None  # more to prepare, given the files
    not_says: str | None = None


def case(id: str, argv: list[str], code: int, says: str, **more) -> pytest.param:
    return pytest.param(Case(argv, code, says, **more), id=id)


@pytest.fixture(scope="session")
def altered_copy(tmp_path_factory) -> Path:
    """The default model with one byte changed: same size, wrong sha256."""
    data = bytearray(registry.resolve().path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path_factory.mktemp("altered") / "altered.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def files(tmp_path, lab_home, altered_copy) -> dict[str, str]:
    """The user's files the cases point at, and catalog entries for the damaged models."""
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "folder").mkdir()
    (inputs / "empty.gguf").write_bytes(b"")
    (inputs / "junk.gguf").write_bytes(bytes(range(256)) * 400)
    original = registry.resolve().path
    with original.open("rb") as handle:
        (inputs / "truncated.gguf").write_bytes(handle.read(2_000_000))
    (inputs / "a_file").write_text("not a folder\n")
    (inputs / "empty.json").write_text("")
    (inputs / "broken.json").write_text('{"messages": [{"role": "user", "content": "Hi"')
    (inputs / "latin1.json").write_bytes('{"messages": [], "note": "café"}'.encode("latin-1"))
    (inputs / "docs").mkdir()
    (inputs / "docs" / "notes.txt").write_text("The makerspace opens at nine.\n")
    (inputs / "latin1.txt").write_bytes("Le café ouvre à neuf heures.\n".encode("latin-1"))
    (inputs / "empty.txt").write_text("")
    (inputs / "scan.pdf").write_bytes(b"%PDF-1.7\n\x00garbage")
    (inputs / "damaged_store").mkdir()
    (inputs / "damaged_store" / "chroma.sqlite3").write_bytes(b"not a database" * 100)
    default = registry.default_spec()
    entries = {
        "junk": inputs / "junk.gguf",
        "empty": inputs / "empty.gguf",
        "gone": inputs / "gone.gguf",
    }
    for name, path in entries.items():
        registry.save_user_entry(
            ModelSpec(
                name=name,
                source=Source(kind="path", path=str(path)),
                capabilities=["chat", "completion"],
            )
        )
    registry.save_user_entry(
        default.model_copy(
            update={
                "name": "altered",
                "tag": "latest",
                "default": False,
                "source": Source(kind="path", path=str(altered_copy)),
            }
        )  # fmt: skip
    )
    return {"dir": str(inputs), "home": str(lab_home), "store": str(tmp_path / "store")}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_case(main: Callable, item: Case, files: dict[str, str], capsys) -> tuple[str, str]:
    """Run ``main`` on the case; check the exit code, no traceback, the user's files kept."""
    home = Path(files["home"])
    if item.catalog is not None:
        (home / "models.yaml").write_bytes(item.catalog.encode("latin-1"))
    before = snapshot(Path(files["dir"])) | snapshot(home)
    argv = [arg.format(**files) for arg in item.argv]
    if item.setup:
        item.setup(files)
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    out, err = capsys.readouterr()
    assert code == item.code, out + err
    assert item.says in out + err, out + err
    assert "Traceback" not in out + err
    if item.not_says:
        assert item.not_says not in out + err
    after = snapshot(Path(files["dir"])) | snapshot(home)
    lost = {path for path, data in before.items() if after.get(path) != data}
    assert lost - {str(home / "verified.json")} == set(), f"changed or deleted: {lost}"
    return out, err


BROKEN_CATALOGS = [  # $LLMLAB_HOME/models.yaml, what the message says
    ("catalog-a-string", "just a string\n", "it holds a string. Fix or delete it."),
    ("catalog-bad-yaml", "models: [oops", "is not valid YAML (line 1"),
    ("catalog-entry-a-number", "models: [3]\n", "Entry 1 of"),
    ("catalog-latin1", "models:\n  - name: café\n", "is not UTF-8 text"),
]


def catalog_cases(argv: list[str], code: int) -> list:
    """The broken-catalog cases, for a program run with ``argv``, exiting with ``code``."""
    return [case(id, argv, code, says, catalog=text) for id, text, says in BROKEN_CATALOGS]


# --------------------------------------------------------------------------- simple_chat

LONG_PROMPT = "word " * 600

CHAT_CASES = [
    case("missing-model-file", ["--model", "{dir}/mine.gguf", "--prompt", "hi"], 2,
         "does not exist. Models are named from the catalog: add your GGUF file with"),
    case("history-is-a-folder", ["--history", "{dir}/folder", "--prompt", "hi"], 2,
         "is a folder; name a file in it"),
    case("history-under-a-file", ["--history", "{dir}/a_file/chat.json", "--prompt", "hi"], 2,
         "a_file is a file, not a folder"),
    case("empty-history", ["--history", "{dir}/empty.json", "--prompt", "hi"], 2,
         "pass another --history file"),
    case("wrong-model-name", ["--model", "smollm2-135m-instruc", "--prompt", "hi"], 2,
         "Did you mean: smollm2-135m-instruct"),
    case("corrupt-gguf", ["--model", "junk", "--prompt", "hi"], 2,
         "is not a GGUF model file (GGUF magic invalid). Convert the model to GGUF, or copy"),
    case("empty-gguf", ["--model", "empty", "--prompt", "hi"], 2,
         "is empty (0 bytes), so it holds no model"),
    case("model-file-gone", ["--model", "gone", "--prompt", "hi"], 2,
         "which does not exist. Re-add it with the right path"),
    case("wrong-checksum", ["--model", "altered", "--prompt", "hi"], 2,
         "does not match its sha256"),
    case("over-long-prompt", ["--ctx", "256", "--max-tokens", "8", "--prompt", LONG_PROMPT], 1,
         "over the context window of 256 tokens. Use a shorter prompt"),
    case("malformed-history", ["--history", "{dir}/broken.json", "--prompt", "hi"], 2,
         "is not valid JSON"),
    case("history-in-latin1", ["--history", "{dir}/latin1.json", "--prompt", "hi"], 2,
         "is not UTF-8 text"),
    case("negative-temperature", ["--temperature", "-1", "--prompt", "hi"], 2,
         "temperature must be 0, or at least 0.001 and at most 2 (0 is greedy), not -1.0"),
    case("temperature-too-small-to-sample", ["--temperature", "0.0001", "--prompt", "hi"], 2,
         "temperature must be 0, or at least 0.001"),
    case("top-p-above-1", ["--top-p", "5", "--prompt", "hi"], 2,
         "top_p must be above 0 and at most 1"),
    case("max-tokens-0", ["--max-tokens", "0", "--prompt", "hi"], 2,
         "max_tokens must be at least 1"),
    case("context-too-large", ["--ctx", "10000000", "--prompt", "hi"], 2,
         "the model file itself is fine. smollm2-135m-instruct:q4_1 was trained on a context "
         "of 8,192 tokens: pass at most that, e.g. --ctx 8192", not_says="corrupt"),
    *catalog_cases(["--prompt", "hi"], 2),
]  # fmt: skip


@pytest.mark.parametrize("item", CHAT_CASES)
def test_simple_chat(item, files, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    run_case(_script("part3/simple_chat.py").main, item, files, capsys)


# --------------------------------------------------------------------------- document_qa

QA_CASES = [
    case("missing-path", ["ingest", "{dir}/missing.txt"], 2, "does not exist"),
    case("db-is-a-file", ["ingest", "{dir}/docs", "--db", "{dir}/a_file"], 2,
         "is a file, not a folder. Name a folder for the store (--db)"),
    case("empty-file", ["ingest", "{dir}/empty.txt", "--db", "{store}"], 1,
         "has no text to index. Add some, or leave it out."),
    case("wrong-embedding-model", ["ingest", "{dir}/docs", "--embedding-model", "minilm"], 2,
         "Unknown model 'minilm'"),
    case("damaged-pdf", ["ingest", "{dir}/scan.pdf", "--db", "{store}"], 1,
         "skipped (unreadable):"),
    case("latin1-text", ["ingest", "{dir}/latin1.txt", "--db", "{store}"], 1,
         "is not UTF-8 text (invalid continuation byte). Save it as UTF-8."),
    case("damaged-store", ["list", "--db", "{dir}/damaged_store"], 2,
         "it is damaged or not a Chroma store. Move the folder aside"),
    *catalog_cases(["ingest", "{dir}/docs"], 2),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("item", QA_CASES)
def test_document_qa(item, files, capsys):
    run_case(_script("part3/document_qa.py").main, item, files, capsys)


ASK = ["ask", "--db", "{store}", "--threshold", "0"]  # threshold 0: always ask the model
ASK_CASES = [
    case("wrong-chat-model", [*ASK, "When does it open?", "--model", "nope"], 2,
         "Unknown model 'nope'"),
    case("corrupt-gguf", [*ASK, "When does it open?", "--model", "junk"], 1,
         "is not a GGUF model file"),
    case("wrong-checksum", [*ASK, "When does it open?", "--model", "altered"], 2,
         "does not match its sha256"),
    case("over-long-question", [*ASK, "When does the makerspace open? " * 600], 2,
         "The question is too long: with the passages it needs"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("item", ASK_CASES)
def test_document_qa_ask(item, files, capsys):
    main = _script("part3/document_qa.py").main
    assert main(["ingest", f"{files['dir']}/docs", "--db", files["store"]]) == 0
    capsys.readouterr()
    run_case(main, item, files, capsys)


# --------------------------------------------------------------------------- quantize

QUANTIZE_CASES = [
    case("model-file-gone", ["--model", "gone", "q8_0"], 2, "which does not exist"),
    case("output-is-a-folder", ["q8_0"], 2, "is a folder, but the q8_0 file is written there. "
         "Move or delete that folder", setup=lambda files: _variant("q8_0").mkdir(parents=True)),
    case("empty-gguf", ["--model", "empty", "q8_0"], 2, "is empty (0 bytes)"),
    case("wrong-model-name", ["--model", "smolm2", "q8_0"], 2, "Did you mean"),
    case("not-a-chat-model", ["--model", "all-minilm-l6-v2", "q8_0"], 2,
         "is not a GGUF chat model (sentence-transformers, for embeddings)"),
    case("corrupt-gguf", ["--model", "junk", "q8_0"], 2, "is not a GGUF model file"),
    case("wrong-checksum", ["--model", "altered", "q8_0"], 2, "does not match its sha256"),
    case("unknown-type", ["q9_z"], 2, "Unknown quantization q9_z. Use: f16, q8_0"),
    *catalog_cases(["q8_0"], 2),
]  # fmt: skip


def _variant(tag: str) -> Path:
    from llmlab import quantize

    return quantize.variant_path(tag, registry.default_spec())


@pytest.mark.parametrize("item", QUANTIZE_CASES)
def test_quantize(item, files, capsys):
    from llmlab import quantize

    run_case(quantize.main, item, files, capsys)
    assert not list(Path(files["home"]).rglob("*.partial"))


# --------------------------------------------------------------------------- model registry

REGISTRY_CASES = [
    case("add-missing-file", ["add", "{dir}/missing.gguf", "--name", "mine"], 2,
         "does not exist or is not a file. Check the path."),
    case("add-a-folder", ["add", "{dir}/folder", "--name", "mine"], 2,
         "is a folder, not a file. Name the .gguf file in it."),
    case("add-empty-file", ["add", "{dir}/empty.gguf", "--name", "mine"], 1,
         "is empty (0 bytes), so it holds no model"),
    case("wrong-model-name", ["show", "smollm2-135m-instruc"], 2, "Did you mean"),
    case("add-junk", ["add", "{dir}/junk.gguf", "--name", "mine"], 1,
         "is not a GGUF model file (GGUF magic invalid). Convert the model to GGUF"),
    case("add-truncated-gguf", ["add", "{dir}/truncated.gguf", "--name", "mine"], 1,
         "starts as a GGUF file but is truncated or damaged"),
    case("verify-wrong-checksum", ["verify", "altered"], 1, "does not match its sha256"),
    case("verify-gone", ["verify", "gone"], 2, "Re-add it with the right path"),
    *catalog_cases(["list"], 1),
]  # fmt: skip


@pytest.mark.parametrize("item", REGISTRY_CASES)
def test_model_registry(item, files, capsys):
    from llmlab.registry_cli import main

    run_case(main, item, files, capsys)


def test_a_damaged_verified_cache_is_only_a_cache(files, capsys, lab_home):
    from llmlab.registry_cli import main

    (lab_home / "verified.json").write_text("{half a cache")
    assert main(["verify", "smollm2-135m-instruct"]) == 0
    assert "sha256 OK" in capsys.readouterr().out


# --------------------------------------------------------------------------- server

SERVER_CASES = [
    case("port-in-use", ["--port", "{busy_port}"], 2,
         "is already in use (another server?). Stop it, or pick another port with --port."),
    case("wrong-model-name", ["--model", "smollm2-135m-instruc"], 2, "Did you mean"),
    case("not-a-chat-model", ["--model", "all-minilm-l6-v2"], 2, "Serve a chat model"),
    case("corrupt-gguf", ["--model", "junk"], 2, "is not a GGUF model file"),
    case("empty-gguf", ["--model", "empty"], 2, "is empty (0 bytes)"),
    case("model-file-gone", ["--model", "gone"], 2, "Re-add it with the right path"),
    case("wrong-checksum", ["--model", "altered"], 2, "does not match its sha256"),
    *catalog_cases([], 2),
]  # fmt: skip


@pytest.mark.parametrize("item", SERVER_CASES)
def test_server(item, files, capsys):
    from part5.combined_app.scripts.server import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        files = files | {"busy_port": str(busy.getsockname()[1])}
        run_case(main, item, files, capsys)


# --------------------------------------------------------------------------- Ctrl-C


def _interrupt_when(command: list[str], ready: Callable[[str], bool], home: Path):
    """Run ``command``, send SIGINT once a line of its output passes ``ready``; return
    (exit code, stdout, stderr)."""
    env = {**os.environ, "LLMLAB_HOME": str(home), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
        # As from a terminal: Ctrl-C's default action, even if a test before this one left
        # SIGINT ignored in pytest's process (a child inherits an ignored signal).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if ready(line):
            process.send_signal(signal.SIGINT)
            break
    out, err = process.communicate(timeout=300)
    return process.returncode, "".join(seen) + out, err


# Ctrl-C must land while the work is under way, however fast this machine is: the child
# runs the real program with one function wrapped to wait for the signal at that point.
_PAUSED = """
import runpy, signal, sys
{patch}
def pause():
    sys.stdout.flush()  # the test reads the line printed before this point
    signal.pause()  # the test's SIGINT arrives here, as KeyboardInterrupt
target, sys.argv = sys.argv[1], sys.argv[1:]
run = runpy.run_module if target.startswith("llmlab.") else runpy.run_path
run(target, run_name="__main__")
"""
_PAUSE_BEFORE_TENSORS = """
import gguf
real = gguf.GGUFWriter.write_tensors_to_file
def write_tensors(self, *args, **kwargs):
    pause()  # header written: the .partial file exists, half done
    return real(self, *args, **kwargs)
gguf.GGUFWriter.write_tensors_to_file = write_tensors
"""
_PAUSE_AFTER_FIRST_FILE = """
from llmlab.rag import store
real = store.DocumentStore.ingest
def ingest(self, *args, progress=None, **kwargs):
    def report(outcome):
        progress(outcome)
        if outcome.status == "added":
            pause()  # one file stored whole, the others not started
    return real(self, *args, progress=report, **kwargs)
store.DocumentStore.ingest = ingest
"""


def _paused(patch: str, *command: str) -> list[str]:
    """``python command...`` with ``patch`` applied first (it may call ``pause()``)."""
    return [sys.executable, "-c", _PAUSED.format(patch=patch), *command]


@pytest.mark.slow
def test_ctrl_c_in_quantize_removes_the_half_written_file(lab_home):
    code, out, err = _interrupt_when(
        _paused(_PAUSE_BEFORE_TENSORS, "llmlab.quantize", "q8_0"),
        lambda line: line.startswith("writing"),  # the .partial is being written now
        lab_home,
    )
    assert code == 130, out + err
    assert "Interrupted. The file being written was removed" in err
    assert "Traceback" not in out + err
    assert not list(lab_home.rglob("*.partial"))


@pytest.mark.slow
def test_ctrl_c_in_ingest_keeps_each_finished_file_whole(lab_home, tmp_path):
    from llmlab.rag import DocumentStore

    script = [sys.executable, str(ROOT / "part3" / "document_qa.py")]
    code, out, err = _interrupt_when(
        _paused(_PAUSE_AFTER_FIRST_FILE, *script[1:], "ingest", str(DOCS)),
        lambda line: line.startswith("added"),
        lab_home,
    )
    assert code == 130, out + err
    assert "Traceback" not in out + err
    assert "those done are kept, each one whole. Run the same command again" in out
    # (A set: Ctrl-C inside rich's print can leave its last line in the buffer, printed twice.)
    done = {  # file name: chunks, from lines such as "added     docs/faq.md (5 chunks)"
        Path(line.split()[1]).name: int(line.split("(")[-1].split()[0])
        for line in out.splitlines()
        if line.startswith("added")
    }
    assert 1 <= len(done) < 8
    # What is stored is exactly the files reported, each with all its chunks.
    stored = DocumentStore(db_dir=lab_home / "rag").sources()
    assert {Path(source).name: len(entry["ids"]) for source, entry in stored.items()} == done
    run = subprocess.run(
        [*script, "ingest", str(DOCS)],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMLAB_HOME": str(lab_home), "PYTHONPATH": str(ROOT)},
        cwd=ROOT,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert f"{len(done)} unchanged" in run.stdout and f"{8 - len(done)} added" in run.stdout


@pytest.mark.slow
def test_an_upload_with_a_400_character_name_keeps_its_extension(lab_home):
    from fastapi.testclient import TestClient

    from part5.combined_app import ServerSettings, create_app

    name = "n" * 396 + ".txt"
    with TestClient(create_app(ServerSettings(threads=1, home=lab_home))) as client:
        sent = ("files", (name, b"The makerspace opens at nine.\n", "text/plain"))
        r = client.post("/api/collections/notes/files", files=[sent])
    assert r.status_code == 200, r.text
    (saved,) = (lab_home / "uploads" / "notes").iterdir()
    assert saved.name == "n" * 196 + ".txt"
    assert [f["status"] for f in r.json()["files"]] == ["added"]
