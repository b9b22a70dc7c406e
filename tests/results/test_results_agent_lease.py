"""The export agent and the Results Service leases together, on SQLite and PostgreSQL, against
dcmtk storescp made slow with ``--sleep-during`` (so an export outlives a short lease):

* an export that outlives its lease is sent once (the agent renews while it exports);
* the Results Service restarted mid-export: the export continues and is reported once;
* a lease lost meanwhile (expired while the service was down, then leased to someone else):
  the agent stops and reports nothing, the new holder decides;
* a service without lease ids (written for Clara): the agent exports and reports without them.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from clara_results.client import ResultsClient
from clara_results.models import TaskState
from clara_results.store import open_store

from peers import StoreSCP, metric_value, stops_what_it_starts, wait_for

pytestmark = pytest.mark.dcmtk

TOKEN = "agent-lease-token"
AGENT = "ClaraSCU"


class Harness:
    """A Results Service (restartable on the same port and database) and an export agent."""

    def __init__(self, tmp: Path, database: str, *, lease_seconds: float, retry_delay: float = 0.05,
                 concurrency: int = 2, client_wrapper: Any = None) -> None:
        from clara_adapter.export import ExportAgent
        from clara_adapter.metrics import AdapterMetrics
        from clara_adapter.settings import AdapterSettings
        from clara_dicom.config import RenderedConfig

        self.database, self.lease_seconds, self.retry_delay = database, lease_seconds, retry_delay
        self.results = self._start_service(port=0)
        self.port = self.results.port
        self.settings = AdapterSettings(storageDir=str(tmp / "state"), exportPollSeconds=0.05,
                                        exportConcurrency=concurrency, dimseTimeout=30, acseTimeout=10)
        self.settings.payloads_dir.mkdir(parents=True, exist_ok=True)
        self.config = RenderedConfig()
        self.metrics = AdapterMetrics()
        self.client = ResultsClient(self.results.url, TOKEN)
        agent_client = ResultsClient(self.results.url, TOKEN)
        if client_wrapper is not None:
            agent_client = client_wrapper(agent_client)
        self.agent = ExportAgent(self.settings, lambda: self.config, agent_client, self.metrics,
                                 results_url=self.results.url).start()

    def _start_service(self, port: int) -> Any:
        from clara_results.server import ResultsServer

        return ResultsServer(port=port, database=self.database, token=TOKEN, lease_seconds=self.lease_seconds,
                             retry_delay=self.retry_delay, max_retries=3).start()

    def restart_service(self) -> None:
        self.results = self._start_service(port=self.port)

    def destination(self, name: str, port: int) -> None:
        from clara_dicom.models import ClaraDestinationSpec

        dests = {**self.config.destinations, name: ClaraDestinationSpec(aeTitle="ANY-SCP", host="127.0.0.1",
                                                                       port=port)}
        self.config = self.config.model_copy(update={"destinations": dests})

    def submit_series(self, payload_id: str, n: int, destination: str) -> tuple[Any, set[str]]:
        from clara_dicom.synthetic import write_study
        from pydicom import dcmread

        root = self.settings.payloads_dir / payload_id
        paths = write_study(root / "out", slices=n, rows=32, cols=32, patient_id="PAT-LEASE")
        uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        task = self.client.create_task(job_id=payload_id, pipeline_id="pipe", payload_id=payload_id, agent=AGENT,
                                       uris=sorted(p.relative_to(root).as_posix() for p in paths),
                                       parameters=json.dumps(destination))
        return task, uids

    def service_metric(self, name: str, **labels: str) -> float:
        return metric_value(self.client._http.get("/metrics").text, name, **labels)

    def agent_metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics.render().decode(), name, **labels)

    def stop(self) -> None:
        self.agent.stop(grace=5)
        self.client.close()
        self.results.stop()


@pytest.fixture
def harness(tmp_path, dsn, dcmtk_available):
    logging.getLogger("httpx").setLevel(logging.WARNING)
    numbers = itertools.count()
    yield from stops_what_it_starts(lambda **kwargs: Harness(tmp_path / f"h{next(numbers)}", dsn, **kwargs))


@pytest.fixture
def slow_scp(tmp_path):
    """storescp answering each C-STORE after a one-second sleep."""
    numbers = itertools.count()
    yield from stops_what_it_starts(
        lambda: StoreSCP(tmp_path / "scp" / f"s{next(numbers)}", extra=["--sleep-during", "1"]))


def received(scp: StoreSCP) -> int:
    folder = Path(scp.proc.args[scp.proc.args.index("-od") + 1])
    return sum(1 for p in folder.iterdir() if p.is_file())


def test_an_export_that_outlives_its_lease_is_sent_once(harness, slow_scp):
    h = harness(lease_seconds=2, concurrency=2)  # a free worker would take an expired lease at once
    scp = slow_scp()
    h.destination("slow", scp.port)
    task, uids = h.submit_series("p-long", 5, "slow")  # ≥ 5 s to export, 2.5 times the lease
    done = wait_for(lambda: (t := h.client.get_task(task.id)).state.finished and t, 90, what="task finished")
    assert done.state == TaskState.SUCCEEDED and done.retries == 0
    assert h.service_metric("clara_results_tasks_leased_total") == 1  # handed out once
    assert h.service_metric("clara_results_lease_renewals_total") >= 2
    assert h.agent_metric("clara_export_files_total", outcome="sent") == 5  # every file sent once
    assert received(scp) == len(uids) == 5


def test_results_service_restarted_mid_export(harness, slow_scp):
    # The back-off keeps an expired lease from being handed out during the restart; the
    # renewal after it then keeps the lease (an expired lease stays renewable until then).
    h = harness(lease_seconds=4, retry_delay=60, concurrency=2)
    scp = slow_scp()
    h.destination("slow", scp.port)
    task, uids = h.submit_series("p-restart", 8, "slow")
    wait_for(lambda: received(scp) >= 1, 60, what="the export to start")
    h.results.stop()
    before = received(scp)
    wait_for(lambda: received(scp) >= before + 2, 60, what="the export to go on while the service is down")
    h.restart_service()
    done = wait_for(lambda: (t := h.client.get_task(task.id)).state.finished and t, 90, what="task finished")
    assert done.state == TaskState.SUCCEEDED and done.retries == 0
    assert h.agent_metric("clara_export_files_total", outcome="sent") == 8
    wait_for(lambda: h.agent_metric("clara_export_results_total", outcome="succeeded") == 1, 10,
             what="the agent to count its report")
    assert h.service_metric("clara_results_tasks_leased_total") == 0  # the restarted service leased nothing
    assert received(scp) == len(uids)


def test_a_lost_lease_stops_the_agent_reporting(harness, slow_scp):
    h = harness(lease_seconds=2, retry_delay=0, concurrency=1)  # one worker: its poller cannot lease
    scp = slow_scp()
    h.destination("slow", scp.port)
    task, _ = h.submit_series("p-lost", 6, "slow")
    wait_for(lambda: received(scp) >= 1, 60, what="the export to start")
    h.results.stop()
    # While the agent cannot renew, its lease runs out and another replica on the same
    # database hands the task to another worker.
    other = open_store(h.database, lease_seconds=60, retry_delay=0, max_retries=3)
    try:
        newer, = wait_for(lambda: other.lease(AGENT, 1), 30, what="the lease to expire and be taken over")
    finally:
        other.close()
    assert newer.id == task.id and newer.retries == 1
    h.restart_service()
    wait_for(lambda: h.agent_metric("clara_export_results_total", outcome="unreported") == 1, 60,
             what="the agent to give the task up")
    wait_for(lambda: h.agent.tasks_in_progress == 0, 60, what="the agent's export to end")
    after = h.client.get_task(task.id)
    assert after.state == TaskState.IN_PROGRESS and after.retries == 1  # the agent reported nothing
    assert h.service_metric("clara_results_task_reports_total", outcome="succeeded") == 0
    for outcome in ("succeeded", "retry", "failed"):
        assert h.agent_metric("clara_export_results_total", outcome=outcome) == 0
    assert h.client.report_success(task.id, lease_id=newer.lease_id).state == TaskState.SUCCEEDED


class ClaraStyle:
    """A Results Service written for Clara, as the agent sees it: tasks without lease ids, no renewal."""

    def __init__(self, inner: ResultsClient) -> None:
        self.inner = inner
        self.base_url = inner.base_url
        self.renewals = 0
        self.report_kwargs: list[dict[str, Any]] = []

    def lease(self, agent: str, size: int = 1) -> list[Any]:
        return [dataclasses.replace(t, lease_id=None) for t in self.inner.lease(agent, size)]

    def renew(self, *args: Any) -> float:
        self.renewals += 1
        raise AssertionError("renew called for a task without a lease id")

    def report_success(self, task_id: str, **kwargs: Any) -> Any:
        self.report_kwargs.append(kwargs)
        return self.inner.report_success(task_id, **kwargs)

    def report_failure(self, task_id: str, retry_later: bool, **kwargs: Any) -> Any:
        self.report_kwargs.append(kwargs)
        return self.inner.report_failure(task_id, retry_later, **kwargs)

    def close(self) -> None:
        self.inner.close()


def test_agent_works_with_a_service_without_lease_ids(harness, slow_scp):
    wrapped: list[ClaraStyle] = []
    h = harness(lease_seconds=30, client_wrapper=lambda c: wrapped.append(ClaraStyle(c)) or wrapped[-1])
    scp = slow_scp()
    h.destination("slow", scp.port)
    task, uids = h.submit_series("p-clara", 2, "slow")
    done = wait_for(lambda: (t := h.client.get_task(task.id)).state.finished and t, 60, what="task finished")
    assert done.state == TaskState.SUCCEEDED
    assert wrapped[0].report_kwargs == [{}] and wrapped[0].renewals == 0
    assert received(scp) == len(uids)
