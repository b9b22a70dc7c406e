"""The real server (uvicorn on 127.0.0.1) with the client: real-time lease expiry, concurrent
pollers, restarts, start-up errors, the results-service command."""
from __future__ import annotations

import os
import threading

import pytest

from clara_dicom.errors import UserError
from clara_results.client import (
    ResultsAuthError,
    ResultsClient,
    ResultsRequestError,
    ResultsUnavailable,
    TaskConflictError,
    TaskNotFoundError,
    TaskState,
)
from peers import ResultsService
from results_testlib import TOKEN, free_port, wait_for


def add(client: ResultsClient, n: int = 1, agent: str = "ClaraSCU", **kw) -> list:
    return [client.create_task(job_id="job-1", pipeline_id="liver", payload_id="payload-1", agent=agent,
                               uris=[f"operators/w/dicom/{i}.dcm"], parameters='"Orthanc"', **kw)
            for i in range(n)]


def test_client_round_trip(start_server):
    server = start_server()
    with ResultsClient(server.url, TOKEN) as client:
        assert client.ready()
        task, = add(client)
        assert client.get_task(task.id) == task
        leased = client.lease("ClaraSCU", 5)
        assert [t.id for t in leased] == [task.id] and leased[0].state == TaskState.IN_PROGRESS
        assert client.report_failure(task.id, retry_later=True).state == TaskState.PENDING
        client.lease("ClaraSCU", 1)
        assert client.report_success(task.id).state == TaskState.SUCCEEDED
        assert [t.id for t in client.list_tasks(state=TaskState.SUCCEEDED)] == [task.id]
        assert len(list(client.iter_tasks(page_size=1))) == 1
        with pytest.raises(TaskConflictError):
            client.report_failure(task.id, retry_later=False)
        with pytest.raises(TaskNotFoundError):
            client.get_task("00000000-0000-0000-0000-000000000000")
        with pytest.raises(ResultsRequestError):
            client.lease("bad agent/..", 1)
    with ResultsClient(server.url, "wrong") as bad:
        with pytest.raises(ResultsAuthError):
            bad.list_tasks()


@pytest.mark.slow
def test_lease_expires_in_real_time(start_server):
    server = start_server(lease_seconds=1)
    with ResultsClient(server.url, TOKEN) as client:
        task, = add(client)
        assert [t.id for t in client.lease("ClaraSCU", 1)] == [task.id]
        assert client.lease("ClaraSCU", 1) == []
        again = wait_for(lambda: client.lease("ClaraSCU", 1), timeout=5, what="the lease to expire")
        assert [t.id for t in again] == [task.id]


