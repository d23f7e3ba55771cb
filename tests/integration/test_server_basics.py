"""The combined app without a model: the loading state, key and size checks, CORS, JSON
repair, safe upload names, and the server script's command line. Fast: nothing loads."""

from __future__ import annotations

import json
import socket

import pytest
from fastapi.testclient import TestClient

from part5.combined_app import ServerSettings, create_app
from part5.combined_app.errors import APIError
from part5.combined_app.jsonmode import repair
from part5.combined_app.routes.documents import safe_file_name
from part5.combined_app.scripts.server import main

CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def loading_client(**settings) -> TestClient:
    # Without `with TestClient(...)` the lifespan hook never runs: the model stays "loading".
    return TestClient(create_app(ServerSettings(**settings)))


def test_while_the_model_loads_health_says_so_and_model_routes_ask_to_retry():
    client = loading_client()
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "loading"
    r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"] == "2"
    assert client.get("/").status_code == 200


def test_the_key_is_checked_before_anything_else_except_health_and_page():
    client = loading_client(api_key="k")
    assert client.get("/v1/models").status_code == 401
    assert client.post("/api/batches", json={"prompts": ["x"]}).status_code == 401
    assert client.get("/health").status_code == 503  # answered, no key needed
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
    assert client.get("/v1/models", headers={"Authorization": "Basic k"}).status_code == 401


def test_body_limit_applies_before_the_route():
    client = loading_client(max_body_bytes=2048)
    r = client.post(
        "/v1/chat/completions", content=b"x" * 5000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_cors_lets_the_named_origin_in_and_no_other():
    client = loading_client(cors_origins=["http://localhost:3000"])
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    ok = client.options(
        "/v1/chat/completions", headers={"Origin": "http://localhost:3000", **preflight}
    )
    assert ok.headers["access-control-allow-origin"] == "http://localhost:3000"
    other = client.options(
        "/v1/chat/completions", headers={"Origin": "http://evil.example", **preflight}
    )
    assert "access-control-allow-origin" not in other.headers
    assert (
        "access-control-allow-origin"
        not in loading_client().get("/health", headers={"Origin": "http://localhost:3000"}).headers
    )


@pytest.mark.parametrize(
    ("text", "expected", "how"),
    [
        ('{"a": 1}', {"a": 1}, "valid"),
        ('{"a": 1, "b": {"c": 2', {"a": 1, "b": {"c": 2}}, "closed"),
        ('{"name": "Ad', {"name": "Ad"}, "closed"),
        ('{"a": [1, 2', {"a": [1, 2]}, "closed"),
        ('{"a": 1, "b":', {"a": 1}, "closed"),
        ('Sure! {"x": 3} Hope this helps.', {"x": 3}, "extracted"),
        ("no braces at all", {"text": "no braces at all"}, "wrapped"),
    ],
)
def test_json_mode_repair_always_gives_an_object(text, expected, how):
    fixed, method = repair(text)
    assert json.loads(fixed) == expected and method == how


@pytest.mark.parametrize("name", ["notes.md", "Report (final) 2024.pdf", "a-b_c.txt"])
def test_plain_file_names_are_kept(name):
    assert safe_file_name(name) == name


@pytest.mark.parametrize("name", ["../x.md", "a/b.md", "a\\b.md", "..", ".", "", "x\0.md"])
def test_file_names_with_folders_or_nothing_left_are_refused(name):
    with pytest.raises(APIError) as err:
        safe_file_name(name)
    assert err.value.status == 400


def test_odd_characters_and_leading_dots_in_file_names_are_replaced():
    assert safe_file_name("café;rm -rf.md") == "caf__rm -rf.md"
    assert safe_file_name(".hidden.md") == "hidden.md"


def test_server_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--parallel" in out and "OpenAI(base_url=" in out


def test_server_unknown_model_exits_2_with_the_catalog_hint(capsys):
    assert main(["--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "Unknown model 'no-such-model'" in err and "list" in err


def test_server_refuses_a_model_that_cannot_chat(capsys):
    assert main(["--model", "all-minilm-l6-v2"]) == 2
    assert "not a chat model" in capsys.readouterr().err


def test_server_port_in_use_exits_2(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["--port", str(port)]) == 2
    assert f"Port {port}" in capsys.readouterr().err
