"""The reference scenarios of clara-job-processors.txt, in real time, with dcmtk
storescu as the modality, plus crash recovery (SIGKILL) and a plug-in processor
discovered through an entry point."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clara_dicom.synthetic import write_study
from local_setup import SOURCES, write_config
from peers import LocalAdapter, adapter_command, dcmtk, dcmtk_env, metric_value, storescu, wait_for

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

FIXTURES = Path(__file__).parent / "fixtures" / "clara"
AET = """
apiVersion: dicom.clara.io/v1alpha1
kind: ClaraAETitle
metadata: {{name: clara}}
spec: {{aeTitle: CLARA, processor: {processor}}}
"""


def imported_config(folder: Path, settings_json: Path, name: str) -> Path:
    """Scenario settings as Clara wrote them, imported with `clara-dicom import`."""
    folder.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(adapter_command("import", str(settings_json), "--name", name), capture_output=True,
                         text=True, check=True)
    (folder / "processor.yaml").write_text(out.stdout)
    (folder / "aetitle.yaml").write_text(AET.format(processor=name) + SOURCES)
    return folder


def payload_sops(job: dict) -> list[str]:
    return sorted(p.stem for p in Path(job["spec"]["payload"]["path"], "input").rglob("*.dcm"))


def sops(files: list[Path]) -> list[str]:
    import pydicom

    return sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files)


def test_scenario_1_five_studies_of_one_patient_in_separate_associations(tmp_path, local_adapter):
    """groupBy Patient, timeout 60, three pipelines: five studies of patient X sent
    in five associations within 60 s -> three jobs, each with all five studies."""
    config = imported_config(tmp_path / "cfg", FIXTURES / "scenario1.json", "scenario-1")
    adapter = local_adapter(config)
    studies = [write_study(tmp_path / f"study{i}", slices=2, rows=32, cols=32, patient_id="PATIENT-X")
               for i in range(5)]
    other = write_study(tmp_path / "other", slices=1, rows=32, cols=32, patient_id="PATIENT-Y")
    for files in studies:
        storescu(files, adapter.dicom_port)  # one association each
    storescu(other, adapter.dicom_port)
    sent_at = time.time()
    jobs = wait_for(lambda: len(adapter.jobs()) >= 6 and adapter.jobs(), 90, interval=0.2, what="scenario 1 jobs")
    assert time.time() - sent_at >= 59  # nothing closes before the 60 s quiet period
    by_pipeline: dict[str, list[dict]] = {}
    for job in jobs:
        by_pipeline.setdefault(job["spec"]["pipeline"], []).append(job)
    assert sorted(by_pipeline) == ["8abf244aff7647989d4f6b3987a85759", "c5f996a71e1d4959bd6a2c8cf7130f88",
                                   "eb48c784ef20425580db7d46a30829b2"]
    everything_of_x = sops([f for files in studies for f in files])
    for pipeline_jobs in by_pipeline.values():
        x = [j for j in pipeline_jobs if j["spec"]["group"]["value"] == "PATIENT-X"]
        y = [j for j in pipeline_jobs if j["spec"]["group"]["value"] == "PATIENT-Y"]
        assert len(x) == 1 and len(y) == 1
        assert payload_sops(x[0]) == everything_of_x
        assert x[0]["spec"]["priority"] == "normal" and x[0]["spec"]["group"]["by"] == "Patient"
        assert len({p.parent.parent.name for p in Path(x[0]["spec"]["payload"]["path"], "input").rglob("*.dcm")}) == 5
    assert len(adapter.jobs()) == 6


def test_scenario_2a_three_studies_in_one_association(tmp_path, local_adapter):
    config = imported_config(tmp_path / "cfg", FIXTURES / "scenario2.json", "scenario-2")
    adapter = local_adapter(config)
    files = [f for i in range(3) for f in write_study(tmp_path / f"s{i}", slices=3, rows=32, cols=32,
                                                      patient_id="PATIENT-Z")]
    storescu(files, adapter.dicom_port)  # A, B and C in one association
    jobs = wait_for(lambda: len(adapter.jobs()) >= 3 and adapter.jobs(), 20, what="three jobs")
    assert len(jobs) == 3
    assert {j["spec"]["pipeline"] for j in jobs} == {"8abf244aff7647989d4f6b3987a85759"}
    assert {j["spec"]["priority"] for j in jobs} == {"higher"}
    assert {j["spec"]["group"]["by"] for j in jobs} == {"Study"}
    assert sorted(s for j in jobs for s in payload_sops(j)) == sops(files)
    assert all(j["spec"]["payload"]["instances"] == 3 for j in jobs)


def test_scenario_2b_four_instances_at_t1_t1p4_t2p3_t3p1_make_one_job(tmp_path, local_adapter):
    config = imported_config(tmp_path / "cfg", FIXTURES / "scenario2.json", "scenario-2")
    adapter = local_adapter(config)
    files = write_study(tmp_path / "study", slices=4, rows=32, cols=32, patient_id="PATIENT-W")
    gaps = [0, 4, 3, 1]  # the 2nd at T1+4, the 3rd at T2+3, the 4th at T3+1
    for gap, f in zip(gaps, files):
        time.sleep(gap)  # the scenario's own timing, measured from the previous acknowledgement
        storescu([f], adapter.dicom_port)  # a separate association each
    last = time.time()
    (job,) = wait_for(lambda: adapter.jobs(), 15, what="one job")
    assert payload_sops(job) == sops(files)
    assert time.time() - last >= 4.5
    wait_for(adapter.settled, 15, what="no open group, no pending job")
    assert len(adapter.jobs()) == 1


def test_sigkill_mid_study_loses_and_duplicates_nothing(tmp_path, local_adapter):
    # The quiet period must outlast a restart (start-up alone takes ~6 s on a loaded 2-core machine):
    # a group whose quiet period ends while the adapter is down rightly closes at recovery.
    timeout = 15
    config = write_config(tmp_path / "cfg", processor=f"pipelines: {{seg: p-seg, qa: p-qa}}\ntimeout: {timeout}")
    state = tmp_path / "state"
    adapter = local_adapter(config, state=state)
    files = write_study(tmp_path / "study", slices=40, rows=64, cols=64, patient_id="P-KILL")
    sender = subprocess.Popen([dcmtk("storescu"), "-v", "-aec", "CLARA", "127.0.0.1", str(adapter.dicom_port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
    wait_for(lambda: metric_value(adapter.metrics(), "clara_instances_received_total") >= 12, 60,
             interval=0.01, what="some instances acknowledged")
    adapter.kill()  # SIGKILL mid-association
    out, _ = sender.communicate(timeout=60)
    n_acked = out.count("Received Store Response (Success)")
    assert 12 <= n_acked < 40
    # restart on the same state, then send the rest of the study
    restarted = local_adapter(config, state=state)
    storescu(files[n_acked:], restarted.dicom_port)
    jobs = wait_for(lambda: len(restarted.jobs()) >= 2 and restarted.jobs(), timeout + 30, what="jobs after restart")
    # a second group, had the restart split or duplicated work, would be open or its job pending until now
    wait_for(restarted.settled, timeout + 30, what="no open group, no pending job")
    jobs = restarted.jobs()
    assert sorted(j["spec"]["pipeline"] for j in jobs) == ["p-qa", "p-seg"]
    everything = sops(files)
    for job in jobs:
        got = payload_sops(job)
        assert len(got) == len(set(got))  # nothing twice
        assert got == everything  # every acknowledged instance (and the resent rest) in exactly one job
    assert not list((state / "incoming").glob("*.dcm"))  # released after the jobs exist


def test_sigkill_after_acknowledgement_resumes_the_timer(tmp_path, local_adapter):
    config = write_config(tmp_path / "cfg", processor="pipelines: {seg: p-seg}\ntimeout: 5")
    state = tmp_path / "state"
    adapter = local_adapter(config, state=state)
    files = write_study(tmp_path / "study", slices=10, rows=32, cols=32)
    storescu(files, adapter.dicom_port)
    adapter.kill()
    restarted = local_adapter(config, state=state)
    (job,) = wait_for(lambda: restarted.jobs(), 20, what="job after restart")
    assert payload_sops(job) == sops(files)


PLUGIN = '''
"""A test plug-in: one job per `batch` instances, whatever their study."""
from clara_adapter.jobs import JobRequest
from clara_adapter.processors.base import JobProcessorBase, Outcome


class BatchProcessor(JobProcessorBase):
    type_name = "batch"

    @classmethod
    def validate(cls, settings):
        if not isinstance(settings.get("batch"), int) or settings["batch"] < 1:
            raise ValueError("settings.batch must be a positive integer")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = []
        self.batches = 0

    def handle_instance(self, instance, tx):
        # decide in the transaction; hold (and batch) only once the record is committed
        tx.after_commit(lambda: self._hold(instance))
        return Outcome.KEEP

    def _hold(self, instance):
        self.held.append(instance)
        if len(self.held) >= self.spec.settings["batch"]:
            batch, self.held = self.held, []
            self.batches += 1
            key, pipeline = sorted(self.spec.pipelines.items())[0]
            number, sequence = self.new_sequence()
            req = JobRequest(self.ctx.namespace, self.ae_title, self.processor_name, key, pipeline,
                             self.spec.priority, "batch", str(self.batches), sequence, batch)
            self.submit_pipeline_job(-number, [req], lambda: self.remove_instances(batch))
'''


def test_plugin_processor_from_an_entry_point(tmp_path, local_adapter):
    site = tmp_path / "plugin-site"
    (site / "clara_test_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "clara_test_plugin.py").write_text(PLUGIN)
    (site / "clara_test_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: clara-test-plugin\nVersion: 0.1\n")
    (site / "clara_test_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[clara_dicom.processors]\nbatch = clara_test_plugin:BatchProcessor\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    # bad settings are reported by the plug-in's validator
    bad = write_config(tmp_path / "bad", processor="type: batch\nsettings: {batch: 0}\npipelines: {p: p1}")
    from clara_dicom.config import resolve
    from clara_dicom.manifests import load_manifests

    sys.path.insert(0, str(site))
    try:
        import importlib

        importlib.invalidate_caches()
        from clara_dicom.plugins import processor_class

        processor_class.cache_clear()
        res = resolve(load_manifests(bad))
        (cond,) = [c for k, cs in res.conditions.items() if k[0] == "JobProcessor" for c in cs if c.type == "Ready"]
        assert (cond.status, cond.reason) == (False, "InvalidSettings") and "batch" in cond.message
    finally:
        sys.path.remove(str(site))
        processor_class.cache_clear()
    good = write_config(tmp_path / "good", processor="type: batch\nsettings: {batch: 3}\npipelines: {p: p1}")
    adapter = local_adapter(good, env=env)
    files = write_study(tmp_path / "study", slices=7, rows=32, cols=32)
    storescu(files, adapter.dicom_port)
    jobs = wait_for(lambda: len(adapter.jobs()) >= 2 and adapter.jobs(), 10, what="plug-in jobs")
    assert sorted(j["spec"]["payload"]["instances"] for j in jobs) == [3, 3]
    assert {j["spec"]["group"]["by"] for j in jobs} == {"batch"}
    # the 7th instance is held by the plug-in, and survives a restart
    assert adapter.status()["instancesHeld"] == 1
    adapter.stop()
    restarted = local_adapter(good, state=adapter.state, env=env)
    assert restarted.status()["instancesHeld"] == 1
    storescu(write_study(tmp_path / "more", slices=2, rows=32, cols=32), restarted.dicom_port)
    wait_for(lambda: len(restarted.jobs()) >= 3, 10, what="third batch with the recovered instance")
    assert sorted(j["spec"]["payload"]["instances"] for j in restarted.jobs()) == [3, 3, 3]
