"""Several Results Service processes on one PostgreSQL database (SPEC §9): started at the same
moment on an empty database, then polled by four agents each — every task is leased once."""
from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest

from clara_results.client import ResultsClient, TaskState
from peers import ResultsService, start_together
from results_testlib import TOKEN

pytestmark = pytest.mark.postgres

TASKS = 240
POLLERS_PER_SERVICE = 4


@pytest.fixture
def replicas(postgres_dsn, tmp_path):
    """Start ``n`` `clara-dicom results-service` processes on the (empty) database at once."""
    services: list[ResultsService] = []

    def start(n: int) -> list[str]:
        services.extend(ResultsService(postgres_dsn, tmp_path, "--retry-delay", "0", token=TOKEN, wait=False)
                        for _ in range(n))
        for service in services:
            service.wait_ready()
        return [service.url for service in services]

    yield start
    for service in services:
        service.signal(signal.SIGTERM)
    for service in services:
        service.stop(30)


def test_schema_creation_is_race_safe_when_replicas_start_together(replicas):
    urls = replicas(4)
    for url in urls:
        with ResultsClient(url, TOKEN) as c:
            assert c.list_tasks() == []


def test_two_services_four_pollers_each_lease_every_task_once(replicas):
    urls = replicas(2)
    with ResultsClient(urls[0], TOKEN) as c:
        ids = {c.create_task(job_id="job", pipeline_id="p", payload_id="pl", agent="ClaraSCU",
                             uris=[f"{i}.dcm"], parameters='"Orthanc"').id for i in range(TASKS)}
    handed_out: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def poll(url: str) -> None:
        try:
            with ResultsClient(url, TOKEN) as c:
                while True:
                    batch = c.lease("ClaraSCU", 3)
                    if not batch:
                        return
                    with lock:
                        handed_out.extend(t.id for t in batch)
                    for t in batch:
                        assert t.lease_id
                        c.report_success(t.id, lease_id=t.lease_id)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=poll, args=(url,)) for url in urls for _ in range(POLLERS_PER_SERVICE)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]
    twice = [task for task, n in Counter(handed_out).items() if n > 1]
    assert not twice and set(handed_out) == ids
    with ResultsClient(urls[1], TOKEN) as c:
        done = list(c.iter_tasks(state=TaskState.SUCCEEDED))
        assert len(done) == TASKS and all(t.retries == 0 for t in done)
    for url in urls:  # both services handed tasks out
        with ResultsClient(url, TOKEN) as c:
            text = c._http.get("/metrics").text
        leased = [line for line in text.splitlines() if line.startswith("clara_results_tasks_leased_total")]
        assert leased and float(leased[0].split()[-1]) > 0, url


def test_concurrent_store_openings_on_an_empty_database(postgres_dsn):
    """Eight stores (one per thread) created at the same moment: schema creation takes turns."""
    from clara_results.store import open_store

    stores, errors = start_together(8, lambda: open_store(postgres_dsn, pool_size=1))
    try:
        assert not errors, errors[:3]
        assert len(stores) == 8 and all(s.list() == [] for s in stores)
    finally:
        for s in stores:
            s.close()


def _clock_ahead(folder, seconds: float) -> dict:
    """The environment of a process whose host clock runs ``seconds`` ahead (time.time,
    as the service reads it): a sitecustomize module on its PYTHONPATH."""
    import os

    shim = folder / f"clock-ahead-{int(seconds)}"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import time\n_real = time.time\n"
        f"time.time = lambda: _real() + {seconds!r}\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH", "")]))
    return env


def test_a_replica_whose_clock_runs_ahead_does_not_hand_out_a_live_lease(postgres_dsn, tmp_path):
    """Two services on one database, one on a host whose clock is 5 minutes ahead. A task
    leased for 60 s through the first is not handed out again through the second, and its
    holder can still renew and report; lease times come from the database's clock."""
    on_time = ResultsService(postgres_dsn, tmp_path, "--lease-seconds", "60", token=TOKEN)
    ahead = ResultsService(postgres_dsn, tmp_path, "--lease-seconds", "60", token=TOKEN,
                           env=_clock_ahead(tmp_path, 300.0))
    try:
        with ResultsClient(on_time.url, TOKEN) as first, ResultsClient(ahead.url, TOKEN) as second:
            task = first.create_task(job_id="job", pipeline_id="p", payload_id="pl", agent="ClaraSCU",
                                     uris=["1.dcm"], parameters='"Orthanc"')
            (leased,) = first.lease("ClaraSCU", 1)
            assert leased.id == task.id
            assert second.lease("ClaraSCU", 1) == []  # before: the lease looked 4 minutes expired
            second.renew(task.id, leased.lease_id)
            assert second.lease("ClaraSCU", 1) == []
            done = second.report_success(task.id, leased.lease_id)
            assert done.state == TaskState.SUCCEEDED and done.retries == 0
    finally:
        for service in (on_time, ahead):
            service.signal(signal.SIGTERM)
            service.stop(30)


