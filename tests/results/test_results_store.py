"""Task store state machine on a controllable clock; same suite for SQLite and PostgreSQL."""
from __future__ import annotations

import threading
import uuid

import pytest

from clara_results.models import NewTask, TaskState
from clara_results.store import TaskConflict, TaskNotFound


def new(agent: str = "ClaraSCU", job: str = "job-1", key: str | None = None, params: str | None = '"Orthanc"',
        uris: tuple[str, ...] = ("operators/w/dicom/a.dcm",)) -> NewTask:
    return NewTask(job_id=job, pipeline_id="pipe", payload_id="payload-1", agent=agent, uris=uris,
                   parameters=params, operator="register-dicom", idempotency_key=key)


def test_create_and_get(make_store):
    store = make_store()
    task, created = store.create(new(uris=("a/1.dcm", "a/2.dcm")))
    assert created
    assert task.state == TaskState.PENDING and task.retries == 0
    got = store.get(task.id)
    assert got == task
    assert got.uris == ("a/1.dcm", "a/2.dcm")
    assert got.parameters == '"Orthanc"'
    assert got.operator == "register-dicom"


def test_idempotency_key_returns_the_stored_task(make_store):
    store = make_store()
    first, created1 = store.create(new(key="k1"))
    again, created2 = store.create(new(key="k1", params='"Other"'))
    assert created1 and not created2
    assert again.id == first.id and again.parameters == '"Orthanc"'
    other, created3 = store.create(new(key="k2"))
    assert created3 and other.id != first.id
    # without a key, every create is a new task
    assert store.create(new())[1] and store.create(new())[1]
    assert len(store.list()) == 4


def test_lease_is_fifo_bounded_and_per_agent(make_store, clock):
    store = make_store(lease_seconds=30)
    ids = []
    for _ in range(5):
        ids.append(store.create(new())[0].id)
        clock.advance(0.001)
    store.create(new(agent="renderserver"))
    leased = store.lease("ClaraSCU", 3)
    assert [t.id for t in leased] == ids[:3]
    assert all(t.state == TaskState.IN_PROGRESS for t in leased)
    assert all(t.lease_expires_at == pytest.approx(clock.now + 30) for t in leased)
    assert [t.id for t in store.lease("ClaraSCU", 10)] == ids[3:]
    assert store.lease("ClaraSCU", 10) == []
    assert [t.agent for t in store.lease("renderserver", 10)] == ["renderserver"]
    assert store.lease("nobody", 5) == []


def test_lease_expiry_returns_task_to_pending(make_store, clock):
    store = make_store(lease_seconds=10)
    task = store.create(new())[0]
    assert store.lease("ClaraSCU", 1)[0].id == task.id
    clock.advance(9.9)
    assert store.get(task.id).state == TaskState.IN_PROGRESS
    assert store.lease("ClaraSCU", 1) == []
    clock.advance(0.2)
    expired = store.get(task.id)
    assert expired.state == TaskState.PENDING and expired.lease_expires_at is None
    assert expired.retries == 1  # an expired lease counts as a failed attempt
    assert [t.id for t in store.list(state=TaskState.PENDING)] == [task.id]
    assert store.list(state=TaskState.IN_PROGRESS) == []
    assert store.count_by_state()[TaskState.PENDING] == 1
    again = store.lease("ClaraSCU", 1)
    assert [t.id for t in again] == [task.id]
    assert again[0].retries == 1
    assert store.count_by_state()[TaskState.IN_PROGRESS] == 1


def test_success(make_store, clock):
    store = make_store()
    task = store.create(new())[0]
    store.lease("ClaraSCU", 1)
    clock.advance(1)
    done = store.report_success(task.id)
    assert done.state == TaskState.SUCCEEDED and done.finished_at == clock.now
    assert store.report_success(task.id).state == TaskState.SUCCEEDED  # idempotent
    with pytest.raises(TaskConflict):
        store.report_failure(task.id, True)
    assert store.lease("ClaraSCU", 1) == []


def test_late_success_after_lease_expired_is_accepted(make_store, clock):
    store = make_store(lease_seconds=5)
    task = store.create(new())[0]
    store.lease("ClaraSCU", 1)
    clock.advance(6)
    assert store.report_success(task.id).state == TaskState.SUCCEEDED


def test_results_for_a_task_never_leased_are_refused(make_store):
    store = make_store()
    task = store.create(new())[0]
    with pytest.raises(TaskConflict):
        store.report_success(task.id)
    with pytest.raises(TaskConflict):
        store.report_failure(task.id, True)
    assert store.get(task.id).state == TaskState.PENDING


