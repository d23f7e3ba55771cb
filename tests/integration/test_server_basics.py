"""The combined app without a model: the loading state, key and size checks, CORS, safe
upload names, and the server script's command line. Fast: nothing loads."""

from __future__ import annotations

import re
import socket

import pytest
from fastapi.testclient import TestClient

from llmlab.rag import RagError
from llmlab.rag.store import check_name
from part5.combined_app import ServerSettings, create_app
from part5.combined_app.errors import APIError
from part5.combined_app.routes.documents import safe_file_name
from part5.combined_app.schemas import COLLECTION_PATTERN, TextRoute
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


# The raw bytes hold the escape \ud83d with no low half: JSON that no UTF-8 text can carry.
LONE_SURROGATE = {
    "/v1/chat/completions": b'{"messages": [{"role": "user", "content": "Hi \\ud83d"}]}',
    "/v1/completions": b'{"prompt": "Hi \\ud83d"}',
    "/v1/embeddings": b'{"input": ["fine", "Hi \\ud83d"]}',
    "/api/batches": b'{"prompts": ["Hi \\ud83d"]}',
    "/api/collections/notes/ask": b'{"question": "Hi \\ud83d"}',
}
LONE_SURROGATE_PARAM = {
    "/v1/chat/completions": "messages.0.content",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input.1",
    "/api/batches": "prompts.0",
    "/api/collections/notes/ask": "question",
}


def openai_error(r, status: int) -> dict:
    """The error of an OpenAI-shaped error response with this status."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("route", list(LONE_SURROGATE))
def test_a_lone_surrogate_is_a_400_naming_the_field_before_any_route_runs(route, lab_home):
    r = loading_client(home=lab_home).post(
        route, content=LONE_SURROGATE[route], headers={"content-type": "application/json"}
    )
    error = openai_error(r, 400)
    assert error["param"] == LONE_SURROGATE_PARAM[route] and error["code"] == "invalid_unicode"
    assert "\\ud83d" in error["message"] and "surrogate" in error["message"]
    assert not (lab_home / "server-batches").exists() or not any(
        (lab_home / "server-batches").iterdir()
    )


def test_every_route_reads_its_body_through_the_text_check():
    from part5.combined_app.routes import (
        batches,
        documents,
        lora,
        openai_api,
        responses,
        system,
        tokens,
    )

    routers = (
        batches.router,
        documents.router,
        lora.router,
        openai_api.router,
        responses.router,
        system.router,
        tokens.router,
    )
    assert all(isinstance(r, TextRoute) for router in routers for r in router.routes)


def test_a_wrong_method_is_a_405_that_says_which_methods_the_path_answers():
    client = loading_client()
    error = openai_error(r := client.put("/api/batches/batch_x"), 405)
    assert r.headers["allow"] == "DELETE, GET"
    assert "DELETE, GET" in error["message"] and error["code"] == "method_not_allowed"
    assert client.post("/v1/models").headers["allow"] == "GET"


def test_the_schema_declares_400_not_422_and_the_errors_in_openai_shape():
    client = loading_client(api_key="k", max_tokens_limit=64)
    spec = client.get("/openapi.json", headers={"Authorization": "Bearer k"}).json()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            answers = operation["responses"]
            assert "422" not in answers, (method, path)
            for status, answer in answers.items():
                if status.startswith(("4", "5")) and path != "/health":
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
            if path != "/health":
                assert "401" in answers, (method, path)
    chat = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"200", "400", "404", "413", "503"} <= set(chat)
    assert "text/event-stream" in chat["200"]["content"]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    max_tokens = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["max_tokens"]
    assert {"type": "integer", "minimum": 1, "maximum": 64} in max_tokens["anyOf"]


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("notes", True),
        ("a.b-c_d", True),
        ("x" * 512, True),
        ("ab", False),
        ("x" * 513, False),
        ("a..b", False),
        ("-ab", False),
        ("ab.", False),
        ("a b", False),
        ("über", False),
    ],
)
def test_the_declared_collection_pattern_is_the_store_rule(name, valid):
    declared = len(name) in range(3, 513) and re.search(COLLECTION_PATTERN, name) is not None
    try:
        check_name(name)
        accepted = True
    except RagError:
        accepted = False
    assert declared == accepted == valid


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
