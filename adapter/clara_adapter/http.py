"""Health, metrics and STOW-RS over HTTP (stdlib server: no event loop on the adapter;
each request runs on its own thread, like each DICOM association)."""
from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

log = logging.getLogger(__name__)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # One log line (not socketserver's traceback on stderr): a client that went away mid-request.
        exc = sys.exc_info()[1]
        log.info("HTTP connection from %s ended: %s", client_address[0], exc or "unknown error")


class HealthServer:
    """/health/live, /health/ready, /health/status (JSON), /metrics and, given ``stow``,
    STOW-RS at POST /dicomweb/aetitles/{aeTitle}/studies[/{StudyInstanceUID}].

    ``not_ready`` answers None when ready, else why not (one line, shown in the 503
    body so `kubectl describe pod` says why the pod left the Service)."""

    def __init__(self, host: str, port: int, status: Callable[[], dict[str, Any]],
                 not_ready: Callable[[], str | None], metrics: Callable[[], bytes], stow: Any = None):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                path = self.path.split("?")[0].rstrip("/")
                if path == "/health/live":
                    outer._send(self, 200, b"ok\n", "text/plain")
                elif path == "/health/ready":
                    reason = not_ready()
                    if reason is None:
                        outer._send(self, 200, b"ready\n", "text/plain")
                    else:
                        outer._send(self, 503, f"not ready: {reason}\n".encode(), "text/plain")
                elif path == "/health/status":
                    outer._send(self, 200, json.dumps(status(), sort_keys=True).encode(), "application/json")
                elif path == "/metrics":
                    outer._send(self, 200, metrics(), "text/plain; version=0.0.4")
                else:
                    outer._send(self, 404, b"not found\n", "text/plain")

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                from clara_adapter.stow import ChunkedReader, LengthReader, StowError, parse_path

                target = parse_path(self.path.split("?")[0]) if stow is not None else None
                if target is None:
                    self.close_connection = True
                    outer._send(self, 404, b"not found\n", "text/plain")
                    return
                ae_title, study_uid = target
                read: list[Any] = []

                def body() -> Any:
                    encoding = (self.headers.get("Transfer-Encoding") or "").lower()
                    if "chunked" in encoding:
                        reader = ChunkedReader(self.rfile)
                    elif self.headers.get("Content-Length", "").strip().isdigit():
                        reader = LengthReader(self.rfile, int(self.headers["Content-Length"]))
                    else:
                        raise StowError(411, "a body needs Content-Length or chunked Transfer-Encoding")
                    read.append(reader)
                    return reader

                try:
                    answer = stow.handle(ae_title, study_uid, self.headers, body, self.client_address[0])
                except Exception:
                    log.exception("STOW-RS request to %s failed", ae_title)
                    self.close_connection = True
                    outer._send(self, 500, b'{"message": "internal error (see the adapter log)"}', "application/json")
                    return
                if not read or answer.status in (400, 411, 413):
                    self.close_connection = True  # the rest of the body is unread: do not reuse the connection
                payload = json.dumps(answer.body).encode()
                ctype = "application/dicom+json" if answer.status in (200, 202, 409) else "application/json"
                outer._send(self, answer.status, payload, ctype, answer.headers)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

        self.httpd = _Server((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="clara-http", daemon=True)

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, code: int, body: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        handler.send_response(code)
        handler.send_header("Content-Type", ctype)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if handler.close_connection:
            handler.send_header("Connection", "close")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
