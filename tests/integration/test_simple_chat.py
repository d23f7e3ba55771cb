"""part3/simple_chat.py driven through main() with scripted stdin, against the real default
model (SmolLM2-135M-Instruct Q4_1 on llama.cpp), greedy and with short replies."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "part3" / "simple_chat.py"
FAST = ["--temperature", "0", "--max-tokens", "8", "--ctx", "512"]


def _load_script():
    spec = importlib.util.spec_from_file_location("simple_chat", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


simple_chat = _load_script()


@pytest.fixture
def chat(monkeypatch, capsys):
    """Run main(args) with ``lines`` as the typed input; return (exit code, stdout, stderr)."""

    def run(lines: list[str] | None, *args: str) -> tuple[int, str, str]:
        text = "".join(f"{line}\n" for line in lines or [])
        monkeypatch.setattr(sys, "stdin", io.StringIO(text))
        code = simple_chat.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def _messages(path: Path) -> list[dict]:
    return json.loads(path.read_text())["messages"]


@pytest.mark.slow
def test_a_normal_exchange_streams_a_reply_and_shows_stats(chat):
    code, out, err = chat(["What is the capital of France?", "/stats", "/exit"], *FAST)
    assert code == 0, err
    assert "Chatting with smollm2-135m-instruct:q4_1 (llama.cpp, context 512 tokens)" in out
    reply = out.split("you> What is the capital of France?\n", 1)[1].split("\n", 1)[0]
    assert reply.strip(), out
    assert "replies: 1" in out and "messages: 2" in out and "context_length: 512" in out
    assert "\x1b[" not in out + err  # captured output is not a terminal: plain text


@pytest.mark.slow
def test_ctrl_c_while_printing_stops_the_reply_and_the_chat_goes_on(chat, monkeypatch, tmp_path):
    shown: list[str] = []
    original = simple_chat.Ui.piece

    def piece(self, text):
        if len(shown) == 2 and not getattr(piece, "fired", False):
            piece.fired = True
            raise KeyboardInterrupt  # the user presses Ctrl-C on the third piece
        shown.append(text)
        original(self, text)

    monkeypatch.setattr(simple_chat.Ui, "piece", piece)
    saved = tmp_path / "chat.json"
    lines = ["Tell me a long story about a dragon.", "Say hello.", f"/save {saved}", "/exit"]
    code, out, err = chat(lines, *FAST)
    assert code == 0, err
    assert "[reply interrupted; the partial reply is kept in the history]" in out
    messages = _messages(saved)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["interrupted"] is True
    # What was shown is kept (plus the piece that arrived as Ctrl-C was pressed).
    assert messages[1]["content"].startswith("".join(shown[:2])) and shown[1]
    assert messages[1]["usage"]["completion_tokens"] <= 3
    assert messages[3]["content"].strip() and "interrupted" not in messages[3]


@pytest.mark.slow
def test_ctrl_c_inside_the_engine_keeps_the_partial_reply(chat, monkeypatch, tmp_path):
    from llmlab.backends.llamacpp import LlamaCppBackend

    original = LlamaCppBackend._steps

    def steps(self, prompt_ids, params, grammar=None):
        for n, step in enumerate(original(self, prompt_ids, params, grammar)):
            if n == 3:
                raise KeyboardInterrupt  # Ctrl-C lands while llama.cpp is decoding
            yield step

    monkeypatch.setattr(LlamaCppBackend, "_steps", steps)
    history = tmp_path / "h.json"
    code, out, err = chat(["Count from one to ten."], *FAST, "--history", str(history))
    assert code == 0, err
    assert "reply interrupted" in out
    reply = _messages(history)[-1]
    assert reply["interrupted"] is True and reply["usage"]["completion_tokens"] == 3


@pytest.mark.slow
def test_save_then_load_round_trips_the_transcript(chat, tmp_path):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    lines = [
        "/system You answer in one short sentence.",
        "Name a fruit.",
        f"/save {first}",
        "/reset",
        "/stats",
        f"/load {first}",
        f"/save {second}",
        "/exit",
    ]
    code, out, err = chat(lines, *FAST)
    assert code == 0, err
    assert "[conversation cleared]" in out and "messages: 0" in out
    assert f"[loaded 2 messages from {first}]" in out
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    assert a["messages"] == b["messages"]
    assert a["messages"][0] == {
        "role": "system",
        "content": "You answer in one short sentence.",
        "tokens": a["messages"][0]["tokens"],
    }
    assert a["model"] == "smollm2-135m-instruct:q4_1"
    assert a["parameters"]["temperature"] == 0.0 and a["parameters"]["max_tokens"] == 8
    assert a["messages"][2]["timings"]["time_to_first_token"] > 0
    assert a["messages"][2]["usage"]["prompt_tokens"] > 0


@pytest.mark.slow
def test_an_overflowing_history_drops_old_turns_and_still_answers(chat, tmp_path):
    history = tmp_path / "long.json"
    # About 35 tokens a turn with SmolLM2's template; 128 - 16 leaves room for two turns.
    questions = [f"Question {i}: one sentence about the number {i}." for i in range(4)]
    args = ["--temperature", "0", "--max-tokens", "16", "--ctx", "128", "--history", str(history)]
    code, out, err = chat(questions, *args)
    assert code == 0, err
    assert "[dropped the oldest 1 turn (2 messages, " in out
    assert "tokens) to fit the 128-token context]" in out
    messages = _messages(history)
    assert messages[0]["content"] != questions[0]  # the oldest turns are gone
    assert messages[-2]["content"] == questions[-1]
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()


@pytest.mark.slow
def test_slash_commands_and_empty_input(chat):
    lines = [
        "",
        "   ",
        "/help",
        "/system Answer in one word.",
        "/system",
        "/params temperature=0.2 top_p=0.9",
        "/params temperature=hot",
        "/params max_tokens",
        "/model no-such-model",
        "/load does-not-exist.json",
        "/frobnicate",
        "/exit",
    ]
    code, out, err = chat(lines, *FAST)
    assert code == 0
    assert "/params [k=v ...]" in out  # the help list
    assert "system prompt: Answer in one word." in out
    assert "temperature: 0.2" in out and "top_p: 0.9" in out
    assert "error: temperature must be a number, not 'hot'." in err
    assert "error: Write parameters as name=value" in err
    assert (
        "Unknown model 'no-such-model'" in err
        and "Still chatting with smollm2-135m-instruct:q4_1." in err
    )
    assert "error: No such file: does-not-exist.json." in err
    assert "error: Unknown command /frobnicate. Type /help for the list." in err
    assert "you> " in out and out.count("you> ") == len(lines)  # nothing was sent for blank lines
    assert len(err.strip().splitlines()) == 5  # one line per problem


@pytest.mark.slow
def test_prompt_with_json_prints_one_object(chat):
    code, out, err = chat(None, *FAST, "--prompt", "Name a colour.", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "smollm2-135m-instruct:q4_1"
    assert data["reply"].strip() and data["finish_reason"] in ("stop", "length")
    assert data["usage"]["prompt_tokens"] > 0 and 0 < data["usage"]["completion_tokens"] <= 8
    assert set(data["timings"]) >= {"time_to_first_token", "total_seconds", "tokens_per_second"}


@pytest.mark.slow
def test_prompt_dash_reads_the_question_from_stdin(chat):
    code, out, err = chat(["What colour is the sky?"], *FAST, "--prompt", "-", "--no-stream")
    assert code == 0, err
    assert out.strip() and "you>" not in out and "Chatting with" not in out


@pytest.mark.slow
def test_history_resumes_and_keeps_saving(chat, tmp_path):
    history = tmp_path / "resume.json"
    code, _, err = chat(
        None, *FAST, "--system", "Be brief.", "--prompt", "Hi!", "--history", str(history)
    )
    assert code == 0, err
    assert [m["role"] for m in _messages(history)] == ["system", "user", "assistant"]
    # Second session: no /exit, the input just ends (Ctrl-D); the history must still be saved.
    code, out, err = chat(["How are you?"], *FAST, "--history", str(history))
    assert code == 0, err
    assert f"[resumed 2 messages from {history}]" in out
    assert f"[history saved to {history}]" in out
    messages = _messages(history)
    assert [m["content"] for m in messages[:2]] == ["Be brief.", "Hi!"]
    assert messages[3]["content"] == "How are you?" and messages[4]["role"] == "assistant"


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_exits_cleanly_and_saves(chat, monkeypatch, tmp_path):
    answers = iter(["Hello!"])

    def typed(prompt=""):
        print(prompt, end="")
        try:
            return next(answers)
        except StopIteration:
            raise KeyboardInterrupt from None

    monkeypatch.setattr("builtins.input", typed)
    history = tmp_path / "ctrl-c.json"
    code, out, err = chat(None, *FAST, "--history", str(history))
    assert code == 0, err
    assert [m["role"] for m in _messages(history)] == ["user", "assistant"]
    assert f"[history saved to {history}]" in out


def test_unknown_model_exits_2_with_a_suggestion(chat):
    code, out, err = chat(None, "--model", "smollm2-135m-instruc", "--prompt", "hi")
    assert code == 2
    assert err.count("\n") == 1
    assert "Unknown model 'smollm2-135m-instruc'. Did you mean: smollm2-135m-instruct" in err
    assert "python part5/model_registry.py list" in err


def test_a_missing_model_file_exits_2(chat, tmp_path):
    code, out, err = chat(None, "--model", str(tmp_path / "mine.gguf"), "--prompt", "hi")
    assert code == 2
    assert err.count("\n") == 1
    assert "mine.gguf does not exist" in err and "model_registry.py add PATH" in err


def test_unreachable_server_exits_2_saying_what_to_do(chat):
    code, out, err = chat(
        None,
        "--backend",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "x",
        "--prompt",
        "hi",
    )
    assert code == 2
    assert err.count("\n") == 1
    assert "Cannot reach the model server at http://127.0.0.1:9/v1" in err and "--base-url" in err


def test_a_corrupt_history_file_is_not_overwritten(chat, tmp_path):
    history = tmp_path / "broken.json"
    history.write_text("{ half a file")
    code, out, err = chat(None, "--history", str(history), "--prompt", "hi")
    assert code == 2
    assert "is not valid JSON" in err and "pass another --history file" in err
    assert history.read_text() == "{ half a file"


def test_json_without_prompt_is_a_usage_error(chat):
    with pytest.raises(SystemExit) as exc:
        chat(None, "--json")
    assert exc.value.code == 2


@pytest.mark.slow
def test_piped_output_is_plain_and_a_terminal_gets_colour(chat, monkeypatch):
    run = subprocess.run(
        [sys.executable, str(SCRIPT), *FAST],
        input="Hi there\n/stats\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "you> Hi there" in run.stdout and "replies: 1" in run.stdout
    assert "\x1b[" not in run.stdout + run.stderr
    # The same chat with stdout claiming to be a terminal is drawn with rich (ANSI colours).
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    code, out, _ = chat(["/help"], *FAST)
    assert code == 0 and "\x1b[" in out


@pytest.mark.parametrize(
    ("name", "probes"),
    [(name, [-1, 0, 1, 2, 10**9]) for name in ("max_tokens", "top_k", "seed")]
    + [
        (name, [-1, 0, 1e-300, 0.0005, 0.001, 0.005, 0.01, 0.5, 1, 2, 2.001, 5, float("nan")])
        for name in ("temperature", "top_p", "repeat_penalty")
    ],
)
def test_sampling_ranges_are_the_servers(name, probes):
    """The command line and /params accept exactly the values the server's schema accepts."""
    from pydantic import ValidationError

    from llmlab.chat import PARAM_RANGES
    from part5.combined_app.schemas import SamplingFields

    for value in probes:
        try:
            SamplingFields.model_validate({name: value})
            server = True
        except ValidationError:
            server = False
        assert (value in PARAM_RANGES[name]) == server, (name, value)


