"""Several Results Service processes on one PostgreSQL database (SPEC §9): started at the same
moment on an empty database, then polled by four agents each — every task is leased once."""
from __future__ import annotations

import signal
import threading
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
