"""Health and metrics over HTTP (stdlib server: no event loop on the adapter)."""
from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)


class HealthServer:
    """/health/live, /health/ready, /health/status (JSON) and /metrics."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]], ready: Callable[[], bool],
                 metrics: Callable[[], bytes]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?")[0].rstrip("/")
                if path == "/health/live":
                    outer._send(self, 200, b"ok\n", "text/plain")
                elif path == "/health/ready":
                    ok = ready()
                    outer._send(self, 200 if ok else 503, b"ready\n" if ok else b"not ready\n", "text/plain")
                elif path == "/health/status":
                    outer._send(self, 200, json.dumps(status(), sort_keys=True).encode(), "application/json")
                elif path == "/metrics":
                    outer._send(self, 200, metrics(), "text/plain; version=0.0.4")
                else:
                    outer._send(self, 404, b"not found\n", "text/plain")

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="clara-http", daemon=True)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
