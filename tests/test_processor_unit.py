"""AE Title Job Processor on the controllable clock: grouping, quiet periods,
duplicates, frozen settings, job sink idempotency and retries.

These run the real ingest path (header scan, Part 10 file, SQLite journal)
without a network; only time is simulated.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from clara_dicom.config import resolve
from clara_dicom.manifests import parse_resource
from clara_dicom.models import JobProcessorSpec
from clara_dicom.retrying import JOB_CREATION
from clara_dicom.synthetic import UID_ROOT, ct_slice

from clara_adapter.ingest import SUCCESS, Ingest
from clara_adapter.job_requests import JobRequest
from clara_adapter.submitter import JobSubmitter
from clara_adapter.journal import Journal
from clara_adapter.metrics import AdapterMetrics
from clara_adapter.processors.base import ProcessorContext
from clara_adapter.storage import InstanceStore
from clara_adapter.timers import ManualScheduler


class MemorySink:
    def __init__(self, failures: int = 0):
        self.jobs: dict[str, dict] = {}
        self.failures = failures
        self.calls = 0

    def create(self, manifest: dict) -> bool:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("API unreachable")
        name = manifest["metadata"]["name"]
        if name in self.jobs:
            return False
        self.jobs[name] = manifest
        return True


def encode(ds) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def manifests(processor: dict, aet: dict | None = None, ae: str = "CLARA") -> list:
    return [
        parse_resource({"apiVersion": "dicom.clara.io/v1alpha1", "kind": "ClaraAETitle", "metadata": {"name": "clara"},
                        "spec": {"aeTitle": ae, "processor": "proc", **(aet or {})}}),
        parse_resource({"apiVersion": "dicom.clara.io/v1alpha1", "kind": "JobProcessor", "metadata": {"name": "proc"},
                        "spec": processor}),
    ]


class Harness:
    def __init__(self, tmp: Path, processor: dict, aet: dict | None = None, sink: MemorySink | None = None,
                 fsync: bool = False, journal=None):
        self.tmp = tmp
        self.clock = ManualScheduler()
        self.journal = journal or Journal(tmp / "journal.sqlite", durable=fsync)
        self.sink = sink or MemorySink()
        metrics = AdapterMetrics()
        self.submitter = JobSubmitter(self.sink, tmp / "payloads", self.clock, self.journal, metrics,
                                      synchronous=True)
        self.ctx = ProcessorContext("default", self.journal, self.clock, self.submitter, metrics)
        self.store = InstanceStore(tmp / "incoming", fsync=fsync)
        self.ingest = Ingest(self.ctx, self.store)
        self.configure(processor, aet)
        self.closer = None
        if self.journal.shared:  # PostgreSQL: groups are closed from the database, on the test's clock
            from clara_adapter.shared_groups import SharedGroupCloser

            self.journal.clock = self.clock.now
            self.closer = SharedGroupCloser(self.ingest, self.clock)
            self.closer.start()

    def configure(self, processor: dict, aet: dict | None = None) -> None:
        self.ingest.apply_config(resolve(manifests(processor, aet)).config)

    def send(self, patient="P1", study=None, series=None, sop=None, ae="CLARA", extra=None) -> int:
        ds = ct_slice(patient, study or "1.2.3", series or "1.2.3.4", 0, rows=8, cols=8, extra=extra)
        if sop:
            ds.SOPInstanceUID = sop
        route = self.ingest.routes[ae]
        return self.ingest.store_instance(route, "STORESCU", ds.SOPClassUID, ds.SOPInstanceUID,
                                          ExplicitVRLittleEndian, memoryview(encode(ds)))

    def jobs(self) -> list[dict]:
        return list(self.sink.jobs.values())

    def counts(self) -> list[int]:
        return sorted(j["spec"]["payload"]["instances"] for j in self.jobs())


@pytest.fixture
def harness(tmp_path):
    made = []

    def make(processor: dict, aet: dict | None = None, sink: MemorySink | None = None) -> Harness:
        h = Harness(tmp_path / f"h{len(made)}", processor, aet, sink)
        made.append(h)
        return h

    yield make


def test_quiet_period_resets_with_each_instance_of_the_key(harness):
    h = harness({"pipelines": {"seg": "p1"}, "timeout": 5})
    h.send(study="1.1")
    h.clock.advance(4)
    h.send(study="1.1")
    h.clock.advance(4)  # 8 s after the first, 4 s after the last: still open
    assert h.jobs() == []
    h.send(study="1.1")
    h.clock.advance(4.99)
    assert h.jobs() == []
    h.clock.advance(0.02)
    assert h.counts() == [3]


def test_separate_keys_close_independently(harness):
    h = harness({"pipelines": {"seg": "p1"}, "timeout": 5})
    h.send(study="1.1")
    h.clock.advance(3)
    h.send(study="1.2")
    h.clock.advance(2.01)
    assert [j["spec"]["payload"]["instances"] for j in h.jobs()] == [1]
    first = h.jobs()[0]["spec"]["group"]["value"]
    assert first == "1.1"
    h.clock.advance(3)
    assert sorted(j["spec"]["group"]["value"] for j in h.jobs()) == ["1.1", "1.2"]


def test_instance_after_close_starts_a_new_group_with_a_new_job_name(harness):
    h = harness({"pipelines": {"seg": "p1"}, "timeout": 5})
    h.send(study="1.1")
    h.clock.advance(6)
    h.send(study="1.1")
    h.clock.advance(6)
    jobs = h.jobs()
    assert len(jobs) == 2 and jobs[0]["metadata"]["name"] != jobs[1]["metadata"]["name"]
    assert h.counts() == [1, 1]


def test_timeout_below_minimum_is_refused_by_the_model():
    with pytest.raises(ValueError):
        JobProcessorSpec.model_validate({"pipelines": {"a": "b"}, "timeout": 4})
    assert JobProcessorSpec.model_validate({"pipelines": {"a": "b"}}).timeout == 5


@pytest.mark.parametrize(
    "group_by, varying, expected_groups",
    [
        ("Patient", "patient", 2),
        ("Study", "study", 2),
        ("Series", "series", 2),
        ("0008,0060", None, 1),  # Modality: all CT
        ("(0020,000D)", "study", 2),
        ("0020000E", "series", 2),
    ],
)
def test_each_grouping_level_and_custom_tags(harness, group_by, varying, expected_groups):
    h = harness({"pipelines": {"seg": "p1"}, "groupBy": group_by})
    for i in range(2):
        for _ in range(2):
            kwargs = {"patient": "P1", "study": "1.1", "series": "1.1.1"}
            if varying:
                kwargs[varying] = f"{kwargs[varying]}{i}"
            h.send(**kwargs)
    h.clock.advance(6)
    assert len(h.jobs()) == expected_groups
    assert sum(h.counts()) == 4
    assert {j["spec"]["group"]["by"] for j in h.jobs()} == {group_by}


@pytest.mark.parametrize("value", [None, "", "   "])
def test_missing_or_empty_group_tag_is_acknowledged_counted_and_deleted(harness, value):
    h = harness({"pipelines": {"seg": "p1"}, "groupBy": "0008,103E"})  # SeriesDescription
    extra = {} if value is None else {"SeriesDescription": value}
    assert h.send(extra=extra) == SUCCESS
    h.clock.advance(10)
    assert h.jobs() == []
    assert list((h.tmp / "incoming").iterdir()) == []  # nothing leaked on disk
    assert h.journal.count_instances() == 0
    assert h.ctx.metrics.ignored.labels("CLARA", "ignore")._value.get() == 1


def test_group_value_padding_is_stripped(harness):
    h = harness({"pipelines": {"seg": "p1"}, "groupBy": "0008,103E"})
    h.send(extra={"SeriesDescription": "CHEST "})
    h.send(extra={"SeriesDescription": "CHEST"})
    h.clock.advance(6)
    assert h.counts() == [2]
    assert h.jobs()[0]["spec"]["group"]["value"] == "CHEST"


def test_duplicate_is_dropped_and_does_not_extend_the_quiet_period(harness):
    h = harness({"pipelines": {"seg": "p1"}, "timeout": 5})
    sop = generate_uid(prefix=UID_ROOT)
    h.send(sop=sop)
    h.clock.advance(4)
    h.send(sop=sop)  # duplicate at t=4
    h.clock.advance(1.01)  # t=5.01: closes on the first instance's deadline
    assert h.counts() == [1]
    assert h.ctx.metrics.ignored.labels("CLARA", "duplicate")._value.get() == 1


def test_overwrite_same_instance_replaces_the_file(harness):
    h = harness({"pipelines": {"seg": "p1"}, "timeout": 5}, aet={"overwriteSameInstance": True})
    sop = generate_uid(prefix=UID_ROOT)
    h.send(sop=sop, extra={"SeriesDescription": "FIRST"})
    h.clock.advance(4)
    h.send(sop=sop, extra={"SeriesDescription": "SECOND"})
    h.clock.advance(1.5)  # the overwrite extended the quiet period
    assert h.jobs() == []
    h.clock.advance(4)
    assert h.counts() == [1]
    payload = Path(h.jobs()[0]["spec"]["payload"]["path"])
    (stored,) = list(payload.rglob("*.dcm"))
    assert b"SECOND" in stored.read_bytes() and b"FIRST" not in stored.read_bytes()


def test_several_pipelines_get_one_job_each_with_the_priority(harness):
    h = harness({"pipelines": {"lung": "p-lung", "heart": "p-heart", "breast": "p-breast"}, "priority": "immediate"})
    for _ in range(3):
        h.send()
    h.clock.advance(6)
    jobs = h.jobs()
    assert sorted(j["spec"]["pipeline"] for j in jobs) == ["p-breast", "p-heart", "p-lung"]
    assert {j["spec"]["priority"] for j in jobs} == {"immediate"}
    assert h.counts() == [3, 3, 3]
    # each job has its own payload with hard links to the same received files
    payloads = {j["spec"]["payload"]["path"] for j in jobs}
    assert len(payloads) == 3
    for p in payloads:
        files = list(Path(p, "input").rglob("*.dcm"))
        assert len(files) == 3 and (Path(p) / "operators").is_dir()
    # instances released once every job exists
    assert h.journal.count_instances() == 0 and list((h.tmp / "incoming").iterdir()) == []


def test_job_names_labels_and_annotation(harness):
    h = harness({"pipelines": {"Lung_CT.v2": "p1"}, "groupBy": "Patient"})
    h.send(patient="JOHN^DOE-12345")
    h.clock.advance(6)
    (job,) = h.jobs()
    name = job["metadata"]["name"]
    assert len(name) <= 52 and name.startswith("clara-lung-ct-v2-")
    import re

    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name)
    flat = str(job["metadata"])
    assert "JOHN" not in flat and "12345" not in flat  # patient data only in spec.group.value
    assert job["spec"]["group"]["value"] == "JOHN^DOE-12345"
    assert re.fullmatch(r"CLARA-Lung_CT\.v2-\d{14}", job["metadata"]["annotations"]["dicom.clara.io/clara-job-name"])


def test_sink_is_idempotent():
    sink = MemorySink()
    req = JobRequest("ns", "AE", "proc", "seg", "p", "normal", "Study", "1.2", "e-1", [])
    assert sink.create(req.manifest(Path("/x"))) is True
    assert sink.create(req.manifest(Path("/x"))) is False
    assert len(sink.jobs) == 1


def test_retry_with_backoff_then_success_releases_instances_once(harness):
    sink = MemorySink(failures=3)
    h = harness({"pipelines": {"a": "p1", "b": "p2"}}, sink=sink)
    h.send()
    h.send()
    h.clock.advance(5.01)
    assert h.jobs() == [] and h.journal.count_instances() == 2  # kept while creation fails
    h.clock.advance(0.5 + 1 + 2 - 0.01)  # backoff 0.5, 1, 2 s at least: not yet
    assert h.jobs() == []
    h.clock.advance(3 * JOB_CREATION.jitter + 0.02)  # and at most that much jitter more
    assert h.counts() == [2, 2]
    assert h.journal.count_instances() == 0


def test_instance_arriving_while_creation_retries_starts_a_new_group(harness):
    sink = MemorySink(failures=2)
    h = harness({"pipelines": {"a": "p1"}}, sink=sink)
    h.send(study="1.1")
    h.clock.advance(5.01)  # closed; creation failing
    h.send(study="1.1")
    h.clock.advance(6)
    assert h.counts() == [1, 1]


def test_open_group_keeps_its_settings_when_the_processor_is_edited(harness):
    h = harness({"pipelines": {"old": "p-old"}, "timeout": 5, "priority": "lower"})
    h.send(study="1.1")
    h.configure({"pipelines": {"new": "p-new"}, "timeout": 30, "priority": "higher"})
    h.send(study="1.2")
    h.clock.advance(5.01)
    (old,) = h.jobs()
    assert old["spec"]["pipeline"] == "p-old" and old["spec"]["priority"] == "lower"
    h.clock.advance(25)
    assert len(h.jobs()) == 2
    new = [j for j in h.jobs() if j["spec"]["pipeline"] == "p-new"][0]
    assert new["spec"]["priority"] == "higher"


def test_open_group_completes_after_its_ae_title_is_deleted(harness):
    h = harness({"pipelines": {"a": "p1"}})
    h.send()
    h.ingest.apply_config(resolve([]).config)
    assert "CLARA" not in h.ingest.routes
    h.clock.advance(6)
    assert h.counts() == [1]


def test_restart_resumes_open_groups_from_the_journal(harness, tmp_path):
    h = harness({"pipelines": {"a": "p1"}, "timeout": 10})
    h.send(study="1.1")
    h.clock.advance(4)
    h.send(study="1.1")
    # "crash": a new adapter on the same journal, files and clock
    journal2 = Journal(h.tmp / "journal.sqlite")
    sub2 = JobSubmitter(h.sink, h.tmp / "payloads", h.clock, journal2, synchronous=True)
    ctx2 = ProcessorContext("default", journal2, h.clock, sub2, AdapterMetrics())
    ingest2 = Ingest(ctx2, InstanceStore(h.tmp / "incoming"))
    for proc in h.ingest.processors.values():  # the old process is gone: its timers must do nothing
        proc.open_groups.clear()
    assert ingest2.recover() == 2
    ingest2.apply_config(resolve(manifests({"pipelines": {"a": "p1"}, "timeout": 10})).config)
    h.clock.advance(9.99)  # deadline is 10 s after the second instance (t=4)
    assert h.counts() == []
    h.clock.advance(0.02)
    assert h.counts() == [2]


def test_journal_never_reuses_ids_that_job_names_depend_on(tmp_path):
    """Instance ids, group ids and sequences stay unique after everything is released."""
    journal = Journal(tmp_path / "j.sqlite")
    h = Harness(tmp_path / "h", {"pipelines": {"a": "p1"}})
    first = h.journal.open_group("o", "AE", "p", "v", {}, 0.0).id
    h.journal.finish_group(first)
    assert h.journal.open_group("o", "AE", "p", "v", {}, 0.0).id > first
    seqs = [journal.next_sequence() for _ in range(3)]
    assert seqs == sorted(set(seqs))
    h.send()
    (inst,) = h.journal.instances()
    h.journal.remove_instances([inst.id])
    h.send()
    (again,) = h.journal.instances()
    assert again.id > inst.id
