"""Tests for part3/scripts/huggingface_login.sh and llmlab/hf_auth.py.

Every run uses a temporary HF_HOME. "Online" runs talk to a small fake Hub on 127.0.0.1
that knows one good token, so validation is tested without the internet.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llmlab import hf_auth

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "part3" / "scripts" / "huggingface_login.sh"
BASH = shutil.which("bash")
TOKEN = "hf_TestTokenDoNotPrint1234567890"
GOOD_TOKEN = "hf_GoodTokenForTheFakeHub0987654321"


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    return home


def run_login(
    *args: str, hf_home: Path, env: dict[str, str] | None = None, stdin: str | None = None
):
    full_env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_TOKEN", "LLMLAB_HF_TOKEN", "HF_ENDPOINT")
    }
    full_env.update({"HF_HOME": str(hf_home), "PYTHON": sys.executable}, **(env or {}))
    return subprocess.run(
        [BASH, str(SCRIPT), *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


class FakeHub(BaseHTTPRequestHandler):
    """Answers like huggingface.co's /api/whoami-v2 for GOOD_TOKEN, 401 for anything else."""

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def do_GET(self):
        if self.path != "/api/whoami-v2":
            self.send_error(404)
            return
        if self.headers.get("authorization") != f"Bearer {GOOD_TOKEN}":
            body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
            self.send_response(401)
        else:
            info = {
                "name": "learner",
                "auth": {"accessToken": {"displayName": "lab-read", "role": "read"}},
            }
            body = json.dumps(info).encode()
            self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_token_from_env_is_stored_offline_and_never_printed(tmp_path):
    home = tmp_path / "hf"
    result = run_login(hf_home=home, env={"HF_TOKEN": TOKEN})
    assert result.returncode == 0, result.stderr
    assert (home / "token").read_text() == TOKEN
    assert (home / "token").stat().st_mode & 0o077 == 0  # only the owner can read it
    assert TOKEN not in result.stdout + result.stderr
    assert "Using the token from $HF_TOKEN." in result.stdout
    assert (
        f"Token stored in {home / 'token'} (as 'llmlab'); validation skipped: HF_HUB_OFFLINE is set"
        in result.stdout
    )


def test_no_network_is_detected_quickly_and_the_token_still_stored(tmp_path):
    home = tmp_path / "hf"
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    result = run_login(
        "--timeout",
        "2",
        hf_home=home,
        env={"LLMLAB_HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint},
    )
    assert result.returncode == 0, result.stderr
    assert f"validation skipped: {endpoint} cannot be reached (ConnectError)" in result.stdout
    assert "Using the token from $LLMLAB_HF_TOKEN." in result.stdout
    assert (home / "token").read_text() == TOKEN
    assert TOKEN not in result.stdout + result.stderr


def test_valid_token_is_checked_with_the_hub(tmp_path, fake_hub):
    home = tmp_path / "hf"
    result = run_login(
        hf_home=home, env={"HF_TOKEN": GOOD_TOKEN, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub}
    )
    assert result.returncode == 0, result.stderr
    assert "(as 'lab-read'); valid token of user learner (read access)." in result.stdout
    assert (home / "token").read_text() == GOOD_TOKEN
    assert "[lab-read]" in (home / "stored_tokens").read_text()
    assert GOOD_TOKEN not in result.stdout + result.stderr


def test_rejected_token_is_not_stored(tmp_path, fake_hub):
    home = tmp_path / "hf"
    result = run_login(
        hf_home=home, env={"HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub}
    )
    assert result.returncode == 1
    assert "error: The Hub rejected this token (HTTP 401)." in result.stderr
    assert not (home / "token").exists()
    assert TOKEN not in result.stdout + result.stderr


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_token_is_a_clear_error(tmp_path, value):
    home = tmp_path / "hf"
    result = run_login(hf_home=home, env={"HF_TOKEN": value})
    assert result.returncode == 2
    assert "error: no token given (HF_TOKEN is empty and nothing was entered)." in result.stderr
    assert "https://huggingface.co/settings/tokens" in result.stderr
    assert not (home / "token").exists()


def test_token_piped_on_stdin(tmp_path):
    home = tmp_path / "hf"
    result = run_login(hf_home=home, stdin=TOKEN + "\n")
    assert result.returncode == 0, result.stderr
    assert (home / "token").read_text() == TOKEN


def test_token_never_appears_in_a_command_line(tmp_path):
    """A PYTHON wrapper records the arguments it is started with: the token is not among them."""
    record = tmp_path / "argv.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!{BASH}\nprintf "%s\\n" "$*" >> {record}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    home = tmp_path / "hf"
    result = run_login(
        "--no-validate", hf_home=home, env={"HF_TOKEN": TOKEN, "PYTHON": str(wrapper)}
    )
    assert result.returncode == 0, result.stderr
    assert "-m llmlab.hf_auth --no-validate" in record.read_text()
    assert TOKEN not in record.read_text()
    assert (home / "token").read_text() == TOKEN


def test_hidden_prompt_does_not_echo_the_token(tmp_path):
    home = tmp_path / "hf"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "LLMLAB_HF_TOKEN")}
    env.update(HF_HOME=str(home), PYTHON=sys.executable)
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [BASH, str(SCRIPT)], stdin=terminal, stdout=terminal, stderr=terminal, env=env
    )
    os.close(terminal)
    seen, sent = b"", False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.2)
        if ready:
            try:
                data = os.read(controller, 1024)
            except OSError:  # the terminal closed: the script has ended
                break
            if not data:
                break
            seen += data
        if not sent and b"Token (hidden): " in seen:
            os.write(controller, TOKEN.encode() + b"\n")
            sent = True
        if proc.poll() is not None and not ready:
            break
    os.close(controller)
    assert proc.wait(timeout=10) == 0, seen.decode(errors="replace")
    assert sent
    assert TOKEN.encode() not in seen
    assert b"Token stored in" in seen
    assert (home / "token").read_text() == TOKEN


