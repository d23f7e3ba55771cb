"""The lab server as a Ray Serve deployment (part5/combined_app/ray_serve.py): one replica on
a local Ray (127.0.0.1 only) answers /v1/chat/completions through Serve's proxy, to the
openai client, as the plain server does."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from llmlab import batch_ray

# Before ray is first imported: a one-node Ray on the loopback interface (see batch_ray).
os.environ.setdefault(batch_ray.LOOPBACK_ENV, "0")

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served():
    """The app deployed with one replica; the proxy's base URL once /health says ok."""
    import ray
    from ray import serve

    from part5.combined_app.ray_serve import app

    batch_ray.connect(None, num_cpus=2)  # ray.init(num_cpus=2) on 127.0.0.1, no dashboard
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app({"num_replicas": 1, "threads": 1, "parallel": 2, "n_ctx": 512}))
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the replica loads its model after it starts
            health = httpx.get(f"{base}/health", timeout=10)
            if health.status_code == 200 and health.json().get("status") == "ok":
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the replica never became ready: {health.status_code} {health.text}")
        yield base
    finally:
        serve.shutdown()
        ray.shutdown()


def test_chat_completions_through_the_serve_proxy(served):
    from openai import OpenAI

    client = OpenAI(base_url=f"{served}/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert 1 <= reply.usage.completion_tokens <= 8
    models = client.models.list()
    assert any(m.id.startswith("smollm2-135m-instruct") for m in models.data)