def test_failure_without_retry_later_fails_for_good(make_store):
    store = make_store()
    task = store.create(new())[0]
    store.lease("ClaraSCU", 1)
    failed = store.report_failure(task.id, False)
    assert failed.state == TaskState.FAILED and failed.retries == 1 and failed.finished_at is not None
    with pytest.raises(TaskConflict):
        store.report_success(task.id)
    with pytest.raises(TaskConflict):
        store.report_failure(task.id, True)
    assert store.lease("ClaraSCU", 1) == []


def test_failure_with_retry_later_until_max_retries(make_store):
    store = make_store(max_retries=3)
    task = store.create(new())[0]
    for expected_retries in (1, 2):
        assert [t.id for t in store.lease("ClaraSCU", 1)] == [task.id]
        back = store.report_failure(task.id, True)
        assert back.state == TaskState.PENDING and back.retries == expected_retries
    store.lease("ClaraSCU", 1)
    final = store.report_failure(task.id, True)
    assert final.state == TaskState.FAILED and final.retries == 3
    assert store.lease("ClaraSCU", 1) == []


def test_max_retries_is_configurable(make_store):
    store = make_store(max_retries=1)
    task = store.create(new())[0]
    store.lease("ClaraSCU", 1)
    assert store.report_failure(task.id, True).state == TaskState.FAILED


def test_retry_delay_grows(make_store, clock):
    store = make_store(retry_delay=10, max_retries=5)
    task = store.create(new())[0]
    store.lease("ClaraSCU", 1)
    store.report_failure(task.id, True)
    assert store.get(task.id).available_at == pytest.approx(clock.now + 10)
    clock.advance(9)
    assert store.lease("ClaraSCU", 1) == []
    clock.advance(1)
    assert len(store.lease("ClaraSCU", 1)) == 1
    store.report_failure(task.id, True)
    clock.advance(19)
    assert store.lease("ClaraSCU", 1) == []
    clock.advance(1)
    assert len(store.lease("ClaraSCU", 1)) == 1


def test_unknown_task(make_store):
    store = make_store()
    missing = str(uuid.uuid4())
    for op in (store.get, store.report_success, lambda i: store.report_failure(i, True)):
        with pytest.raises(TaskNotFound):
            op(missing)


def test_list_filters_and_paging(make_store, clock):
    store = make_store()
    a = [store.create(new(job="job-a"))[0] for _ in range(3)]
    b = store.create(new(job="job-b", agent="renderserver", params=None))[0]
    assert [t.id for t in store.list(job_id="job-a")] == [t.id for t in a]
    assert [t.id for t in store.list(agent="renderserver")] == [b.id]
    assert b.parameters is None
    assert [t.id for t in store.list(limit=2, offset=1)] == [a[1].id, a[2].id]
    store.lease("ClaraSCU", 1)
    assert [t.id for t in store.list(state=TaskState.IN_PROGRESS)] == [a[0].id]
    assert len(store.list(state=TaskState.PENDING)) == 3


def test_retention_purges_only_old_finished_tasks(make_store, clock):
    store = make_store(retention_seconds=3600)
    ok, bad, pending = (store.create(new())[0] for _ in range(3))
    store.lease("ClaraSCU", 2)
    store.report_success(ok.id)
    store.report_failure(bad.id, False)
    clock.advance(3599)
    assert store.purge() == 0
    clock.advance(2)
    assert store.purge() == 2
    assert [t.id for t in store.list()] == [pending.id]
    with pytest.raises(TaskNotFound):
        store.get(ok.id)


def test_tasks_survive_reopening(make_store):
    store = make_store()
    task = store.create(new(key="persist"))[0]
    store.lease("ClaraSCU", 1)
    store.close()
    reopened = make_store()
    got = reopened.get(task.id)
    assert got.state == TaskState.IN_PROGRESS
    assert reopened.create(new(key="persist"))[1] is False


def test_concurrent_leases_never_share_a_task(make_store):
    store = make_store(lease_seconds=300)
    ids = {store.create(new())[0].id for _ in range(120)}
    got: list[list[str]] = [[] for _ in range(4)]

    def poll(i: int) -> None:
        while True:
            batch = store.lease("ClaraSCU", 3)
            if not batch:
                return
            got[i].extend(t.id for t in batch)

    threads = [threading.Thread(target=poll, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    flat = [x for g in got for x in g]
    assert len(flat) == len(set(flat)) == len(ids)
    assert set(flat) == ids
