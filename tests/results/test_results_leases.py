"""Fenced, renewable leases (SPEC §9 "Results Service leases") on a controllable clock:
store and HTTP API, SQLite and PostgreSQL."""
from __future__ import annotations

import sqlite3
import uuid
import warnings

import pytest

from clara_results.models import NewTask, TaskState
from clara_results.store import TaskConflict, TaskNotFound
from results_testlib import TOKEN

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def new(agent: str = "ClaraSCU") -> NewTask:
    return NewTask(job_id="job-1", pipeline_id="pipe", payload_id="payload-1", agent=agent,
                   uris=("operators/w/dicom/a.dcm",), parameters='"Orthanc"', operator="register-dicom")


def lease_one(store, agent: str = "ClaraSCU"):
    leased = store.lease(agent, 1)
    assert len(leased) == 1
    return leased[0]


# --------------------------------------------------------------------------- store
def test_every_lease_has_a_new_id(make_store, clock):
    store = make_store(lease_seconds=10)
    task = store.create(new())[0]
    first = lease_one(store)
    assert first.lease_id and first.lease_expires_at == pytest.approx(clock.now + 10)
    assert store.get(task.id).lease_id is None  # the fencing token goes to the holder only
    store.report_failure(task.id, True, first.lease_id)
    second = lease_one(store)
    assert second.lease_id and second.lease_id != first.lease_id
    for _ in range(3):
        store.create(new())
    ids = {t.lease_id for t in store.lease("ClaraSCU", 3)}
    assert len(ids) == 3 and first.lease_id not in ids and second.lease_id not in ids


def test_a_stale_report_changes_nothing(make_store, clock):
    store = make_store(lease_seconds=10, max_retries=5)
    task = store.create(new())[0]
    old = lease_one(store)
    clock.advance(11)
    current = lease_one(store)  # the expired lease is handed to someone else
    assert current.retries == 1
    before = store.get(task.id)
    for stale in (lambda: store.report_success(task.id, old.lease_id),
                  lambda: store.report_failure(task.id, True, old.lease_id),
                  lambda: store.report_failure(task.id, False, old.lease_id),
                  lambda: store.renew(task.id, old.lease_id),
                  lambda: store.report_success(task.id, "0" * 32)):
        with pytest.raises(TaskConflict, match="not the current lease"):
            stale()
        assert store.get(task.id) == before
    assert store.report_success(task.id, current.lease_id).state == TaskState.SUCCEEDED
    with pytest.raises(TaskConflict):  # still refused after the task finished
        store.report_success(task.id, old.lease_id)


def test_repeating_the_report_that_ended_the_lease_is_harmless(make_store, clock):
    store = make_store(max_retries=5)
    ok, retry, fail = (store.create(new())[0] for _ in range(3))
    leases = {t.id: t.lease_id for t in store.lease("ClaraSCU", 3)}
    done = store.report_success(ok.id, leases[ok.id])
    clock.advance(1)
    assert store.report_success(ok.id, leases[ok.id]) == done
    with pytest.raises(TaskConflict, match="succeeded"):
        store.report_failure(ok.id, True)  # a different report is not a repeat
    back = store.report_failure(retry.id, True, leases[retry.id])
    assert back.state == TaskState.PENDING and back.retries == 1
    assert store.report_failure(retry.id, True, leases[retry.id]) == back  # retries not counted twice
    with pytest.raises(TaskConflict):
        store.report_success(retry.id, leases[retry.id])
    failed = store.report_failure(fail.id, False, leases[fail.id])
    assert store.report_failure(fail.id, False, leases[fail.id]) == failed
    assert store.get(retry.id).retries == 1 and store.get(fail.id).retries == 1


def test_clients_without_lease_ids_still_work(make_store, clock):
    store = make_store(lease_seconds=10, max_retries=3)
    a, b = store.create(new())[0], store.create(new())[0]
    store.lease("ClaraSCU", 2)
    assert store.report_success(a.id).state == TaskState.SUCCEEDED
    assert store.report_success(a.id).state == TaskState.SUCCEEDED  # idempotent, as before
    assert store.report_failure(b.id, True).state == TaskState.PENDING
    with pytest.raises(TaskConflict, match="not leased"):
        store.report_failure(b.id, True)  # Pending: accepted only while InProgress
    lease_one(store)
    clock.advance(11)  # expired, not leased again: its holder may still report
    assert store.report_failure(b.id, True).retries == 2  # the report is the attempt, not counted twice


def test_renewal_extends_the_lease_from_now(make_store, clock):
    store = make_store(lease_seconds=10)
    task = store.create(new())[0]
    held = lease_one(store)
    for _ in range(5):  # an export five times longer than the lease
        clock.advance(8)
        assert store.renew(task.id, held.lease_id) == pytest.approx(clock.now + 10)
        assert store.lease("ClaraSCU", 1) == []
    got = store.get(task.id)
    assert got.state == TaskState.IN_PROGRESS and got.retries == 0
    assert got.lease_expires_at == pytest.approx(clock.now + 10)
    assert store.report_success(task.id, held.lease_id).state == TaskState.SUCCEEDED
    with pytest.raises(TaskConflict, match="succeeded"):
        store.renew(task.id, held.lease_id)


