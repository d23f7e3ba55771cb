"""Pure ASGI middleware run before every route: API key, body size, and request metrics.

* API key: when the server has one, each request needs ``Authorization: Bearer <key>``,
  except ``/health`` and the web page's own static files (the page then asks for the key).
* Body size: a request body over the limit gets 413 before any route reads it. Document
  uploads have their own, larger limit.
* Metrics: every request is counted by route and status, and its latency observed.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from part5.combined_app.config import ServerSettings
from part5.combined_app.errors import error_body
from part5.combined_app.metrics import Metrics

OPEN_PATHS = ("/health", "/", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)


def _is_upload(method: str, path: str) -> bool:
    return method == "POST" and path.startswith("/api/collections/") and path.endswith("/files")


async def _send_error(send: Send, status: int, message: str, code: str, extra: dict | None = None):
    body = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class LabMiddleware:
    """API key check, body size limit and request metrics, in that order."""

    def __init__(
        self, app: ASGIApp, settings: Callable[[], ServerSettings], metrics: Callable[[], Metrics]
    ):
        self.app = app
        self.settings = settings
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def send_tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_tracked)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or (
                "static" if status["code"] < 400 else "unmatched"
            )
            metrics = self.metrics()
            metrics.requests.labels(route=label, status=str(status["code"])).inc()
            metrics.latency.labels(route=label).observe(time.perf_counter() - started)

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings = self.settings()
        path, method = scope["path"], scope["method"]
        if settings.api_key and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)):
            headers = dict(scope["headers"])
            given = headers.get(b"authorization", b"").decode("latin-1")
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), settings.api_key.encode()
            ):
                what = "Wrong API key" if given else "Missing API key"
                await _send_error(
                    send,
                    401,
                    f"{what}. Send the header 'Authorization: Bearer <key>' with the key the "
                    "server was started with (--api-key or LLMLAB_API_KEY).",
                    "invalid_api_key",
                    {"www-authenticate": "Bearer"},
                )
                return
        limit = settings.max_upload_bytes if _is_upload(method, path) else settings.max_body_bytes
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, 413, _too_large(int(length), limit), "request_too_large")
            return
        if length is None and method in ("POST", "PUT", "PATCH"):
            # A chunked body has no declared length: read it here, within the limit.
            body = bytearray()
            more = True
            while more:
                message = await receive()
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    await _send_error(send, 413, _too_large(len(body), limit), "request_too_large")
                    return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": bytes(body), "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


def _too_large(size: int, limit: int) -> str:
    return (
        f"The request body is {size:,} bytes, over this server's limit of {limit:,} bytes. "
        "Send less text (or a smaller file), or start the server with a larger limit."
    )