def test_a_token_given_as_argument_is_refused_and_not_repeated(tmp_path):
    result = run_login(TOKEN, hf_home=tmp_path / "hf")
    assert result.returncode == 2
    assert "A token is never given as an argument" in result.stderr
    assert "revoke it" in result.stderr
    assert TOKEN not in result.stderr
    assert not (tmp_path / "hf" / "token").exists()


def test_unknown_option_is_a_usage_error(tmp_path):
    result = run_login("--tokn", hf_home=tmp_path / "hf")
    assert result.returncode == 2
    assert "error: unknown option '--tokn'." in result.stderr


def test_python_without_huggingface_hub_is_reported(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(f"#!{BASH}\nexit 1\n")
    fake.chmod(0o755)
    result = run_login(hf_home=tmp_path / "hf", env={"HF_TOKEN": TOKEN, "PYTHON": str(fake)})
    assert result.returncode == 1
    assert "cannot import huggingface_hub and llmlab" in result.stderr
    assert "make setup" in result.stderr


# ------------------------------------------------------------------ the Python helper


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (None, "The token is empty."),
        ("\n", "The token is empty."),
        ("hf_a hf_b", "contains spaces"),
        ("api_org_abc", "organization token"),
    ],
)
def test_clean_token_rejects_bad_input(raw, message):
    with pytest.raises(hf_auth.TokenError, match=message):
        hf_auth.clean_token(raw)


def test_clean_token_strips_the_newline_of_a_paste():
    assert hf_auth.clean_token(f"  {TOKEN}\r\n") == TOKEN


def test_main_reads_stdin_and_saves_with_huggingface_hubs_helpers(hf_home, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(TOKEN + "\n"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # huggingface_hub read HF_HOME when it was imported; point its paths at the test's folder.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    assert hf_auth.main(["--no-validate"]) == 0
    out = capsys.readouterr().out
    assert (
        out
        == f"Token stored in {hf_home / 'token'} (as 'llmlab'); validation skipped (--no-validate).\n"
    )
    from huggingface_hub.utils import get_token

    assert get_token() == TOKEN  # what every later download will send


def test_main_empty_stdin_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert hf_auth.main([]) == 2
    assert "error: The token is empty." in capsys.readouterr().err


def test_hub_reachable_honours_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hf_auth.hub_reachable() == (False, "HF_HUB_OFFLINE is set")


def test_help_explains_where_the_token_goes(tmp_path):
    result = run_login("--help", hf_home=tmp_path / "hf")
    assert result.returncode == 0
    assert "$HF_HOME/token" in result.stdout
    assert "history" in result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_is_clean():
    result = subprocess.run(
        ["shellcheck", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout
