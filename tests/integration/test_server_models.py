"""A server with two models (the default chat model and Gemma 3 270M, a base model): the
second loads on first use and unloads when idle; aliases and ``auto`` route; the model that
answered is in the reply, a header and /metrics."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from part5.combined_app import ServerSettings
from part5.combined_app.background import running_server

DEFAULT, BASE = "smollm2-135m-instruct", "gemma3-270m"
SERVER = Path(__file__).resolve().parents[2] / "part5" / "combined_app" / "scripts" / "server.py"
MODELS_FILE = """
models: [gemma3-270m]
aliases: {fast: smollm2-135m-instruct, base: gemma3-270m}
auto:
  rules:
    - {when: {keywords: [continue]}, model: base}
  default: fast
"""


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / "models.yaml").write_text(MODELS_FILE)
    settings = ServerSettings(
        threads=1, home=home, parallel=1, n_ctx=512, models_file=home / "models.yaml"
    )
    with running_server(settings) as url:
        yield url


def listed(http) -> dict[str, dict]:
    return {m["id"]: m for m in http.get("/v1/models").json()["data"]}


def metric(http, text: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith(text + " "):
            return float(line.split()[1])
    return 0.0


def complete(http, model: str, **extra) -> httpx.Response:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 4}
    return http.post("/v1/completions", json={**body, "temperature": 0, **extra})


def test_models_lists_what_is_loaded_what_can_be_and_the_aliases(http):
    models = listed(http)
    assert models[DEFAULT]["loaded"] is True
    assert models[BASE]["capabilities"] == ["completion"]
    assert models[BASE]["estimated_memory_bytes"] > 0
    assert models["base"]["alias_of"] == BASE and models["fast"]["alias_of"] == DEFAULT
    assert models["base"]["capabilities"] == ["completion"]  # the web page lists chat models
    assert "auto" in models


def test_the_second_model_loads_on_first_use_and_unloads_after_keep_alive_zero(http):
    loads = metric(http, f'llmlab_model_loads_total{{model="{BASE}"}}')
    reply = complete(http, BASE, keep_alive=0)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == BASE and reply.headers["x-model"] == BASE
    assert reply.json()["choices"][0]["text"]
    assert metric(http, f'llmlab_model_loads_total{{model="{BASE}"}}') == loads + 1
    deadline = time.monotonic() + 30
    while listed(http)[BASE]["loaded"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert listed(http)[BASE]["loaded"] is False
    unloads = f'llmlab_model_unloads_total{{model="{BASE}",reason="idle"}}'
    assert metric(http, unloads) >= 1
    assert metric(http, f'llmlab_model_load_seconds_total{{model="{BASE}"}}') > 0


def test_an_alias_and_auto_route_and_say_which_model_answered(http):
    reply = complete(http, "base", keep_alive="1m")
    assert reply.status_code == 200 and reply.headers["x-model"] == BASE
    routed = http.post(
        "/v1/chat/completions",
        json={"model": "auto", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert routed.status_code == 200
    assert routed.json()["model"] == DEFAULT and routed.headers["x-model"] == DEFAULT
    auto_base = complete(http, "auto", prompt="Please continue: once upon a time")
    assert auto_base.headers["x-model"] == BASE
    assert metric(http, f'llmlab_routed_requests_total{{model="{DEFAULT}",via="auto"}}') >= 1
    assert metric(http, f'llmlab_routed_requests_total{{model="{BASE}",via="alias"}}') >= 1


def test_chat_with_the_base_model_and_an_unknown_name_are_refused_with_what_to_do(http):
    chat = http.post(
        "/v1/chat/completions",
        json={"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 400 and "/v1/completions" in chat.json()["error"]["message"]
    unknown = complete(http, "quality")
    assert unknown.status_code == 404
    message = unknown.json()["error"]["message"]
    assert DEFAULT in message and BASE in message and "fast" in message


def test_a_model_over_the_memory_budget_is_a_503_with_the_reason(tmp_path):
    settings = ServerSettings(
        threads=1, home=tmp_path, parallel=1, n_ctx=512, models=[BASE], memory_budget=10**8
    )
    with running_server(settings) as url:
        reply = httpx.post(
            f"{url}/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2}
        )
        assert reply.status_code == 503
        error = reply.json()["error"]
        assert error["code"] == "model_over_budget" and "--memory-budget" in error["message"]
        assert "retry-after" in reply.headers


def test_server_refuses_an_alias_for_a_model_it_does_not_serve(tmp_path):
    run = subprocess.run(
        [sys.executable, str(SERVER), "--port", "0", "--alias", "quality=qwen"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LLMLAB_HOME": str(tmp_path)},
    )
    assert run.returncode == 2
    assert "alias 'quality' names 'qwen'" in run.stderr
