"""Fixtures for the Results Service tests.

* ``backend``: parametrised over ``sqlite`` and ``postgres`` (marked
  ``pytest.mark.postgres``); ``dsn`` gives a fresh empty database for it.
* ``postgres_dsn``: a throw-away PostgreSQL server (Debian binaries) on
  127.0.0.1, started once per session in a temporary directory and stopped at
  the end. Without the binaries the postgres tests skip, except under CI=true
  where they fail loudly.
* ``clock``: a controllable clock for the store.
* ``start_server``: starts ResultsServer instances on 127.0.0.1:<free port>; stops them.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterator

import pytest

from results_testlib import TOKEN, FakeClock, free_port, wait_for  # noqa: F401


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """clara_dicom.cli.main() installs a root handler on the (captured) stderr; undo it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# --------------------------------------------------------------------------- PostgreSQL
def _pg_bindir() -> str | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


class _Postgres:
    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.tmp = tempfile.mkdtemp(prefix="clara-results-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.run_as: dict[str, Any] = {}
        if os.geteuid() == 0:  # postgres refuses to run as root
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            self.run_as = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(
            [os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres", "-A", "trust",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=self.env, cwd=self.tmp,
            **self.run_as,
        )
        self.log = open(os.path.join(self.tmp, "postgres.log"), "wb")
        self.proc = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.tmp}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=60", "-c", "shared_buffers=32MB"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tmp, **self.run_as,
        )
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {open(os.path.join(self.tmp, 'postgres.log')).read()[-2000:]}")
            try:
                psycopg.connect(self.dsn, connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(Exception):
            self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def reset(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS tasks")


@pytest.fixture(scope="session")
def _postgres() -> Iterator[_Postgres]:
    bindir = _pg_bindir()
    if bindir is None:
        message = "PostgreSQL binaries (initdb, postgres) not found: install Debian postgresql"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    pg = _Postgres(bindir)
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def postgres_dsn(_postgres: _Postgres) -> Iterator[str]:
    _postgres.reset()
    yield _postgres.dsn
    _postgres.reset()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def dsn(backend: str, tmp_path: Any, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database of the current backend (SQLite file or PostgreSQL)."""
    if backend == "sqlite":
        return str(tmp_path / "results.db")
    return request.getfixturevalue("postgres_dsn")


@pytest.fixture
def make_store(dsn: str, clock: FakeClock) -> Iterator[Callable[..., Any]]:
    """Open stores on ``dsn`` (controllable clock by default); closed at teardown."""
    from clara_results.store import open_store

    opened = []

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("retry_delay", 0)
        store = open_store(dsn, **kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def start_server(dsn: str) -> Iterator[Callable[..., Any]]:
    """Start a ResultsServer on 127.0.0.1 (free port) over ``dsn``; all are stopped at teardown."""
    from clara_results.server import ResultsServer

    started = []

    def start(**kwargs: Any) -> Any:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        kwargs.setdefault("database", dsn)
        kwargs.setdefault("token", TOKEN)
        kwargs.setdefault("retry_delay", 0)
        server = ResultsServer(**kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