def test_an_expired_lease_not_yet_handed_out_can_be_renewed(make_store, clock):
    store = make_store(lease_seconds=10, retry_delay=30, max_retries=3)
    task = store.create(new())[0]
    held = lease_one(store)
    clock.advance(15)
    assert store.get(task.id).state == TaskState.PENDING and store.get(task.id).retries == 1
    store.lease("ClaraSCU", 1)  # within the back-off: not handed out
    assert store.renew(task.id, held.lease_id) == pytest.approx(clock.now + 10)
    renewed = store.get(task.id)
    assert renewed.state == TaskState.IN_PROGRESS and renewed.retries == 0  # the attempt was not lost
    clock.advance(11 + 30)  # expires again, and its back-off passes
    other = lease_one(store)
    assert other.lease_id != held.lease_id
    with pytest.raises(TaskConflict, match="not the current lease"):
        store.renew(task.id, held.lease_id)
    assert store.renew(task.id, other.lease_id) == pytest.approx(clock.now + 10)


def test_renewing_after_a_failure_report_or_an_unknown_task_is_refused(make_store):
    store = make_store(max_retries=3)
    task = store.create(new())[0]
    held = lease_one(store)
    store.report_failure(task.id, True, held.lease_id)
    with pytest.raises(TaskConflict, match="failure report"):
        store.renew(task.id, held.lease_id)
    with pytest.raises(TaskNotFound):
        store.renew(str(uuid.uuid4()), held.lease_id)


def test_expired_leases_count_as_attempts_so_a_poison_task_stops(make_store, clock):
    store = make_store(lease_seconds=10, retry_delay=5, max_retries=3, retention_seconds=100)
    task = store.create(new())[0]
    handed_out = []
    for attempt in range(1, 10):  # the agent dies on this task every time
        leased = store.lease("ClaraSCU", 1)
        if not leased:
            break
        handed_out.append(leased[0])
        assert leased[0].retries == attempt - 1
        expiry = clock.now + 10
        clock.advance(10)
        shown = store.get(task.id)
        assert shown.retries == attempt
        if attempt < 3:
            # same back-off as a retryLater failure, counted from the expiry
            assert shown.state == TaskState.PENDING
            assert shown.available_at == pytest.approx(expiry + store.backoff(attempt))
            assert store.lease("ClaraSCU", 1) == []
            clock.advance(store.backoff(attempt))
    assert len(handed_out) == 3
    final = store.get(task.id)
    assert final.state == TaskState.FAILED and final.retries == 3 and final.finished_at == pytest.approx(clock.now)
    assert [t.id for t in store.list(state=TaskState.FAILED)] == [task.id]
    assert store.count_by_state()[TaskState.FAILED] == 1
    for late in (lambda: store.renew(task.id, handed_out[-1].lease_id),
                 lambda: store.report_success(task.id, handed_out[-1].lease_id),
                 lambda: store.report_success(task.id)):
        with pytest.raises(TaskConflict, match="last attempt"):
            late()
    assert store.purge() == 0  # written as Failed, kept for the retention period
    assert store.get(task.id) == final
    clock.advance(101)
    assert store.purge() == 1
    with pytest.raises(TaskNotFound):
        store.get(task.id)


def test_a_late_report_on_a_current_expired_lease_is_accepted(make_store, clock):
    store = make_store(lease_seconds=10, retry_delay=60)
    task = store.create(new())[0]
    held = lease_one(store)
    clock.advance(20)  # expired; the back-off keeps it from being leased again yet
    assert store.lease("ClaraSCU", 1) == []
    done = store.report_success(task.id, held.lease_id)
    assert done.state == TaskState.SUCCEEDED and done.retries == 0


def test_old_sqlite_database_gets_the_lease_column(tmp_path, clock):
    from clara_results.store import open_store

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the schema before leases were fenced
        conn.execute(
            "CREATE TABLE tasks (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
            "idempotency_key TEXT UNIQUE, job_id TEXT NOT NULL, pipeline_id TEXT NOT NULL, payload_id TEXT NOT "
            "NULL, operator TEXT, agent TEXT NOT NULL, parameters TEXT, uris TEXT NOT NULL, state INTEGER NOT "
            "NULL, retries INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, updated_at REAL NOT NULL, "
            "available_at REAL NOT NULL, lease_expires_at REAL, finished_at REAL)")
        conn.execute("INSERT INTO tasks (id, job_id, pipeline_id, payload_id, agent, uris, state, retries, "
                      "created_at, updated_at, available_at, lease_expires_at) VALUES "
                      "('00000000-0000-0000-0000-000000000001', 'j', 'p', 'pl', 'ClaraSCU', '[\"a.dcm\"]', 2, 0, "
                      "?, ?, ?, ?)", (clock.now, clock.now, clock.now, clock.now + 60))
    store = open_store(str(path), clock=clock)
    try:
        # a task leased before the upgrade: its holder has no lease id and reports without one
        assert store.report_success("00000000-0000-0000-0000-000000000001").state == TaskState.SUCCEEDED
        store.create(new())
        assert lease_one(store).lease_id
    finally:
        store.close()