def test_a_replica_starting_beside_an_open_transaction_neither_waits_nor_stalls_the_others(postgres_dsn):
    """A rolling update starts a replica while another holds a transaction on ``tasks`` (here:
    one frozen with a row locked). Before: its start-up DDL (``ALTER TABLE … IF NOT EXISTS``)
    waited for that transaction, and every other replica's requests queued behind it."""
    import psycopg

    from clara_results.models import NewTask
    from clara_results.store import open_store

    running = open_store(postgres_dsn)
    frozen = psycopg.connect(postgres_dsn)
    started: dict = {}
    try:
        for i in range(2):
            running.create(NewTask(job_id="job", pipeline_id="p", payload_id="pl", agent="ClaraSCU",
                                   uris=(f"{i}.dcm",), idempotency_key=f"k{i}"))
        frozen.execute("SELECT seq FROM tasks ORDER BY seq LIMIT 1 FOR UPDATE")  # and then nothing
        starting = threading.Thread(target=lambda: started.update(store=open_store(postgres_dsn)), daemon=True)
        starting.start()
        starting.join(5)
        assert not starting.is_alive(), "the new replica waits for the frozen one's transaction"
        leasing = threading.Thread(target=lambda: started.update(leased=running.lease("ClaraSCU", 2)), daemon=True)
        leasing.start()
        leasing.join(5)
        assert not leasing.is_alive(), "the running replica's lease waits behind the new one's DDL"
        assert [list(t.uris) for t in started["leased"]] == [["1.dcm"]]  # the locked task is skipped, the other leased
    finally:
        frozen.rollback()
        frozen.close()
        for name in ("store",):
            if name in started:
                started[name].close()
        running.close()


def test_a_replica_frozen_with_a_task_row_locked_is_cut_off_and_the_task_moves_on(postgres_dsn):
    """A replica frozen in the middle of a report (its transaction holds the task's row):
    the server ends its session after ``idle_in_transaction``, so another replica's report
    on that task is answered then, not when the frozen one resumes; the frozen one's
    transaction fails instead of committing."""
    from clara_results.models import NewTask
    from clara_results.store import PostgresStore, StoreUnavailable

    frozen_store = PostgresStore(postgres_dsn, idle_in_transaction=1.0)
    other = PostgresStore(postgres_dsn, idle_in_transaction=1.0)
    holding, resume, outcome, reported = threading.Event(), threading.Event(), {}, {}
    try:
        other.create(NewTask(job_id="job", pipeline_id="p", payload_id="pl", agent="ClaraSCU", uris=("1.dcm",)))
        (task,) = other.lease("ClaraSCU", 1)

        def frozen() -> None:
            try:
                with frozen_store._transaction() as cur:  # what report_success holds: the row, FOR UPDATE
                    cur.execute("SELECT id FROM tasks WHERE id = %s FOR UPDATE", (task.id,))
                    holding.set()
                    resume.wait(60)
                outcome["committed"] = True
            except StoreUnavailable as exc:
                outcome["error"] = exc

        freezer = threading.Thread(target=frozen, daemon=True)
        freezer.start()
        assert holding.wait(10)
        reporter = threading.Thread(
            target=lambda: reported.update(task=other.report_success(task.id, task.lease_id)), daemon=True)
        reporter.start()
        reporter.join(15)
        assert not reporter.is_alive(), "the report waits for the frozen replica to resume"
        assert reported["task"].state == TaskState.SUCCEEDED
    finally:
        resume.set()
        freezer.join(30)
        frozen_store.close()
        other.close()
    assert "committed" not in outcome and "error" in outcome, outcome


def test_a_database_cut_off_by_the_network_is_a_503_within_the_timeout(postgres_dsn):
    """Packets to the database dropped (a partition, no reset): a request fails as
    StoreUnavailable (503, retried by agents) within ``network_timeout``, instead of
    hanging until TCP gives up (about 15 minutes); the store works again afterwards."""
    from psycopg.conninfo import conninfo_to_dict

    from clara_results.store import PostgresStore, StoreUnavailable
    from postgres_server import packets_dropped

    store = PostgresStore(postgres_dsn, network_timeout=2.0)
    outcome: dict = {}

    def lease() -> None:
        try:
            outcome["lease"] = store.lease("ClaraSCU", 1)
        except Exception as exc:
            outcome["lease"] = exc

    try:
        assert store.lease("ClaraSCU", 1) == []
        with packets_dropped(int(conninfo_to_dict(postgres_dsn)["port"])):
            leasing = threading.Thread(target=lease, daemon=True)
            leasing.start()
            leasing.join(20)
            assert not leasing.is_alive(), "the request hangs on the unanswered connection"
        assert isinstance(outcome["lease"], StoreUnavailable), outcome
        wait_for_lease = [None]
        for _ in range(100):  # the pool reconnects in the background
            try:
                wait_for_lease[0] = store.lease("ClaraSCU", 1)
                break
            except StoreUnavailable:
                time.sleep(0.2)
        assert wait_for_lease[0] == []
    finally:
        store.close()
