"""Schemathesis fuzzes the served app against its own ``/openapi.json``: no 5xx, every
error in OpenAI's shape, and every answer (status, content type, headers, body) as the
schema says; data the schema allows is accepted, data it forbids is refused.

One server on 127.0.0.1 with the real default model; small limits (4 tokens per reply,
3 prompts per batch) keep every generation short, so the run is bounded by the number of
examples, not by the model. The schema is built when the module is collected (no model
loads for that) and checked to be the one the server serves.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from part5.combined_app import ServerSettings, create_app
from part5.combined_app.background import running_server

pytestmark = pytest.mark.slow

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    positive_data_acceptance,
]


# parallel: the schema states it (n is at most the server's slots).
LIMITS = {"max_tokens_limit": 4, "default_max_tokens": 4, "max_batch_prompts": 3, "parallel": 2}
OPENAPI = create_app(ServerSettings(**LIMITS)).openapi()
# The coverage phase sends boundary cases; for /v1/embeddings that is 2048 texts at once,
# which takes the model most of a minute on 2 cores: its other phases still run.
CONFIG = schemathesis.Config.from_dict(
    {"operations": [{"include-path": "/v1/embeddings", "phases": {"coverage": {"enabled": False}}}]}
)
schema = schemathesis.openapi.from_dict(OPENAPI, config=CONFIG)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    server = ServerSettings(threads=1, home=tmp_path_factory.mktemp("home"), **LIMITS)
    with running_server(server) as url:
        assert httpx.get(f"{url}/openapi.json").json() == OPENAPI
        # The embedding model loads on first use: not inside a fuzzed request's timeout.
        httpx.post(f"{url}/v1/embeddings", json={"input": "warm up"}, timeout=300)
        yield url


@schemathesis.check
def openai_error_shape(ctx, response, case) -> None:
    """Every error is ``{"error": {"message", "type", "param", "code"}}`` with a message."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"], body


# Rules the schema cannot state, so schema-valid requests that break them are refused (400):
# an upload's file name and type live inside the multipart parts, ``dimensions`` must be
# the embedding model's own vector size, a JSON schema (response format, tool parameters)
# must be one a grammar can hold, a tool result must answer an earlier call and tool_choice
# must name a given tool, top_logprobs needs logprobs true, and token ids must be in the
# model's vocabulary. Every other check still runs on these routes.
GRAMMAR_RULES = (
    "schemas a grammar holds, tool results that answer a call, known tool names, "
    "top_logprobs with logprobs"
)
CANNOT_STATE = {
    ("POST", "/api/collections/{collection}/files"): "upload file names and types",
    ("POST", "/v1/embeddings"): "dimensions equal to the model's vector size",
    ("POST", "/v1/chat/completions"): GRAMMAR_RULES,
    ("POST", "/v1/responses"): GRAMMAR_RULES,
    ("POST", "/detokenize"): "token ids below the model's vocabulary size",
}


@schema.parametrize()
@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_the_api_answers_as_its_schema_says(case, base_url):
    checks = [*CHECKS, openai_error_shape]
    if (case.method, case.path) in CANNOT_STATE:
        checks.remove(positive_data_acceptance)
    case.call_and_validate(base_url=base_url, checks=checks, timeout=120)
