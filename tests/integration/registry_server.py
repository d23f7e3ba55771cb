"""A local HTTP file server for the registry's download tests: Range requests, a
connection that drops after N bytes on demand (to test resuming), and error statuses
such as 403 for a gated file."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class FileServer:
    """Serves ``files`` (URL path -> bytes) on 127.0.0.1 and records every request."""

    files: dict[str, bytes]
    drop_after: dict[str, int] = field(
        default_factory=dict
    )  # path -> bytes sent before hanging up, once
    status: dict[str, int] = field(default_factory=dict)  # path -> error status to answer
    requests: list[dict] = field(default_factory=list)  # {"path", "range", "headers"}
    port: int = 0

    def url(self, path: str) -> str:
        """The full URL of ``path`` on this server."""
        return f"http://127.0.0.1:{self.port}{path}"

    def ranges(self) -> list[str | None]:
        """The Range header of each request, in order (None when there was none)."""
        return [r["range"] for r in self.requests]


def start(server: FileServer) -> ThreadingHTTPServer:
    """Start ``server`` on a free port in a daemon thread; call ``.shutdown()`` when done."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            server.requests.append(
                {
                    "path": self.path,
                    "range": rng,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                }
            )
            data = server.files.get(self.path)
            if data is None or self.path in server.status:
                self.send_response(server.status.get(self.path, 404))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start_at = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            if start_at >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = data[start_at:]
            self.send_response(206 if rng else 200)
            if rng:
                self.send_header("Content-Range", f"bytes {start_at}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            cut = server.drop_after.pop(self.path, None)
            if cut is not None:  # promise the whole body, send part of it, hang up
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.port = httpd.server_address[1]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd
