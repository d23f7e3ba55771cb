"""Run the app in a background thread of this process, on a free port, and stop it again.

For tests, benchmarks and notebooks that need a live server but not a second process::

    from part5.combined_app import ServerSettings
    from part5.combined_app.background import running_server
    with running_server(ServerSettings(parallel=2)) as base_url:   # waits until /health is ok
        OpenAI(base_url=f"{base_url}/v1", api_key="unused").models.list()
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn

from llmlab import registry
from part5.combined_app.app import create_app
from part5.combined_app.config import ServerSettings


@contextlib.contextmanager
def running_server(
    settings: ServerSettings | None = None,
    port: int = 0,
    timeout: float = 120.0,
    wait_ready: bool = True,
    spec: registry.ModelSpec | None = None,
) -> Iterator[str]:
    """Serve the app on 127.0.0.1 (``port`` 0: a free one); yields ``http://127.0.0.1:PORT``.

    With ``wait_ready`` it returns only when ``/health`` answers ok (the model is loaded).
    ``spec``: the resolved model to serve, as :func:`create_app` takes it.

    Raises:
        RuntimeError: the server did not start, or the model did not load, within ``timeout``.
    """
    settings = (settings or ServerSettings()).model_copy(update={"host": "127.0.0.1"})
    config = uvicorn.Config(
        create_app(settings, spec=spec),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="llmlab-test-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start (see the log above)")
            time.sleep(0.02)
        bound = server.servers[0].sockets[0].getsockname()[1]
        base_url = f"http://127.0.0.1:{bound}"
        if wait_ready:
            wait_until_ready(base_url, deadline - time.monotonic())
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until_ready(base_url: str, timeout: float = 120.0) -> dict:
    """Poll ``/health`` until it says ok; returns its body.

    Raises:
        RuntimeError: the model failed to load, or was not ready within ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            body = httpx.get(f"{base_url}/health", timeout=5).json()
        except httpx.HTTPError:
            body = {"status": "unreachable"}
        if body.get("status") == "ok":
            return body
        if body.get("status") == "error":
            raise RuntimeError(f"the server could not load its model: {body.get('error')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the server was not ready within {timeout:.0f} s: {body}")
        time.sleep(0.1)
