"""The server when its engine fails (llama.cpp's ``llama_decode`` replaced by one that returns
an error, as llama.cpp does): /health and /metrics say so, a new engine takes over, or the
server script stops with exit code 1. Also: prompts are tokenized off the event loop."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from llmlab.engine import Engine
from part5.combined_app import ServerSettings, create_app
from part5.combined_app.scripts.server import main

pytestmark = pytest.mark.slow

CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4}


def fail_next_decode(monkeypatch, when=lambda: True) -> None:
    """The next ``llama_decode`` (the first one once ``when()`` is true) returns -1 (llama.cpp's
    "invalid batch"); later ones work."""
    import llama_cpp

    real, failures = llama_cpp.llama_decode, [-1]

    def decode(ctx, batch):
        return failures.pop() if failures and when() else real(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", decode)


def patch_model_loads(monkeypatch, gate: threading.Event | None = None) -> None:
    """Model loads from now on wait for ``gate``, or fail as llama.cpp does (NULL) without one."""
    import llama_cpp

    real = llama_cpp.llama_model_load_from_file

    def load(path, params):
        if gate is None:
            return None
        gate.wait(120)
        return real(path, params)

    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", load)


def wait_until(condition, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.05)


def healthy(client) -> bool:
    return client.get("/health").status_code == 200


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.fixture
def settings(tmp_path):
    return ServerSettings(threads=1, parallel=2, home=tmp_path)


def test_after_a_decode_failure_health_says_so_then_a_new_engine_serves(settings, monkeypatch):
    gate = threading.Event()
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: healthy(client))
        fail_next_decode(monkeypatch)
        patch_model_loads(monkeypatch, gate)  # the new engine waits until the checks are done
        try:
            failed = client.post("/v1/chat/completions", json=CHAT)
            assert failed.status_code == 500
            assert failed.json()["error"]["code"] == "engine_error"
            assert "llama_decode returned -1" in failed.json()["error"]["message"]
            assert "Retry in a few seconds" in failed.json()["error"]["message"]
            health = client.get("/health")
            assert health.status_code == 503 and health.headers["retry-after"]
            assert health.json()["status"] == "recovering"
            assert "llama_decode returned -1" in health.json()["error"]
            meanwhile = client.post("/v1/chat/completions", json=CHAT)
            assert meanwhile.status_code == 503 and meanwhile.headers["retry-after"]
            assert meanwhile.json()["error"]["code"] == "model_recovering"
            assert metric(client, "llmlab_engine_failures_total") == 1
        finally:
            gate.set()
        wait_until(lambda: healthy(client))
        assert "error" not in client.get("/health").json()
        again = client.post("/v1/chat/completions", json=CHAT)
        assert again.status_code == 200, again.text
        assert again.json()["usage"]["completion_tokens"] >= 1


def test_when_no_new_engine_loads_health_gives_the_reason_and_the_app_asks_to_stop(
    settings, monkeypatch
):
    stops: list[str] = []
    with TestClient(create_app(settings, on_fatal=stops.append)) as client:
        wait_until(lambda: healthy(client))
        fail_next_decode(monkeypatch)
        patch_model_loads(monkeypatch)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 500
        wait_until(lambda: stops)
        health = client.get("/health")
        assert health.status_code == 500 and health.json()["status"] == "error"
        reason = health.json()["error"]
        assert stops == [reason]
        assert "llama_decode returned -1" in reason
        assert "no new engine could be loaded in 3 attempts" in reason
        assert "could not load" in reason  # why the last load failed
        refused = client.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 500 and reason in refused.json()["error"]["message"]
        assert metric(client, "llmlab_engine_failures_total") == 1


def test_the_server_script_exits_1_with_the_reason_when_no_engine_can_be_reloaded(
    monkeypatch, capsys
):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exit_code: list[int] = []
    args = ["--port", str(port), "--threads", "1", "--parallel", "1", "--log-level", "error"]
    server = threading.Thread(target=lambda: exit_code.append(main(args)), daemon=True)
    server.start()
    base_url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base_url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up)
    fail_next_decode(monkeypatch)
    patch_model_loads(monkeypatch)
    reply = httpx.post(f"{base_url}/v1/chat/completions", json=CHAT, timeout=120)
    assert reply.status_code == 500
    server.join(120)
    assert exit_code == [1]
    err = capsys.readouterr().err
    assert "no new engine could be loaded in 3 attempts" in err and "Restart the server" in err


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def test_prompts_are_tokenized_off_the_event_loop_under_the_model_lock(settings, monkeypatch):
    seen: list[tuple[str, bool, bool]] = []
    real_tokenize = Engine.tokenize

    def tokenize(engine, *args, **kwargs):
        seen.append(("engine", on_event_loop(), engine._model_lock.locked()))
        return real_tokenize(engine, *args, **kwargs)

    monkeypatch.setattr(Engine, "tokenize", tokenize)
    app = create_app(settings)
    with TestClient(app) as client:
        wait_until(lambda: healthy(client))
        embedder = app.state.service.embedder(None)
        tokenizer_type = type(embedder.model.tokenizer)
        real_call = tokenizer_type.__call__

        def call(tokenizer, *args, **kwargs):
            seen.append(("embedder", on_event_loop(), embedder._lock.locked()))
            return real_call(tokenizer, *args, **kwargs)

        monkeypatch.setattr(tokenizer_type, "__call__", call)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        completion = {"prompt": ["The sky is", "Grass is"], "max_tokens": 2}
        assert client.post("/v1/completions", json=completion).status_code == 200
        assert client.post("/v1/embeddings", json={"input": ["a cat", "a dog"]}).status_code == 200
    assert {who for who, _, _ in seen} == {"engine", "embedder"}
    # (who, on the event loop, lock held) for every tokenization
    assert {(who, False, True) for who, _, _ in seen} == set(seen)


BATCH = {
    "prompts": [{"id": n, "prompt": f"Name a number above {n}."} for n in range(6)],
    "max_tokens": 6,
    "temperature": 0,
}


def fail_after_rows(monkeypatch, settings, rows: int) -> list[list[dict]]:
    """Fail one decode once a batch job has written ``rows`` results; returns (filled in
    then) the records the job's output held at that moment."""
    seen: list[list[dict]] = []

    def rows_written() -> bool:
        for output in settings.batches_dir.glob("*/output.jsonl"):
            lines = output.read_bytes().splitlines(keepends=True)
            done = [json.loads(line) for line in lines if line.endswith(b"\n")]
            if len(done) >= rows:
                seen.append(done)
                return True
        return False

    fail_next_decode(monkeypatch, when=rows_written)
    return seen


