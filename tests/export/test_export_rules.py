"""Export rules without peers: task parameters, URI confinement, outcome decisions,
presentation-context planning, file classification."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless, RLELossless, UID

from clara_adapter.export.agent import decide
from clara_adapter.export.scu import MAX_CONTEXTS, DicomFile, FileFailure, NotDicom, SendReport, plan_contexts, \
    read_header
from clara_adapter.export.task import PermanentTaskError, destination_name, payload_dir, resolve_task, resolve_uris
from clara_dicom.config import RenderedConfig
from clara_dicom.models import ClaraDestinationSpec

from export_testlib import write_series


@pytest.mark.parametrize("parameters, name", [
    (json.dumps("Orthanc"), "Orthanc"),
    (json.dumps(" PACS-1 "), "PACS-1"),
    (json.dumps({"destination": "pacs"}), "pacs"),
    (json.dumps({"Name": "pacs", "other": 1}), "pacs"),
])
def test_parameters_name_a_destination(parameters, name):
    assert destination_name(parameters) == name


@pytest.mark.parametrize("parameters, why", [
    (None, "no parameters"),
    ("Orthanc", "not JSON"),
    ("{oops", "not JSON"),
    ("NaN", "not JSON"),
    ("42", "a number"),
    ("true", "a boolean"),
    ("null", "null"),
    ('["Orthanc"]', "an array"),
    ('{"host": "x"}', "without a 'destination'"),
    ('{"destination": 7}', "a number"),
    ('""', "empty destination"),
    ("[" * 5000 + "]" * 5000, "not JSON"),
])
def test_garbage_parameters_are_permanent(parameters, why):
    with pytest.raises(PermanentTaskError, match=why):
        destination_name(parameters)


def test_destinations_resolve_case_insensitively_and_unknown_is_permanent(tmp_path):
    (tmp_path / "p1").mkdir()
    config = RenderedConfig(destinations={"Orthanc": ClaraDestinationSpec(aeTitle="ORTHANC", host="h", port=104)})
    task = SimpleNamespace(parameters='"ORTHANC"', payload_id="p1", uris=["a.dcm"])
    resolved = resolve_task(task, config, tmp_path)
    assert resolved.destination.aeTitle == "ORTHANC" and resolved.files == [("a.dcm", tmp_path / "p1" / "a.dcm")]
    with pytest.raises(PermanentTaskError, match="unknown destination 'nope'.*Orthanc"):
        resolve_task(SimpleNamespace(parameters='"nope"', payload_id="p1", uris=[]), config, tmp_path)


@pytest.mark.parametrize("payload_id", ["..", ".", "a/b", "../p1", "", None, "/abs", "-x"])
def test_payload_ids_escaping_the_root_are_permanent(tmp_path, payload_id):
    with pytest.raises(PermanentTaskError, match="payload ID"):
        payload_dir(tmp_path, payload_id)


@pytest.mark.parametrize("uri", ["../p2/x.dcm", "out/../../p2/x.dcm", "/etc/passwd", "..\\p2\\x.dcm",
                                 "C:/x.dcm", "", "out/link-out", "link-dir/x"])
def test_uris_escaping_the_payload_are_permanent(tmp_path, uri):
    (tmp_path / "p1" / "out").mkdir(parents=True)
    (tmp_path / "p2").mkdir()
    (tmp_path / "p2" / "x.dcm").write_bytes(b"x")
    os.symlink(tmp_path / "p2" / "x.dcm", tmp_path / "p1" / "out" / "link-out")
    os.symlink(tmp_path / "p2", tmp_path / "p1" / "link-dir")
    with pytest.raises(PermanentTaskError):
        resolve_uris(tmp_path / "p1", [uri])


def test_uris_inside_the_payload_resolve(tmp_path):
    (tmp_path / "p1" / "out").mkdir(parents=True)
    (tmp_path / "p1" / "out" / "a.dcm").write_bytes(b"x")
    os.symlink("a.dcm", tmp_path / "p1" / "out" / "link-in")
    got = resolve_uris(tmp_path / "p1", ["out/a.dcm", "out/./link-in", "out/sub/../a.dcm", "missing.dcm"])
    assert [p for _, p in got] == [tmp_path / "p1" / "out" / "a.dcm"] * 3 + [tmp_path / "p1" / "missing.dcm"]
    with pytest.raises(PermanentTaskError, match="not a list"):
        resolve_uris(tmp_path / "p1", "out/a.dcm")


def report(sent=0, failed=0, transient=False, skipped=0, association_error=None) -> SendReport:
    r = SendReport(sent=sent, skipped=[f"s{i}" for i in range(skipped)], association_error=association_error)
    r.failed = [FileFailure(f"f{i}", "C-STORE status 0xC000", transient) for i in range(failed)]
    r.dicom_files = sent + failed
    return r


@pytest.mark.parametrize("r, succeeded, retry_later", [
    (report(sent=10), True, False),
    (report(sent=5, failed=5), True, False),          # exactly half: not more than the threshold
    (report(sent=4, failed=6), False, False),         # refused for lasting reasons
    (report(sent=4, failed=6, transient=True), False, True),  # out of resources
    (report(sent=1, failed=1, skipped=50), True, False),      # non-DICOM files do not count
    (report(sent=1, failed=2, skipped=50), False, False),
    (report(skipped=3), False, False),               # nothing to export
    (report(sent=3, association_error="association rejected"), False, True),
])
def test_outcome_rules(r, succeeded, retry_later):
    outcome = decide(r, 0.5)
    assert (outcome.succeeded, outcome.retry_later) == (succeeded, retry_later), outcome.reason


def test_threshold_setting_is_respected():
    assert decide(report(sent=9, failed=1), 0.0).succeeded is False
    assert decide(report(sent=1, failed=9), 1.0).succeeded is True


def test_contexts_per_sop_class_with_uncompressed_fallbacks():
    files = [DicomFile("a", Path("a"), CTImageStorage, UID("1.2"), ts)
             for ts in (JPEGLSLossless, JPEGLSLossless, ExplicitVRLittleEndian)]
    assert plan_contexts(files) == [[(CTImageStorage, JPEGLSLossless), (CTImageStorage, ExplicitVRLittleEndian),
                                     (CTImageStorage, ImplicitVRLittleEndian)]]


def test_more_than_128_contexts_split_into_batches():
    files = [DicomFile("a", Path("a"), UID(f"1.2.3.{i}"), UID("1.2"), ExplicitVRLittleEndian) for i in range(100)]
    batches = plan_contexts(files)
    assert len(batches) == 2 and all(len(b) <= MAX_CONTEXTS for b in batches)
    assert sum(len(b) for b in batches) == 200
    assert {sop for b in batches for sop, _ in b} == {f.sop_class for f in files}


def test_file_classification(tmp_path):
    dicom = write_series(tmp_path / "d", 1)[0]
    header = read_header("d", dicom)
    assert header.sop_class == CTImageStorage and header.transfer_syntax == ExplicitVRLittleEndian
    (tmp_path / "notes.txt").write_text("not DICOM, long enough to hold a preamble " * 10)
    (tmp_path / "tiny").write_bytes(b"")
    for name in ("notes.txt", "tiny"):
        with pytest.raises(NotDicom):
            read_header(name, tmp_path / name)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00")
    with pytest.raises(Exception) as info:
        read_header("broken", broken)
    assert not isinstance(info.value, NotDicom)


@pytest.mark.parametrize("sop_class, instance, msg_id", [
    (CTImageStorage, "1.2.3.45", 7),                       # even-length UIDs
    ("1.2.840.10008.5.1.4.1.1.20", "1.2.3.456", 65535),   # odd-length UIDs get a NUL pad
])
def test_hand_built_c_store_command_matches_pynetdicom(sop_class, instance, msg_id):
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.dsutils import encode

    from clara_adapter.export.association import c_store_rq

    req = C_STORE()
    req.MessageID, req.AffectedSOPClassUID, req.AffectedSOPInstanceUID, req.Priority = msg_id, sop_class, instance, 2
    req._dataset_path = (Path("x"), 0)
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    assert c_store_rq(msg_id, sop_class, instance) == encode(msg.command_set, True, True)


def test_unreachable_results_service_is_survived(tmp_path, export_harness):
    """The agent keeps polling (with backoff) while the service is away."""
    h = export_harness()
    from clara_adapter.export import ExportAgent
    from peers import free_port, wait_for

    port = free_port()

    lonely = ExportAgent.connect(h.settings, lambda: h.config, None, f"http://127.0.0.1:{port}", "t").start()
    try:
        wait_for(lambda: lonely.status()["exportAgent"]["lastPollError"], 10, what="a poll error")
        assert lonely._thread.is_alive()
    finally:
        lonely.stop(grace=1)


def test_a_report_the_service_cannot_store_yet_is_retried(tmp_path, export_harness):
    """The Results Service answers 503 (database away) to the agent's report once: the agent
    reports again (RESULTS_REPORT policy) and the outcome lands."""
    from clara_results.models import TaskState
    from clara_results.store import StoreUnavailable

    h = export_harness()
    store = h.results.store
    report_failure, refused = store.report_failure, []

    def database_away_once(*args, **kwargs):
        if not refused:
            refused.append(args)
            raise StoreUnavailable("connection refused")
        return report_failure(*args, **kwargs)

    store.report_failure = database_away_once
    (h.payloads / "p1").mkdir()
    (h.payloads / "p1" / "a.dcm").write_bytes(b"x")
    task = h.submit("p1", ["a.dcm"], '"NoSuchDestination"')  # a permanent failure to report
    finished = h.wait_finished(task.id)
    assert finished.state == TaskState.FAILED and len(refused) == 1
    h.wait_metric("clara_export_results_total", "failed", 1)
    h.wait_metric("clara_export_results_total", "unreported", 0)


def test_a_report_the_service_refuses_as_a_conflict_is_not_repeated(tmp_path, export_harness):
    """The Results Service answers 409 (the task moved on, e.g. its lease expired and it was
    leased again): the agent does not report again, counts it unreported, and goes on."""
    from clara_results.store import TaskConflict

    h = export_harness()
    store = h.results.store
    attempts = []

    def moved_on(*args, **kwargs):
        attempts.append(args)
        raise TaskConflict("the task is leased by another agent")

    store.report_failure = moved_on
    (h.payloads / "p1").mkdir()
    (h.payloads / "p1" / "a.dcm").write_bytes(b"x")
    h.submit("p1", ["a.dcm"], '"NoSuchDestination"')
    h.wait_metric("clara_export_results_total", "unreported", 1)
    assert len(attempts) == 1  # RESULTS_REPORT would have made up to 4


def test_adapter_starts_the_agent_when_results_url_is_set(tmp_path, export_harness):
    """Kubernetes mode: resultsUrl + token file in the settings start the agent with the adapter."""
    from clara_adapter.jobs import LocalJobSink
    from clara_adapter.service import Adapter
    from clara_adapter.settings import AdapterSettings
    from clara_dicom.errors import UserError
    from export_testlib import TOKEN
    from peers import free_port

    h = export_harness()
    (tmp_path / "token").write_text(TOKEN + "\n")
    settings = AdapterSettings(storageDir=str(tmp_path / "adapter"), host="127.0.0.1", dicomPort=free_port(),
                               httpPort=0, resultsUrl=h.results.url, resultsTokenFile=str(tmp_path / "token"))
    adapter = Adapter(settings, LocalJobSink(tmp_path / "jobs"))
    adapter.start(RenderedConfig(version="v1"))
    try:
        status = adapter.status()["exportAgent"]
        assert status["resultsService"] == h.results.url and status["tasksInProgress"] == 0
    finally:
        adapter.stop(grace=1)
    assert not adapter.export._thread.is_alive()

    no_token = AdapterSettings(storageDir=str(tmp_path / "adapter2"), resultsUrl=h.results.url)
    with pytest.raises(UserError, match="no Results Service token"):
        Adapter(no_token, LocalJobSink(tmp_path / "jobs2")).start_export(h.results.url, no_token.results_token())


@pytest.mark.parametrize("transfer_syntax", [None, RLELossless, JPEGLSLossless])
def test_file_meta_parsed_by_hand_matches_pydicom(tmp_path, transfer_syntax):
    from clara_adapter.export.scu import _read_header_pydicom, read_header

    for path in write_series(tmp_path, 2, transfer_syntax):
        assert read_header(path.name, path) == _read_header_pydicom(path.name, path)
