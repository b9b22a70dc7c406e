"""HTTP API: every endpoint, auth, validation (4xx with a message), metrics. SQLite and PostgreSQL."""
from __future__ import annotations

import uuid
import warnings

import pytest

from results_testlib import TOKEN

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def body(**overrides):
    b = {"jobId": "job-1", "pipelineId": "liver", "payloadId": "payload-1", "agent": "ClaraSCU",
         "parameters": '"Orthanc"', "uris": ["operators/dicom-writer/dicom/1.dcm"]}
    b.update(overrides)
    return b


@pytest.fixture
def store(make_store):
    return make_store(lease_seconds=60, max_retries=3)


@pytest.fixture
def client(store):
    from clara_results.app import create_app

    with TestClient(create_app(store, TOKEN), raise_server_exceptions=False) as c:
        yield c


def create(client, **overrides):
    r = client.post("/api/tasks", json=body(**overrides), headers=AUTH)
    assert r.status_code == 201, r.text
    return r.json()


# --------------------------------------------------------------------------- auth
PROTECTED = [
    ("POST", "/api/tasks"),
    ("GET", "/api/tasks"),
    ("GET", f"/api/tasks/{uuid.uuid4()}"),
    ("GET", "/api/tasks/ClaraSCU/pending"),
    ("PUT", f"/api/tasks/success/{uuid.uuid4()}"),
    ("PUT", f"/api/tasks/failure/{uuid.uuid4()}"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/no/such/path"),
]


@pytest.mark.parametrize("backend", ["sqlite"])  # authentication happens before any storage
@pytest.mark.parametrize("headers,why", [
    ({}, "missing bearer token"),
    ({"Authorization": "Bearer wrong"}, "wrong bearer token"),
    ({"Authorization": f"Bearer {TOKEN}x"}, "wrong bearer token"),
    ({"Authorization": f"Basic {TOKEN}"}, "malformed Authorization header"),
    ({"Authorization": "Bearer"}, "malformed Authorization header"),
])
def test_every_endpoint_but_health_needs_the_token(client, store, headers, why):
    for method, path in PROTECTED:
        r = client.request(method, path, headers=headers, json=body())
        assert r.status_code == 401, (method, path)
        assert r.json()["message"].startswith(why)
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert store.list() == []


def test_right_token_is_accepted(client):
    assert client.get("/api/tasks", headers=AUTH).status_code == 200
    assert client.get("/api/tasks", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_health_needs_no_token(client):
    assert client.get("/health/live").json()["status"] == "ok"
    assert client.get("/health/ready").json()["status"] == "ok"


def test_openapi_document(client):
    doc = client.get("/openapi.json", headers=AUTH).json()
    paths = doc["paths"]
    for p in ["/api/tasks", "/api/tasks/{taskId}", "/api/tasks/{agent}/pending", "/api/tasks/success/{taskId}",
              "/api/tasks/failure/{taskId}", "/health/live", "/health/ready", "/metrics"]:
        assert p in paths
    assert any(s["type"] == "http" and s["scheme"] == "bearer"
               for s in doc["components"]["securitySchemes"].values())
    props = doc["components"]["schemas"]["TaskOut"]["properties"]
    for field in ["id", "jobId", "pipelineId", "payloadId", "agent", "parameters", "uris", "state", "retries"]:
        assert field in props


# --------------------------------------------------------------------------- tasks
def test_create_lookup_list(client):
    t = create(client, uris=["a/1.dcm", "a/2.dcm"])
    assert t["state"] == 1 and t["stateName"] == "Pending" and t["retries"] == 0
    assert t["uris"] == ["a/1.dcm", "a/2.dcm"] and t["parameters"] == '"Orthanc"'
    assert client.get(f"/api/tasks/{t['id']}", headers=AUTH).json() == t
    create(client, agent="renderserver", parameters=None, jobId="job-2")
    listed = client.get("/api/tasks", headers=AUTH).json()
    assert [x["id"] for x in listed][0] == t["id"] and len(listed) == 2
    assert len(client.get("/api/tasks?agent=renderserver", headers=AUTH).json()) == 1
    assert len(client.get("/api/tasks?jobId=job-2", headers=AUTH).json()) == 1
    assert len(client.get("/api/tasks?state=1&limit=1", headers=AUTH).json()) == 1
    assert client.get("/api/tasks?state=3", headers=AUTH).json() == []


def test_idempotency_key(client):
    r1 = client.post("/api/tasks", json=body(idempotencyKey="job-1/op/ClaraSCU/0"), headers=AUTH)
    r2 = client.post("/api/tasks", json=body(idempotencyKey="job-1/op/ClaraSCU/0"), headers=AUTH)
    assert (r1.status_code, r2.status_code) == (201, 200)
    assert r1.json()["id"] == r2.json()["id"]


def test_lease_success_flow(client):
    t = create(client)
    leased = client.get("/api/tasks/ClaraSCU/pending?size=5", headers=AUTH).json()
    assert [x["id"] for x in leased] == [t["id"]]
    assert leased[0]["state"] == 2 and leased[0]["leaseExpiresAt"]
    assert client.get("/api/tasks/ClaraSCU/pending", headers=AUTH).json() == []
    r = client.put(f"/api/tasks/success/{t['id']}", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == 3 and r.json()["finishedAt"]
    assert client.put(f"/api/tasks/success/{t['id']}", headers=AUTH).status_code == 200


def test_failure_with_retry_later_then_max_retries(client):
    t = create(client)
    states = []
    for _ in range(3):
        assert len(client.get("/api/tasks/ClaraSCU/pending", headers=AUTH).json()) == 1
        r = client.put(f"/api/tasks/failure/{t['id']}", json={"retryLater": True}, headers=AUTH)
        assert r.status_code == 200
        states.append((r.json()["state"], r.json()["retries"]))
    assert states == [(1, 1), (1, 2), (4, 3)]
    assert client.get("/api/tasks/ClaraSCU/pending", headers=AUTH).json() == []


def test_failure_without_retry_later(client):
    t = create(client)
    client.get("/api/tasks/ClaraSCU/pending", headers=AUTH)
    r = client.put(f"/api/tasks/failure/{t['id']}", json={"retryLater": False}, headers=AUTH)
    assert r.json()["state"] == 4 and r.json()["retries"] == 1
    r = client.put(f"/api/tasks/success/{t['id']}", headers=AUTH)
    assert r.status_code == 409 and "already failed" in r.json()["message"]


def test_failure_body_defaults_to_no_retry(client):
    t = create(client)
    client.get("/api/tasks/ClaraSCU/pending", headers=AUTH)
    assert client.put(f"/api/tasks/failure/{t['id']}", headers=AUTH).json()["state"] == 4


def test_lease_expiry(client, clock):
    t = create(client)
    first, = client.get("/api/tasks/ClaraSCU/pending", headers=AUTH).json()
    clock.advance(61)
    expired = client.get(f"/api/tasks/{t['id']}", headers=AUTH).json()
    # the expired lease counts as a failed attempt with retryLater
    assert expired["state"] == 1 and expired["retries"] == 1 and expired["leaseExpiresAt"] is None
    again = client.get("/api/tasks/ClaraSCU/pending", headers=AUTH).json()
    assert [x["id"] for x in again] == [t["id"]] and again[0]["retries"] == 1
    assert again[0]["leaseId"] and again[0]["leaseId"] != first["leaseId"]


def test_report_on_pending_task_is_a_conflict(client):
    t = create(client)
    for path in (f"/api/tasks/success/{t['id']}", f"/api/tasks/failure/{t['id']}"):
        r = client.put(path, json={"retryLater": True}, headers=AUTH)
        assert r.status_code == 409 and "not leased" in r.json()["message"]


@pytest.mark.parametrize("task_id", [str(uuid.uuid4()), "not-a-uuid", "%00", "x" * 150])
def test_unknown_task(client, task_id):
    for method, path in [("GET", f"/api/tasks/{task_id}"), ("PUT", f"/api/tasks/success/{task_id}"),
                         ("PUT", f"/api/tasks/failure/{task_id}")]:
        r = client.request(method, path, headers=AUTH, json={"retryLater": True})
        assert r.status_code == 404, (method, path, r.text)
        assert "no task" in r.json()["message"]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("overrides,fragment", [
    ({"agent": "-bad"}, "agent"),
    ({"agent": "bad-"}, "agent"),
    ({"agent": "a" * 64}, "agent"),
    ({"agent": None}, "agent"),
    ({"uris": []}, "uris"),
    ({"uris": ["/etc/passwd"]}, "relative"),
    ({"uris": ["a/../../x"]}, ".."),
    ({"uris": ["a\x00b"]}, "NUL"),
    ({"uris": "a.dcm"}, "uris"),
    ({"uris": [1]}, "uris"),
    ({"payloadId": "../other"}, "payloadId"),
    ({"payloadId": "a/b"}, "payloadId"),
    ({"jobId": ""}, "jobId"),
    ({"jobId": "a\nb"}, "jobId"),
    ({"parameters": "x\x00"}, "NUL"),
    ({"parameters": 5}, "parameters"),
    ({"parameters": "x" * 70000}, "parameters"),
    ({"idempotencyKey": ""}, "idempotencyKey"),
])
def test_bad_task_is_a_4xx_with_a_message(client, overrides, fragment):
    r = client.post("/api/tasks", json=body(**overrides), headers=AUTH)
    assert r.status_code == 422, r.text
    assert r.json()["message"].startswith("invalid request")
    assert fragment in r.text


@pytest.mark.parametrize("missing", ["jobId", "pipelineId", "payloadId", "agent", "uris"])
def test_missing_field(client, missing):
    b = body()
    del b[missing]
    r = client.post("/api/tasks", json=b, headers=AUTH)
    assert r.status_code == 422 and missing in r.json()["message"]


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b"\xff\xfe\x00", b'{"jobId": "\\ud800"}', b""])
def test_malformed_bodies(client, raw):
    r = client.post("/api/tasks", content=raw, headers={**AUTH, "content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["message"]


@pytest.mark.parametrize("query", ["size=0", "size=-1", "size=1001", "size=abc", "size=99999999999999999999999"])
def test_bad_lease_size(client, query):
    r = client.get(f"/api/tasks/ClaraSCU/pending?{query}", headers=AUTH)
    assert r.status_code == 422 and "size" in r.json()["message"]


@pytest.mark.parametrize("agent", ["-x", "x-", "a%20b", "%ED%A0%80", "a" * 64])
def test_bad_agent_in_path(client, agent):
    r = client.get(f"/api/tasks/{agent}/pending", headers=AUTH)
    assert r.status_code in (404, 422) and r.json()["message"]


@pytest.mark.parametrize("query", ["state=0", "state=5", "limit=0", "limit=5000", "offset=-1", "agent=-x",
                                   "jobId=%00"])
def test_bad_list_query(client, query):
    r = client.get(f"/api/tasks?{query}", headers=AUTH)
    assert r.status_code == 422 and r.json()["message"]


def test_bad_failure_body(client):
    t = create(client)
    client.get("/api/tasks/ClaraSCU/pending", headers=AUTH)
    r = client.put(f"/api/tasks/failure/{t['id']}", json={"retryLater": "perhaps"}, headers=AUTH)
    assert r.status_code == 422 and "retryLater" in r.json()["message"]


def test_wrong_method_and_path(client):
    r = client.delete("/api/tasks", headers=AUTH)
    assert r.status_code == 405 and r.json()["message"]
    r = client.get("/api/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["message"] == "no such endpoint"


def test_oversized_body_is_413(client, monkeypatch):
    import clara_results.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 1000)
    r = client.post("/api/tasks", json=body(uris=["a/" + "x" * 100] * 20), headers=AUTH)
    assert r.status_code == 413 and "larger" in r.json()["message"]

    def chunks():
        yield b'{"jobId": "'
        yield b"x" * 2000
        yield b'"}'

    r = client.post("/api/tasks", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413


def test_unavailable_database_is_503(client, store, monkeypatch):
    from clara_results.store import StoreUnavailable

    def broken(*a, **k):
        raise StoreUnavailable("connection refused")

    monkeypatch.setattr(store, "lease", broken)
    monkeypatch.setattr(store, "ping", broken)
    r = client.get("/api/tasks/ClaraSCU/pending", headers=AUTH)
    assert r.status_code == 503 and "database unavailable" in r.json()["message"]
    assert client.get("/health/ready").status_code == 503


# --------------------------------------------------------------------------- metrics
def test_metrics(client):
    t = create(client)
    create(client)
    client.get("/api/tasks/ClaraSCU/pending?size=1", headers=AUTH)
    client.put(f"/api/tasks/success/{t['id']}", headers=AUTH)
    client.get("/api/tasks/-bad/pending", headers=AUTH)
    text = client.get("/metrics", headers=AUTH).text
    assert "clara_results_tasks_created_total 2.0" in text
    assert "clara_results_tasks_leased_total 1.0" in text
    assert 'clara_results_task_reports_total{outcome="succeeded"} 1.0' in text
    assert 'clara_results_tasks{state="Pending"} 1.0' in text
    assert 'clara_results_tasks{state="Succeeded"} 1.0' in text
    assert 'route="/api/tasks/{agent}/pending",status="422"' in text
    assert "clara_results_store_up 1.0" in text
