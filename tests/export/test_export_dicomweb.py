"""DICOMweb export (SPEC §9): the agent STOWs a task's files to a ClaraDestination with
``spec.dicomweb``; the peer is Debian's Orthanc with its DICOMweb plugin, on loopback."""
from __future__ import annotations

import logging

import pytest

from clara_results.models import TaskState

from export_testlib import sop_uids, write_series
from peers import Orthanc, free_port, stops_what_it_starts

pytestmark = pytest.mark.orthanc


@pytest.fixture
def orthanc_web(tmp_path, orthanc_dicomweb_available):
    yield from stops_what_it_starts(lambda name="web", **kwargs: Orthanc(tmp_path / name, dicomweb=True, **kwargs))


def failures_logged(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if "failed (" in r.getMessage())


def test_stow_sends_exactly_the_task_instances_in_batches(export_harness, orthanc_web):
    h = export_harness()
    h.agent.stow.batch_files = 2  # 7 instances -> 4 requests
    pacs = orthanc_web()
    h.dicomweb_destination("pacs-web", pacs.dicomweb_url)
    files = write_series(h.payloads / "p1" / "out", 7)
    write_series(h.payloads / "other" / "out", 3, patient="PAT-NOT-SENT")  # another payload: never sent
    (h.payloads / "p1" / "out" / "report.txt").write_text("not DICOM")
    task = h.wait_finished(h.submit_folder("p1", "PACS-WEB").id)
    assert task.state == TaskState.SUCCEEDED and task.retries == 0
    assert pacs.sop_instance_uids() == sop_uids(files)
    assert h.metric("clara_export_files_total", "sent") == 7
    assert h.metric("clara_export_files_total", "skipped") == 1


def test_parallel_tasks_to_one_dicomweb_destination(export_harness, orthanc_web):
    h = export_harness(exportConcurrency=4)
    pacs = orthanc_web()
    h.dicomweb_destination("web", pacs.dicomweb_url)
    expected: set[str] = set()
    ids = []
    for i in range(4):
        expected |= sop_uids(write_series(h.payloads / f"p{i}" / "out", 5, patient=f"PAT-{i}"))
        ids.append(h.submit_folder(f"p{i}", "web").id)
    assert all(h.wait_finished(t).state == TaskState.SUCCEEDED for t in ids)
    assert pacs.sop_instance_uids() == expected


def test_unreachable_dicomweb_destination_is_retried(export_harness):
    h = export_harness(max_retries=2, retry_delay=0.05)
    h.dicomweb_destination("gone", f"http://127.0.0.1:{free_port()}/dicom-web")
    write_series(h.payloads / "p1" / "out", 2)
    task = h.wait_finished(h.submit_folder("p1", "gone").id)
    assert task.state == TaskState.FAILED and task.retries == 2
    h.wait_metric("clara_export_results_total", "retry", 2)


def test_refused_token_and_wrong_path_fail_permanently_and_say_why(export_harness, orthanc_web, caplog):
    caplog.set_level(logging.INFO, logger="clara_adapter.export.agent")
    h = export_harness(max_retries=3)
    locked = orthanc_web("locked", users={"admin": "s3cret"})  # basic auth only: our bearer token is refused
    h.secret("pacs-token", token="not-a-valid-token\n")
    h.dicomweb_destination("locked", locked.dicomweb_url, token_secret="pacs-token")
    h.dicomweb_destination("typo", locked.dicomweb_url.replace("/dicom-web", "/no-such-root"))
    write_series(h.payloads / "p1" / "out", 2)
    for name, code in (("locked", "401"), ("typo", "40")):
        task = h.wait_finished(h.submit_folder("p1", name).id)
        assert (task.state, task.retries) == (TaskState.FAILED, 1), name  # permanent: one attempt, no retry
        assert f"answered {code}" in failures_logged(caplog), failures_logged(caplog)
    assert locked.count_instances() == 0
    assert "not-a-valid-token" not in caplog.text


def test_missing_token_secret_fails_permanently_naming_the_secret(export_harness, orthanc_web, caplog):
    caplog.set_level(logging.INFO, logger="clara_adapter.export.agent")
    h = export_harness(max_retries=3)
    pacs = orthanc_web()
    h.dicomweb_destination("web", pacs.dicomweb_url, token_secret="absent-token")
    write_series(h.payloads / "p1" / "out", 2)
    task = h.wait_finished(h.submit_folder("p1", "web").id)
    assert (task.state, task.retries) == (TaskState.FAILED, 1)  # permanent: one attempt, no retry
    assert "Secret absent-token not found" in failures_logged(caplog)
    assert pacs.count_instances() == 0