def batch_status(client, job_id: str) -> str:
    return client.get(f"/api/batches/{job_id}").json()["status"]


def batch_done(client, job_id: str) -> bool:
    return batch_status(client, job_id) not in ("queued", "running")


def test_a_batch_job_running_when_the_engine_fails_goes_on_on_the_new_engine(settings, monkeypatch):
    with TestClient(create_app(settings)) as client:
        wait_until(lambda: healthy(client))
        # parallel=2 gives a job one row in flight: the failure hits row 2 (0-based).
        at_failure = fail_after_rows(monkeypatch, settings, rows=2)
        job = client.post("/api/batches", json=BATCH).json()
        wait_until(lambda: batch_done(client, job["id"]))
        status = client.get(f"/api/batches/{job['id']}").json()
        results = client.get(f"/api/batches/{job['id']}/results").json()["results"]
        assert metric(client, "llmlab_engine_failures_total") == 1
    assert [len(rows) for rows in at_failure] == [2]  # the engine failed mid-job
    assert status["status"] == "completed", status
    assert (status["completed"], status["failed"], status["error"]) == (6, 0, None)
    assert [r["id"] for r in results] == list(range(6))  # none lost, none run twice
    assert all(r["output"] and "error" not in r for r in results)
    assert results[:2] == at_failure[0]  # rows finished before the failure are kept as they were


def test_a_batch_job_is_kept_interrupted_when_no_new_engine_loads_and_resumes_next_run(
    settings, monkeypatch
):
    stops: list[str] = []
    with TestClient(create_app(settings, on_fatal=stops.append)) as client:
        wait_until(lambda: healthy(client))
        at_failure = fail_after_rows(monkeypatch, settings, rows=2)
        patch_model_loads(monkeypatch)
        job = client.post("/api/batches", json=BATCH).json()
        wait_until(lambda: stops and batch_done(client, job["id"]))
        status = client.get(f"/api/batches/{job['id']}").json()
    assert status["status"] == "interrupted", status
    assert status["completed"] == 2 and status["failed"] == 0
    assert "no new engine could be loaded" in status["error"]
    assert "resumes when the server starts again" in status["error"]

    monkeypatch.undo()  # llama.cpp loads and decodes again: the next server run resumes the job
    with TestClient(create_app(settings)) as client:
        # It is "interrupted" (read from disk) until it resumes: wait for it to end.
        wait_until(lambda: batch_status(client, job["id"]) in ("completed", "failed"))
        status = client.get(f"/api/batches/{job['id']}").json()
        results = client.get(f"/api/batches/{job['id']}/results").json()["results"]
    assert status["status"] == "completed", status
    assert (status["completed"], status["failed"], status["error"]) == (6, 0, None)
    assert [r["id"] for r in results] == list(range(6))
    assert results[:2] == at_failure[0]
