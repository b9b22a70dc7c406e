"""Readiness follows the database (issue 16, chart replicas): while PostgreSQL is
down, the adapter's /health/ready (journal unreachable) and the Results Service's
/health/ready (database unreachable) answer 503 with the reason, so Kubernetes takes
that replica out of its Service; once PostgreSQL is back, both are ready again.
Real processes on a real PostgreSQL that the test stops and starts."""
from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from local_setup import write_config
from peers import ResultsService, wait_for
from postgres_server import own_postgres_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.postgres


def probe(port: int) -> tuple[int, str]:
    """(HTTP status, body) of /health/ready; (0, error) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def test_adapter_readiness_follows_its_postgres_journal(tmp_path, own_postgres_server, local_adapter):
    pg = own_postgres_server
    config = write_config(tmp_path / "cfg")
    adapter = local_adapter(config, state=tmp_path / "state", extra=["--journal", pg.dsn])
    assert probe(adapter.http_port) == (200, "ready\n")
    pg.halt()
    try:
        status, body = wait_for(lambda: (s := probe(adapter.http_port))[0] == 503 and s, 20, interval=0.2,
                                what="adapter not ready while PostgreSQL is down")
        assert body == "not ready: journal unreachable\n", body
        assert adapter.alive()  # not ready is not dead: liveness stays up
    finally:
        pg.launch()
    wait_for(lambda: probe(adapter.http_port)[0] == 200, 30, interval=0.2, what="adapter ready again")


def test_results_service_readiness_follows_its_postgres_database(tmp_path, own_postgres_server):
    pg = own_postgres_server
    service = ResultsService(pg.dsn, tmp_path, token="t" * 32)
    try:
        pg.halt()
        try:
            status, body = wait_for(lambda: (s := probe(service.port))[0] == 503 and s, 30, interval=0.2,
                                    what="Results Service not ready while PostgreSQL is down")
            assert '"status":"unavailable"' in body and "PostgreSQL" in body, body
            assert service.alive()
        finally:
            pg.launch()
        wait_for(lambda: probe(service.port)[0] == 200, 30, interval=0.2, what="Results Service ready again")
    finally:
        service.stop(30)
