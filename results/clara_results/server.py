"""An embeddable Results Service: uvicorn in a background thread.

    server = ResultsServer(port=0, database="state/results.db", token="s3cret")
    server.start()          # returns once it accepts connections
    print(server.url)       # e.g. http://127.0.0.1:43127
    ...
    server.stop()

Used by ``clara-dicom up`` (in-process) and by tests (free port, 127.0.0.1).
``serve_forever()`` runs it in the calling (main) thread with SIGINT/SIGTERM
handling, as ``clara-dicom results-service`` does.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from typing import Any, Callable

from clara_dicom.errors import UserError
from clara_results.store import (
    DEFAULT_LEASE_SECONDS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_RETENTION_SECONDS,
    DEFAULT_RETRY_DELAY,
    StoreUnavailable,
    TaskStore,
    describe_database,
    open_store,
)

log = logging.getLogger(__name__)


class _Purger(threading.Thread):
    """Deletes finished tasks past the retention period, periodically."""

    def __init__(self, store: TaskStore, interval: float, on_purged: Callable[[int], None]) -> None:
        super().__init__(name="results-purger", daemon=True)
        self.store = store
        self.interval = interval
        self.on_purged = on_purged
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                n = self.store.purge()
                if n:
                    self.on_purged(n)
                    log.info("purged %d finished task(s) past retention", n)
            except Exception as exc:  # noqa: BLE001 - keep purging later
                log.warning("purging finished tasks failed: %s", exc)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        self._stop_event.set()


class ResultsServer:
    """The Results Service on ``host:port`` (port 0 = a free port), storing tasks in ``database``.

    ``database``: a DSN as accepted by :func:`clara_results.store.open_store`
    (SQLite path / ``sqlite:///…`` / ``:memory:``, or ``postgresql://…``).
    ``token``: the bearer token clients must send. ``max_retries``, ``lease_seconds``,
    ``retry_delay`` (base of the exponential delay before a retried task is leased
    again) and ``retention_seconds`` (how long finished tasks are kept) configure
    the store; ``purge_interval`` how often retention runs (default: a tenth of the
    retention, between 1 s and 5 min). ``clock`` is for tests.

    ``start()`` raises :class:`clara_dicom.errors.UserError` with a one-line message
    when the database cannot be opened or the port cannot be bound.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        database: str = "results.db",
        token: str = "",
        *,
        max_retries: int = DEFAULT_MAX_RETRIES,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        retry_delay: float = DEFAULT_RETRY_DELAY,
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        purge_interval: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not token:
            raise UserError("the Results Service needs a token: set CLARA_RESULTS_TOKEN or use --token-file")
        self.host = host
        self.port = port
        self.database = database
        self.token = token
        self.store_options: dict[str, Any] = dict(
            max_retries=max_retries,
            lease_seconds=lease_seconds,
            retry_delay=retry_delay,
            retention_seconds=retention_seconds,
        )
        if clock is not None:  # tests; else each store's own (PostgreSQL: the database's clock)
            self.store_options["clock"] = clock
        if purge_interval is None:
            purge_interval = min(300.0, max(1.0, retention_seconds / 10))
        self.purge_interval = purge_interval
        self.store: TaskStore | None = None
        self.app: Any = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._purger: _Purger | None = None
        self._sock: socket.socket | None = None

    # ------------------------------------------------------------------ setup
    @property
    def url(self) -> str:
        """Base URL clients use, e.g. ``http://127.0.0.1:8000``."""
        host = self.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def _prepare(self) -> Any:
        import uvicorn

        from clara_results.app import create_app

        try:
            self.store = open_store(self.database, **self.store_options)
        except StoreUnavailable as exc:
            raise UserError(f"cannot open the results database ({describe_database(self.database)}): {exc}") from None
        except ValueError as exc:
            raise UserError(str(exc)) from None
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            family, socktype, proto, _, addr = infos[0]
            sock = socket.socket(family, socktype, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError as exc:
            self.store.close()
            raise UserError(f"cannot listen on {self.host}:{self.port}: {exc.strerror or exc}") from None
        self._sock = sock
        self.port = sock.getsockname()[1]
        self.app = create_app(self.store, self.token)
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(config)
        metrics = self.app.state.metrics
        self._purger = _Purger(self.store, self.purge_interval, metrics.purged.inc)
        log.info(
            "Results Service on %s (database %s, max retries %d, lease %gs)",
            self.url, describe_database(self.database),
            self.store_options["max_retries"], self.store_options["lease_seconds"],
        )
        return self._server

    # ------------------------------------------------------------------ run
    def start(self, timeout: float = 15.0) -> "ResultsServer":
        """Serve in a background thread; return once connections are accepted."""
        server = self._prepare()
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._sock]}, name="results-service", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not self._thread.is_alive():
                self._cleanup()
                raise UserError("the Results Service stopped while starting; see the log above")
            if time.monotonic() > deadline:
                self.stop()
                raise UserError(f"the Results Service did not start within {timeout:g} s")
            time.sleep(0.01)
        self._purger.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until SIGINT/SIGTERM (for the command line)."""
        server = self._prepare()
        self._purger.start()
        previous = None
        if threading.current_thread() is threading.main_thread():
            # uvicorn re-raises SIGTERM to the previous handler once it has shut down
            # gracefully; make that a clean exit (status 0) rather than death by signal.
            previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            server.run(sockets=[self._sock])
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            self._cleanup()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close the database. Safe to call twice."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._cleanup()

    def _cleanup(self) -> None:
        if self._purger is not None:
            self._purger.stop()
            if self._purger.is_alive():
                self._purger.join(5)
            self._purger = None
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> "ResultsServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
