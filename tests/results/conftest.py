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

from typing import Any, Callable, Iterator

import pytest

from peers import stops_what_it_starts
from postgres_server import PostgresServer, running
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
class _Postgres(PostgresServer):
    def reset(self) -> None:
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS tasks")


@pytest.fixture(scope="session")
def _postgres() -> Iterator[_Postgres]:
    with running(_Postgres) as pg:
        yield pg


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

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("retry_delay", 0)
        return open_store(dsn, **kwargs)

    yield from stops_what_it_starts(make, lambda store: store.close())


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