def test_four_concurrent_pollers_never_get_the_same_task(start_server):
    server = start_server()
    with ResultsClient(server.url, TOKEN) as client:
        ids = {t.id for t in add(client, 60)}
    got: list[list[str]] = [[] for _ in range(4)]
    errors: list[BaseException] = []

    def poll(i: int) -> None:
        try:
            with ResultsClient(server.url, TOKEN) as c:
                while True:
                    batch = c.lease("ClaraSCU", 2)
                    if not batch:
                        return
                    for t in batch:
                        got[i].append(t.id)
                        c.report_success(t.id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    flat = [x for g in got for x in g]
    assert len(flat) == len(set(flat)) and set(flat) == ids
    with ResultsClient(server.url, TOKEN) as client:
        assert len(client.list_tasks(state=TaskState.SUCCEEDED, limit=1000)) == 60


def test_tasks_survive_a_restart(start_server, dsn):
    server = start_server()
    with ResultsClient(server.url, TOKEN) as client:
        pending, leased = add(client, 2)
        client.lease("ClaraSCU", 1)
    server.stop()
    server2 = start_server()
    with ResultsClient(server2.url, TOKEN) as client:
        assert client.get_task(pending.id).state == TaskState.IN_PROGRESS
        assert client.get_task(leased.id).state == TaskState.PENDING
        assert client.report_success(pending.id).state == TaskState.SUCCEEDED


def test_retention_thread_purges(start_server):
    server = start_server(retention_seconds=0.2, purge_interval=0.1)
    with ResultsClient(server.url, TOKEN) as client:
        task, = add(client)
        client.lease("ClaraSCU", 1)
        client.report_success(task.id)
        wait_for(lambda: client.list_tasks() == [], timeout=10, what="retention to delete the task")


def test_port_in_use_is_a_user_error(start_server):
    server = start_server()
    with pytest.raises(UserError, match="cannot listen"):
        start_server(port=server.port)


def test_no_token_is_a_user_error(start_server):
    with pytest.raises(UserError, match="token"):
        start_server(token="")


def test_unreachable_service_raises_unavailable():
    with ResultsClient(f"http://127.0.0.1:{free_port()}", TOKEN, timeout=2) as client:
        with pytest.raises(ResultsUnavailable):
            client.lease("ClaraSCU", 1)
        assert not client.ready()


def test_results_service_command(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {k: v for k, v in os.environ.items() if k != "CLARA_RESULTS_TOKEN"}
    service = ResultsService(tmp_path / "r.db", tmp_path, "--max-retries", "1", "--token-file", str(token_file),
                             env=env)
    try:
        with ResultsClient(service.url, TOKEN) as client:
            task, = add(client)
            client.lease("ClaraSCU", 1)
            # --max-retries 1: the first failure is final even with retryLater
            assert client.report_failure(task.id, retry_later=True).state == TaskState.FAILED
    finally:
        rc = service.stop(30)
    assert rc == 0, service.log()
    assert (tmp_path / "r.db").exists()


@pytest.mark.parametrize("args,env,message", [
    ([], {}, "no token"),
    (["--token-file", "/nonexistent/token"], {}, "cannot read --token-file"),
    (["--database", "/nonexistent/dir/r.db"], {"CLARA_RESULTS_TOKEN": "t"}, "cannot open the results database"),
])
def test_results_service_command_errors_are_one_line(args, env, message, capsys, monkeypatch):
    from clara_dicom.cli import main

    monkeypatch.delenv("CLARA_RESULTS_TOKEN", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(["results-service", "--host", "127.0.0.1", "--port", "0", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and message in err[0], err


# A password in every place libpq takes one, and schemes that are not PostgreSQL's:
# one line without the password, and no SQLite file named after the DSN (before: the
# key=value DSN not starting with host=/dbname= and foreign schemes became SQLite
# files, the password in their names, and the service ran on them; ?password= was echoed).
@pytest.mark.parametrize("database", [
    "postgresql://127.0.0.1:1/x?user=clara&password=secret",
    "postgresql://:secret@127.0.0.1:1/x",
    "user=clara password=secret host=127.0.0.1 port=1 dbname=x",
    "POSTGRESQL://clara:secret@127.0.0.1:1/x",
    "postgresql+psycopg://clara:secret@127.0.0.1:1/x",
])
def test_a_bad_database_dsn_is_one_line_without_its_password_and_no_sqlite_file(database, tmp_path, capsys,
                                                                                  monkeypatch):
    from clara_results.store import StoreUnavailable, open_store

    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreUnavailable):  # checked first: before the fix some DSNs opened (and the service ran)
        open_store(database).close()
    from clara_dicom.cli import main

    monkeypatch.setenv("CLARA_RESULTS_TOKEN", "t")
    rc = main(["results-service", "--host", "127.0.0.1", "--port", "0", "--database", database])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "cannot open the results database" in err[0], err
    assert "secret" not in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.postgres
def test_a_key_value_dsn_in_any_order_opens_postgres(postgres_dsn, tmp_path, monkeypatch):
    from clara_results.store import PostgresStore, open_store

    monkeypatch.chdir(tmp_path)  # where a SQLite file named after the DSN would land

    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(postgres_dsn)
    store = open_store(" ".join(f"{k}={params[k]}" for k in ("user", "port", "host", "dbname") if k in params))
    try:
        assert isinstance(store, PostgresStore)
    finally:
        store.close()
    assert list(tmp_path.iterdir()) == []
