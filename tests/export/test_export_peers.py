"""The export agent against real peers: Debian Orthanc and dcmtk storescp, on loopback.

Tasks go through a real Results Service (in process, with a small --max-retries and
a short retry delay); the agent polls every 50 ms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.uid import JPEGLSLossless, RLELossless

from clara_results.models import TaskState

from export_testlib import received, sop_uids, write_series
from peers import REPO, Orthanc, StoreSCP, metric_value, stops_what_it_starts, wait_for

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def storescp(tmp_path, dcmtk_available):
    yield from stops_what_it_starts(lambda name, extra=None: StoreSCP(tmp_path / "scp" / name, extra=extra))


@pytest.fixture
def orthanc(tmp_path, orthanc_available):
    started: list[Orthanc] = []

    def start(name: str = "orthanc", **kwargs) -> Orthanc:
        o = Orthanc(tmp_path / name, **kwargs)
        started.append(o)
        return o

    yield start
    for o in started:
        o.stop()


def register_results(env: dict[str, str], agent: str, data: str, inputs: list[Path]) -> None:
    cmd = [sys.executable, "-m", "clara_dicom.cli", "register-results", "--agent", agent, "--data", data]
    for folder in inputs:
        cmd += ["--input", str(folder)]
    proc = subprocess.run(cmd, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


DESTINATIONS = """
---
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraDestination
metadata: {{name: orthanc}}
spec: {{aeTitle: ORTHANC, host: 127.0.0.1, port: {port}}}
"""


@pytest.mark.orthanc
def test_register_results_in_local_mode_exports_exactly_those_instances(tmp_path, local_adapter, orthanc):
    """`clara-dicom up` wires the agent to its in-process Results Service."""
    pacs = orthanc()
    config = tmp_path / "config.yaml"
    config.write_text(DESTINATIONS.format(port=pacs.dicom_port))
    adapter = local_adapter(config, results=True, env={**os.environ, "CLARA_EXPORT_POLL_SECONDS": "0.1"})
    payload = adapter.state / "payloads" / "job-1-payload"
    out = payload / "operators" / "seg" / "output"
    files = write_series(out / "series", 6) + write_series(out / "rle", 2, RLELossless)
    (out / "report.txt").write_text("segmentation volume: 12 ml\n")
    # an instance elsewhere in the payload (not registered) must not be sent
    write_series(payload / "input", 1)
    url = f"http://127.0.0.1:{adapter.results_port}"
    env = {"CLARA_JOB_ID": "job-1", "CLARA_PIPELINE_ID": "seg", "CLARA_PAYLOAD_ID": "job-1-payload",
           "CLARA_OPERATOR": "seg", "CLARA_PAYLOAD_ROOT": str(payload), "CLARA_RESULTS_URL": url,
           "CLARA_RESULTS_TOKEN": (adapter.state / "results-token").read_text().strip()}
    register_results(env, "ClaraSCU", '["Orthanc"]', [out])

    wait_for(lambda: metric_value(adapter.metrics(), "clara_export_results_total", outcome="succeeded") == 1, 30,
             what="export succeeded")
    assert pacs.sop_instance_uids() == sop_uids(files)
    metrics = adapter.metrics()
    assert metric_value(metrics, "clara_export_files_total", outcome="sent") == 8
    assert metric_value(metrics, "clara_export_files_total", outcome="skipped") == 1
    assert metric_value(metrics, "clara_export_files_total", outcome="failed") == 0
    status = adapter.status()["exportAgent"]
    assert status["tasksInProgress"] == 0 and status["tasks"]["succeeded"] == 1
    assert "report.txt is not a DICOM file; skipped" in adapter.log()

    from clara_results.client import ResultsClient

    with ResultsClient(url, env["CLARA_RESULTS_TOKEN"]) as client:
        (task,) = client.list_tasks(agent="ClaraSCU")
    assert task.state == TaskState.SUCCEEDED and task.retries == 0


@pytest.mark.orthanc
def test_orthanc_down_retries_then_fails(tmp_path, export_harness, orthanc):
    h = export_harness(max_retries=3, retry_delay=0.05)
    pacs = orthanc()
    port = pacs.dicom_port
    pacs.stop()
    h.destination("orthanc", port, "ORTHANC")
    write_series(h.payloads / "p1" / "out", 3)
    task = h.wait_finished(h.submit_folder("p1", "Orthanc").id)
    assert task.state == TaskState.FAILED and task.retries == 3
    h.wait_metric("clara_export_results_total", "retry", 3)
    h.wait_metric("clara_export_results_total", "failed", 0)


@pytest.mark.orthanc
def test_orthanc_restarted_before_the_last_retry_gets_the_files_once(tmp_path, export_harness, orthanc):
    h = export_harness(max_retries=10, retry_delay=0.2)
    pacs = orthanc("pacs")
    dicom_port, http_port = pacs.dicom_port, pacs.http_port
    pacs.stop()
    h.destination("orthanc", dicom_port, "ORTHANC")
    files = write_series(h.payloads / "p1" / "out", 4)
    task_id = h.submit_folder("p1", "orthanc").id
    wait_for(lambda: h.client.get_task(task_id).retries >= 1, 20, what="a failed attempt")
    pacs = orthanc("pacs", dicom_port=dicom_port, http_port=http_port)
    task = h.wait_finished(task_id)
    assert task.state == TaskState.SUCCEEDED and 1 <= task.retries < 10
    assert pacs.sop_instance_uids() == sop_uids(files)
    assert h.metric("clara_export_files_total", "sent") == 4  # delivered once
    h.wait_metric("clara_export_results_total", "succeeded", 1)


def test_refusing_and_accepting_destinations(tmp_path, export_harness, storescp):
    h = export_harness(max_retries=2, retry_delay=0.05)
    good, bad = storescp("good"), storescp("bad", ["--refuse"])
    h.destination("good", good.port)
    h.destination("bad", bad.port)
    files = write_series(h.payloads / "p1" / "out", 5)
    (h.payloads / "p1" / "out" / "readme.txt").write_text("hello")
    t_good = h.submit_folder("p1", "good")
    t_bad = h.submit_folder("p1", "bad")
    assert h.wait_finished(t_good.id).state == TaskState.SUCCEEDED
    failed = h.wait_finished(t_bad.id)
    assert failed.state == TaskState.FAILED and failed.retries == 2  # refused: retried, then given up
    assert received(good.log_path.parent / "good") == sop_uids(files)
    h.wait_metric("clara_export_results_total", "retry", 2)
    assert h.metric("clara_export_files_total", "skipped") == 3  # readme.txt, once per attempt


def test_failure_threshold_counts_dicom_files_only(tmp_path, export_harness, storescp):
    """storescp takes uncompressed transfer syntaxes only; JPEG-LS files cannot be
    decompressed here (no codec), so each of them fails on its own."""
    h = export_harness(max_retries=3)
    scp = storescp("plain")
    h.destination("plain", scp.port)

    def payload(pid: str, ok: int, bad: int, text: int) -> list[Path]:
        out = h.payloads / pid / "out"
        out.mkdir(parents=True)
        good = write_series(out / "ok", ok) if ok else []
        if bad:
            write_series(out / "jls", bad, JPEGLSLossless)
        for i in range(text):
            (out / f"note{i}.txt").write_text("x" * 300)
        return good

    cases = {  # payload: (ok, bad, text, expected)
        "most-fail": (2, 3, 0, TaskState.FAILED),
        "half-fail": (3, 3, 0, TaskState.SUCCEEDED),
        "text-not-failures": (1, 1, 5, TaskState.SUCCEEDED),
        "text-not-successes": (1, 2, 5, TaskState.FAILED),
        "text-only": (0, 0, 2, TaskState.FAILED),
    }
    tasks = {pid: h.submit_folder(pid, "plain") for pid, (ok, bad, text, _) in cases.items()
             if payload(pid, ok, bad, text) is not None}
    for pid, task in tasks.items():
        done = h.wait_finished(task.id)
        assert done.state == cases[pid][3], pid
        if done.state == TaskState.FAILED:
            assert done.retries == 1, f"{pid}: a lasting refusal is not retried"
    assert h.metric("clara_export_files_total", "failed") == 3 + 3 + 1 + 2
    assert h.metric("clara_export_files_total", "skipped") == 5 + 5 + 2
    h.wait_metric("clara_export_results_total", "failed", 3)
    h.wait_metric("clara_export_results_total", "retry", 0)


def test_transcoding_fallbacks(tmp_path, export_harness, storescp):
    """Explicit VR files to an Implicit-only SCP are re-encoded; RLE files to an
    uncompressed-only SCP are decompressed by pydicom."""
    h = export_harness()
    implicit_only, plain = storescp("implicit", ["+xi"]), storescp("plain2")
    h.destination("implicit", implicit_only.port)
    h.destination("plain", plain.port)
    explicit = write_series(h.payloads / "p1" / "out", 3)
    rle = write_series(h.payloads / "p2" / "out", 3, RLELossless)
    t1, t2 = h.submit_folder("p1", "implicit"), h.submit_folder("p2", "plain")
    assert h.wait_finished(t1.id).state == TaskState.SUCCEEDED
    assert h.wait_finished(t2.id).state == TaskState.SUCCEEDED
    assert received(tmp_path / "scp" / "implicit") == sop_uids(explicit)
    assert received(tmp_path / "scp" / "plain2") == sop_uids(rle)
    from pydicom import dcmread

    sample = next((tmp_path / "scp" / "plain2").iterdir())
    ds = dcmread(sample)
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    assert ds.pixel_array.shape == (64, 64)


def test_bad_tasks_fail_permanently_and_the_agent_keeps_serving(tmp_path, export_harness, storescp):
    h = export_harness(max_retries=3, exportConcurrency=2)
    scp = storescp("ok")
    h.destination("pacs", scp.port)
    files = write_series(h.payloads / "p1" / "out", 2)
    uris = ["out/" + p.name for p in files]
    os.symlink("/etc/hostname", h.payloads / "p1" / "out" / "link.dcm")
    (h.payloads / "secret.dcm").write_bytes(files[0].read_bytes())
    bad = {
        "escape": h.submit_unchecked("p1", uris + ["../secret.dcm"], '"pacs"'),
        "absolute": h.submit_unchecked("p1", uris + [str(h.payloads / "secret.dcm")], '"pacs"'),
        "bad-payload-id": h.submit_unchecked("..", ["p1/" + u for u in uris], '"pacs"'),
        "symlink": h.submit("p1", uris + ["out/link.dcm"], '"pacs"'),
        "unknown": h.submit("p1", uris, '"nowhere"'),
        "not-json": h.submit("p1", uris, "{pacs"),
        "number": h.submit("p1", uris, "42"),
        "list": h.submit("p1", uris, '["pacs"]'),
        "null": h.submit("p1", uris, None),
        "no-destination": h.submit("p1", uris, '{"ae": "PACS"}'),
        "missing-payload": h.submit("nothing-here", ["a.dcm"], '"pacs"'),
    }
    good = h.submit("p1", uris, json.dumps({"destination": "PACS"}))
    assert h.wait_finished(good.id).state == TaskState.SUCCEEDED
    for name, task in bad.items():
        done = h.wait_finished(task.id)
        assert (done.state, done.retries) == (TaskState.FAILED, 1), name
    assert received(tmp_path / "scp" / "ok") == sop_uids(files)  # the good task only; nothing escaped
    h.wait_metric("clara_export_results_total", "failed", len(bad))

    # destinations are read live: the unknown one now exists
    h.destination("Nowhere", scp.port)
    later = h.submit("p1", uris, '"nowhere"', job="later")
    assert h.wait_finished(later.id).state == TaskState.SUCCEEDED
    assert h.agent.status()["exportAgent"]["tasksInProgress"] == 0
    assert h.agent._thread.is_alive()


def test_many_tasks_in_parallel(tmp_path, export_harness, storescp):
    h = export_harness(exportConcurrency=4)
    scp = storescp("many")
    h.destination("pacs", scp.port)
    expected = set()
    tasks = []
    for i in range(8):
        expected |= sop_uids(write_series(h.payloads / f"p{i}" / "out", 2, patient=f"P{i}"))
        tasks.append(h.submit_folder(f"p{i}", "pacs"))
    assert all(h.wait_finished(t.id).state == TaskState.SUCCEEDED for t in tasks)
    assert received(tmp_path / "scp" / "many") == expected