@pytest.mark.slow
def test_params_out_of_range_are_refused_and_the_chat_goes_on(chat):
    lines = ["/params temperature=-1", "/params top_p=0", "/params", "/exit"]
    code, out, err = chat(lines, *FAST)
    assert code == 0
    assert (
        "error: temperature must be 0, or at least 0.001 and at most 2 (0 is greedy), not -1.0."
        in err
    )
    assert "error: top_p must be above 0 and at most 1 (1 keeps every token), not 0.0." in err
    assert "temperature: 0\n" in out  # unchanged


@pytest.mark.slow
def test_tools_shows_what_it_uses_each_call_and_an_answer(chat, tmp_path):
    saved = tmp_path / "chat.json"
    lines = ["What is 17 * 23? Use the calculator.", f"/save {saved}", "/exit"]
    args = ["--tools", "--max-tool-steps", "1", "--temperature", "0", "--max-tokens", "64"]
    code, out, err = chat(lines, *args, "--ctx", "2048")
    assert code == 0, err
    # Which tools, and which collection the search uses (built from part3/data/docs here).
    assert "[building the document index from part3/data/docs (first use only)]" in out
    assert "[tools: calculator, search_documents (collection 'default': " in out
    reply = out.split("you> What is 17 * 23? Use the calculator.\n", 1)[1]
    calls = [line for line in reply.splitlines() if line.startswith("[tool ")]
    assert all(" -> " in line for line in calls), reply
    steps = _messages(saved)[1]["tool_steps"]
    assert len(steps) == len(calls)  # every call the model made was shown
    assert all(s["name"] in ("calculator", "search_documents") for s in steps)
    assert all((s["error"] is None) != (s["result"] is None) for s in steps)
    answer = reply.splitlines()[len(calls)]
    assert answer.strip() and not answer.startswith("{"), reply  # the answer text, not JSON


@pytest.mark.slow
def test_tools_with_too_few_tokens_says_the_reply_was_cut_short(chat):
    code, out, err = chat(["What is 2 + 2?"], "--tools", "--max-tokens", "3", "--prompt", "-")
    assert code == 1
    assert "error: The reply was cut short at max_tokens (3 tokens)" in err
    assert "Raise max_tokens" in err
