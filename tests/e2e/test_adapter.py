"""The adapter in Kubernetes mode against a real kube-apiserver (issue 6): the
operator and the adapter run as local processes sharing the kubeconfig, dcmtk
storescu plays the modality."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from clara_dicom.synthetic import write_study  # noqa: E402
from local_setup import SOURCES  # noqa: E402
from peers import (Process, adapter_command, adapter_settled, dcmtk, dcmtk_env, echoscu, free_port,  # noqa: E402
                   storescu, wait_for)

pytestmark = [pytest.mark.e2e, pytest.mark.dcmtk]




def processor(name: str, pipelines: dict[str, str], priority: str = "higher", timeout: int = 5,
              group_by: str = "Study") -> str:
    return json.dumps({"apiVersion": "dicom.clara.io/v1alpha1", "kind": "JobProcessor", "metadata": {"name": name},
                       "spec": {"pipelines": pipelines, "priority": priority, "timeout": timeout,
                                "groupBy": group_by}})


def aetitle(name: str, ae: str, proc: str) -> str:
    return json.dumps({"apiVersion": "dicom.clara.io/v1alpha1", "kind": "ClaraAETitle", "metadata": {"name": name},
                       "spec": {"aeTitle": ae, "processor": proc}})


class Stack:
    """Operator + adapter processes for one namespace."""

    def __init__(self, cluster, ns: str, tmp: Path):
        self.cluster, self.ns, self.tmp = cluster, ns, tmp
        self.env = {**os.environ, **cluster.env}
        self.storage = tmp / "adapter-storage"
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.operator = Process(adapter_command("operator", "--namespace", ns, "--liveness-port", "0"),
                                tmp / "operator.log", env=self.env)
        self.adapter: Process | None = None
        self.start_adapter()

    def start_adapter(self) -> None:
        self.adapter = Process(adapter_command("adapter", "--namespace", self.ns, "--storage",
                                               str(self.storage), "--dicom-port", str(self.dicom_port),
                                               "--http-port", str(self.http_port), "--host", "127.0.0.1"),
                               self.tmp / "adapter.log", env=self.env)

    def apply(self, text: str) -> None:
        self.cluster.kubectl("apply", "-n", self.ns, "-f", "-", input=text)

    def jobs(self) -> list[dict]:
        return self.cluster.kubectl_json("get", "pipelinejobs", "-n", self.ns, "-o", "json")["items"]

    def accepted(self, ae: str = "CLARA") -> bool:
        return echoscu(self.dicom_port, called=ae).returncode == 0

    def applied_version(self) -> str | None:
        out = self.cluster.kubectl("get", "configmap", "clara-dicom-adapter-status", "-n", self.ns, "-o",
                                   "jsonpath={.data.appliedVersion}", check=False)
        return out.stdout.strip() or None

    def rendered_version(self) -> str | None:
        out = self.cluster.kubectl("get", "configmap", "clara-dicom-adapter-config", "-n", self.ns, "-o",
                                   "jsonpath={.data.config\\.json}", check=False)
        try:
            return json.loads(out.stdout)["version"]
        except ValueError:
            return None

    def settled(self) -> bool:
        return adapter_settled(self.http_port)

    def in_sync(self) -> bool:
        rendered = self.rendered_version()
        return bool(rendered) and rendered == self.applied_version()

    def stop(self) -> None:
        for proc in (self.adapter, self.operator):
            if proc is not None:
                proc.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log()[-4000:]}" for p in (self.operator, self.adapter) if p)


@pytest.fixture
def stack(k8s_cluster, k8s_namespace, tmp_path, dcmtk_available):
    s = Stack(k8s_cluster, k8s_namespace, tmp_path)
    s.apply(SOURCES)
    yield s
    s.stop()
    print(s.logs())  # shown by pytest for failing tests only


def payload_instances(job: dict) -> list[str]:
    return sorted(p.stem for p in Path(job["spec"]["payload"]["path"], "input").rglob("*.dcm"))


def test_resources_to_association_to_pipelinejobs(stack, tmp_path):
    stack.apply(processor("lung-proc", {"lung": "lung-seg", "qa": "qa-check"}))
    applied = time.monotonic()
    stack.apply(aetitle("clara", "CLARA", "lung-proc"))
    wait_for(stack.accepted, 20, interval=0.1, what="association accepted")
    print(f"apply -> first accepted association: {time.monotonic() - applied:.2f}s")
    files = write_study(tmp_path / "study", slices=10, rows=32, cols=32, patient_id="PAT-K8S-1")
    storescu(files, stack.dicom_port)
    jobs = wait_for(lambda: len(stack.jobs()) >= 2 and stack.jobs(), 30, what="two PipelineJobs")
    assert sorted(j["spec"]["pipeline"] for j in jobs) == ["lung-seg", "qa-check"]
    for job in jobs:
        assert job["spec"]["priority"] == "higher"
        assert job["spec"]["group"]["by"] == "Study"
        assert job["spec"]["payload"]["instances"] == 10
        assert len(payload_instances(job)) == 10
        meta = json.dumps(job["metadata"])
        assert "PAT-K8S-1" not in meta and job["spec"]["group"]["value"] not in meta
        assert job["metadata"]["labels"]["dicom.clara.io/ae-title"] == "CLARA"
        assert job["metadata"]["annotations"]["dicom.clara.io/clara-job-name"].startswith("CLARA-")
    wait_for(stack.in_sync, 10, what="operator sees the adapter's applied version")


def test_edits_apply_to_the_next_study_and_delete_refuses(stack, tmp_path):
    stack.apply(processor("proc", {"old": "p-old"}, priority="lower", timeout=8))
    stack.apply(aetitle("clara", "CLARA", "proc"))
    wait_for(stack.accepted, 20, interval=0.1, what="association accepted")
    study_a = write_study(tmp_path / "a", slices=3, rows=32, cols=32)
    storescu(study_a, stack.dicom_port)  # opens a group with the old settings
    before = stack.rendered_version()
    stack.apply(processor("proc", {"new": "p-new"}, priority="immediate", timeout=5, group_by="Series"))
    wait_for(lambda: stack.rendered_version() != before and stack.in_sync(), 10, what="edit applied")
    study_b = write_study(tmp_path / "b", slices=2, rows=32, cols=32, series=2)
    storescu(study_b, stack.dicom_port)
    jobs = wait_for(lambda: len(stack.jobs()) >= 3 and stack.jobs(), 30, what="three jobs")
    old = [j for j in jobs if j["spec"]["pipeline"] == "p-old"]
    new = [j for j in jobs if j["spec"]["pipeline"] == "p-new"]
    assert len(old) == 1 and old[0]["spec"]["priority"] == "lower" and old[0]["spec"]["group"]["by"] == "Study"
    assert old[0]["spec"]["payload"]["instances"] == 3
    assert len(new) == 2 and {j["spec"]["group"]["by"] for j in new} == {"Series"}  # one per series
    assert {j["spec"]["priority"] for j in new} == {"immediate"}
    stack.cluster.kubectl("delete", "claraaetitle", "clara", "-n", stack.ns)
    wait_for(lambda: not stack.accepted(), 10, interval=0.1, what="association refused after delete")
    proc = storescu(study_a[:1], stack.dicom_port, check=False)
    assert "Called AE Title Not Recognized" in proc.stderr


def test_invalid_edit_keeps_the_last_valid_configuration(stack):
    stack.apply(processor("proc", {"a": "p-a"}))
    stack.apply(aetitle("clara", "CLARA", "proc"))
    wait_for(stack.accepted, 20, interval=0.1, what="association accepted")
    wait_for(stack.in_sync, 10, what="in sync")
    version = stack.applied_version()
    # accepted by the API server, refused by the operator's cross-object rules
    stack.apply(aetitle("clara", "CLARA", "no-such-processor"))
    wait_for(lambda: "ProcessorNotFound" in stack.cluster.kubectl(
        "get", "aet", "clara", "-n", stack.ns, "-o", "jsonpath={.status.conditions}").stdout, 10,
        what="Ready=False ProcessorNotFound")
    assert stack.accepted()
    assert stack.applied_version() == version


def kill_apiserver(cluster) -> tuple[list[bytes], object]:
    comp = next(c for c in cluster.components if c.name == "kube-apiserver")
    argv = Path(f"/proc/{comp.pid}/cmdline").read_bytes().split(b"\0")[:-1]
    os.killpg(comp.pid, signal.SIGKILL)
    if comp.popen is not None:
        comp.popen.wait(10)
    return argv, comp


def start_apiserver(cluster, argv: list[bytes], comp) -> None:
    log = open(comp.log, "ab")  # noqa: SIM115 - handed to the child
    popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             cwd=cluster.workdir, start_new_session=True)
    comp.pid, comp.popen = popen.pid, popen
    wait_for(lambda: _safe_ready(cluster), 90, interval=0.5, what="kube-apiserver ready again")
    cluster.wait_controllers_caught_up()  # or the next test's namespace waits for its ServiceAccount


def _safe_ready(cluster) -> bool:
    try:
        return cluster.request("GET", "/readyz")[0] == 200
    except Exception:
        return False


def test_api_outage_while_a_group_closes_creates_each_job_once(stack, tmp_path, k8s_cluster):
    if k8s_cluster.external:
        pytest.skip("needs the control plane this test suite started (it stops kube-apiserver)")
    stack.apply(processor("proc", {"seg": "p-seg", "qa": "p-qa"}, timeout=5))
    stack.apply(aetitle("clara", "CLARA", "proc"))
    wait_for(stack.accepted, 20, interval=0.1, what="association accepted")
    files = write_study(tmp_path / "study", slices=6, rows=32, cols=32)
    storescu(files, stack.dicom_port)
    argv, comp = kill_apiserver(k8s_cluster)
    try:
        time.sleep(20)  # the outage the scenario calls for; the group closes 5 s into it
        assert stack.accepted()  # the adapter keeps receiving during the outage
        more = write_study(tmp_path / "during", slices=2, rows=32, cols=32)
        storescu(more, stack.dicom_port)
    finally:
        start_apiserver(k8s_cluster, argv, comp)
    wait_for(lambda: len(stack.jobs()) >= 4, 60, what="jobs after the outage")
    wait_for(lambda: stack.settled(), 60, what="no open group and no pending job submission")
    jobs = stack.jobs()
    assert len(jobs) == 4 and len({j["metadata"]["name"] for j in jobs}) == 4
    assert sorted(j["spec"]["payload"]["instances"] for j in jobs) == [2, 2, 6, 6]
    assert "retry" in stack.adapter.log()


def test_adapter_sigkill_mid_study_loses_and_duplicates_nothing(stack, tmp_path):
    # The quiet period must outlast the adapter's restart, even on a loaded machine,
    # or the group rightly closes before the rest of the study arrives.
    timeout = 15
    stack.apply(processor("proc", {"seg": "p-seg"}, timeout=timeout))
    stack.apply(aetitle("clara", "CLARA", "proc"))
    wait_for(stack.accepted, 20, interval=0.1, what="association accepted")
    files = write_study(tmp_path / "study", slices=30, rows=64, cols=64)
    sender = subprocess.Popen([dcmtk("storescu"), "-v", "-aec", "CLARA", "127.0.0.1", str(stack.dicom_port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dcmtk_env())
    wait_for(lambda: list((stack.storage / "incoming").glob("*.dcm"))[9:], 60, interval=0.01,
             what="some instances stored")
    stack.adapter.kill()
    out, _ = sender.communicate(timeout=60)
    acked = out.count("Received Store Response (Success)")
    assert acked < 30
    stack.start_adapter()
    wait_for(stack.accepted, 30, interval=0.1, what="restarted adapter accepts")
    storescu(files[acked:], stack.dicom_port)
    wait_for(lambda: stack.jobs(), timeout + 30, what="the job")
    # Nothing open and nothing waiting to be submitted: a second (split) group would have made its job.
    wait_for(lambda: stack.settled(), timeout + 30, what="no open group and no pending job submission")
    (job,) = stack.jobs()
    import pydicom

    assert payload_instances(job) == sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
                                            for f in files)