# --------------------------------------------------------------------------- HTTP
@pytest.fixture
def api(make_store):
    from clara_results.app import create_app

    with TestClient(create_app(make_store(lease_seconds=60, max_retries=3), TOKEN),
                    raise_server_exceptions=False) as c:
        yield c


def _create(api) -> str:
    r = api.post("/api/tasks", headers=AUTH, json={
        "jobId": "job-1", "pipelineId": "liver", "payloadId": "payload-1", "agent": "ClaraSCU",
        "parameters": '"Orthanc"', "uris": ["a.dcm"]})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_http_lease_renew_and_fenced_reports(api, clock):
    task_id = _create(api)
    leased, = api.get("/api/tasks/ClaraSCU/pending", headers=AUTH).json()
    lease = leased["leaseId"]
    assert lease and leased["leaseExpiresAt"] and leased["state"] == 2
    assert api.get(f"/api/tasks/{task_id}", headers=AUTH).json()["leaseId"] is None
    clock.advance(50)
    r = api.put(f"/api/tasks/{task_id}/lease", params={"leaseId": lease}, headers=AUTH)
    assert r.status_code == 200 and set(r.json()) == {"leaseExpiresAt"}
    assert r.json()["leaseExpiresAt"] == api.get(f"/api/tasks/{task_id}", headers=AUTH).json()["leaseExpiresAt"]
    clock.advance(61)
    newer, = api.get("/api/tasks/ClaraSCU/pending", headers=AUTH).json()
    assert newer["leaseId"] != lease and newer["retries"] == 1
    for method, path, body in (("put", f"/api/tasks/success/{task_id}", None),
                               ("put", f"/api/tasks/failure/{task_id}", {"retryLater": True}),
                               ("put", f"/api/tasks/{task_id}/lease", None)):
        r = getattr(api, method)(path, params={"leaseId": lease}, json=body, headers=AUTH)
        assert r.status_code == 409 and "not the current lease" in r.json()["message"], r.text
    assert api.get(f"/api/tasks/{task_id}", headers=AUTH).json()["state"] == 2
    ok = api.put(f"/api/tasks/success/{task_id}", params={"leaseId": newer["leaseId"]}, headers=AUTH)
    assert ok.status_code == 200 and ok.json()["state"] == 3
    again = api.put(f"/api/tasks/success/{task_id}", params={"leaseId": newer["leaseId"]}, headers=AUTH)
    assert again.status_code == 200 and again.json() == ok.json()
    assert api.put(f"/api/tasks/{task_id}/lease", params={"leaseId": newer["leaseId"]},
                   headers=AUTH).status_code == 409
    metrics = api.get("/metrics", headers=AUTH).text
    assert "clara_results_lease_renewals_total 1.0" in metrics


@pytest.mark.parametrize("backend", ["sqlite"])  # validation happens before any storage
@pytest.mark.parametrize("params", [{}, {"leaseId": ""}, {"leaseId": "x" * 65}, {"leaseId": "a b"},
                                    {"leaseId": "\x00"}, {"leaseId": "é"}])
def test_http_bad_lease_ids_are_422(api, params):
    task_id = _create(api)
    r = api.put(f"/api/tasks/{task_id}/lease", params=params, headers=AUTH)
    assert r.status_code == 422 and "leaseId" in r.json()["message"], r.text
    if params:
        r = api.put(f"/api/tasks/success/{task_id}", params=params, headers=AUTH)
        assert r.status_code == 422, r.text


@pytest.mark.parametrize("backend", ["sqlite"])
def test_openapi_documents_leases(api):
    doc = api.get("/openapi.json", headers=AUTH).json()
    renew = doc["paths"]["/api/tasks/{taskId}/lease"]["put"]
    assert {p["name"] for p in renew["parameters"]} == {"taskId", "leaseId"}
    assert {"200", "404", "409"} <= set(renew["responses"])
    assert "LeaseOut" in renew["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    for path in ("/api/tasks/success/{taskId}", "/api/tasks/failure/{taskId}"):
        params = {p["name"]: p for p in doc["paths"][path]["put"]["parameters"]}
        assert params["leaseId"]["required"] is False
    task_schema = doc["components"]["schemas"]["TaskOut"]["properties"]
    assert "leaseId" in task_schema and "leaseExpiresAt" in task_schema
