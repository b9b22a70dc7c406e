"""The full loop with real pods: a CT study in over DICOM, the AI's result series in
a real PACS, every pod run by a real kubelet from our image.

dcmtk storescu -> adapter (local process) -> PipelineJob -> operator (local
process) -> batch Job whose pod runs on the real node: prepare-payload, the
stand-in AI (an image derived here from ours) and register-results, as
containers, on the payload PVC (a hostPath PV) -> RegisterResults -> its Job,
also a real pod -> Results Service (the chart's Deployment, a real pod with
the chart's securityContext) -> the adapter's SCU export agent -> Orthanc
holds exactly the new series.  And a pipeline whose operator exits non-zero:
the PipelineJob fails with that container's exit code and message, nothing is
registered.

The operator and the adapter stay local processes: they talk to the API
server, which a pod on this node cannot reach (no kube-proxy; the API server
listens on 127.0.0.1).  Pods reach the Results Service at its pod IP (no
Service routing either).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

TESTS = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
REPO = TESTS.parent
for p in (str(TESTS), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

import oci_image  # noqa: E402
import real_node as rn  # noqa: E402
from clara_dicom.synthetic import write_study  # noqa: E402
from local_setup import IN_CI, SOURCES  # noqa: E402
from peers import Orthanc, Process, adapter_command, echoscu, free_port, storescu, wait_for  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.dcmtk, pytest.mark.orthanc, pytest.mark.slow]

IMAGE_BUILD = REPO / "tools" / "image" / "build.sh"
CHART = REPO / "charts" / "clara-dicom"
AI_IMAGE = "clara-dicom-test/ai-standin:1"
PAYLOAD_PVC = "clara-dicom-payloads"
APP_UID = 10001  # the image's user (Dockerfile) and the chart's runAsUser/fsGroup
PRIORITIES = {"lower": 1000, "normal": 10000, "higher": 100000, "immediate": 1000000}


def _missing(what: str):
    if IN_CI:
        pytest.fail(f"{what} (required in CI)", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def images(real_node, tmp_path_factory) -> dict[str, str]:
    """Our image (tools/image/build.sh, cached) and the stand-in AI derived from it, in the node's store."""
    archive = os.environ.get("CLARA_DICOM_IMAGE_ARCHIVE")
    image = os.environ.get("CLARA_DICOM_IMAGE")
    if not archive:
        if not IMAGE_BUILD.exists():
            _missing(f"{IMAGE_BUILD.relative_to(REPO)} not here (the container image, issue 17)")
        res = subprocess.run(["bash", str(IMAGE_BUILD)], capture_output=True, text=True, timeout=3000)
        if res.returncode != 0:
            _missing(f"make image failed: {res.stderr.strip()[-2000:]}")
        out = dict(line.split("=", 1) for line in res.stdout.splitlines() if "=" in line)
        archive, image = out["archive"], out["image"]
    ai = oci_image.derive_docker_archive(
        Path(archive), tmp_path_factory.mktemp("ai-image") / "ai-standin.tar", f"docker.io/{AI_IMAGE}",
        {"/app/ai_standin.py": ((HERE / "ai_standin.py").read_bytes(), 0o644)})
    started = time.monotonic()
    real_node.import_images(Path(archive), ai)
    print(f"\nimages imported into the real node in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return {"image": image, "ai": AI_IMAGE}


def helm(cluster, *args: str) -> str:
    res = subprocess.run([cluster.tool("helm"), "--kubeconfig", str(cluster.kubeconfig), *args],
                         capture_output=True, text=True, timeout=300, env={**os.environ, **cluster.env})
    assert res.returncode == 0, f"helm {' '.join(args)}:\n{res.stderr}"
    return res.stdout


def pipeline_manifests(orthanc_port: int, image: str, ai_command: list[str], name: str) -> str:
    repo, tag = image.rsplit(":", 1)
    ai_repo, ai_tag = AI_IMAGE.rsplit(":", 1)
    docs = [
        {"kind": "ClaraDestination", "metadata": {"name": "orthanc"},
         "spec": {"aeTitle": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}},
        {"kind": "ClaraPipeline", "metadata": {"name": name}, "spec": {"definition": {
            "api-version": "0.4.0", "name": name, "operators": [
                {"name": "ai", "container": {"image": ai_repo, "tag": ai_tag, "command": ai_command},
                 "input": [{"path": "/input"}], "output": [{"name": "dicom", "path": "/output"}]},
                {"name": "register-dicom-output", "container": {
                    "image": repo, "tag": tag,
                    "command": ["python", "register.py", "--agent", "ClaraSCU", "--data", '["orthanc"]']},
                 "input": [{"from": "ai", "name": "dicom", "path": "/input"}]},
            ]}}},
        {"kind": "JobProcessor", "metadata": {"name": "ct-by-study"},
         "spec": {"groupBy": "Study", "priority": "higher", "timeout": 5, "pipelines": {"ai": name}}},
        {"kind": "ClaraAETitle", "metadata": {"name": "clara"}, "spec": {"aeTitle": "CLARA", "processor": "ct-by-study"}},
        {"kind": "RegisterResults", "metadata": {"name": "to-pacs"},
         "spec": {"agent": "ClaraSCU", "data": ["Orthanc"], "pipeline": name, "inputs": ["ai/dicom"]}},
    ]
    return "\n---\n".join(json.dumps({"apiVersion": "dicom.clara.io/v1alpha1", **d}) for d in docs) + SOURCES


class Stack:
    """Results Service (chart, real pod), Orthanc, operator and adapter (local) for one namespace."""

    def __init__(self, cluster, node, ns: str, tmp: Path, image: str) -> None:
        self.cluster, self.node, self.ns, self.tmp, self.image = cluster, node, ns, tmp, image
        self.procs: list[Process] = []
        self.t0 = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.t0))
        print(f"[{self.marks[-1][1]:7.2f}s] {what}", flush=True)

    def start(self, ai_command: list[str], pipeline: str) -> "Stack":
        c, ns, tmp = self.cluster, self.ns, self.tmp
        for prio, value in PRIORITIES.items():  # cluster-wide and immutable: keep those another test made
            c.kubectl("create", "-f", "-", check=False, input=json.dumps({
                "apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                "metadata": {"name": f"clara-dicom-{prio}"}, "value": value}))
        # The payload volume: the adapter's storage folder, a hostPath PV behind the chart's PVC name.
        # Group APP_UID, setgid and the adapter's umask 002 stand in for fsGroup, which hostPath ignores.
        self.storage = tmp / "storage"
        self.storage.mkdir()
        os.chown(self.storage, 0, APP_UID)
        self.storage.chmod(0o2775)
        pv = f"payloads-{ns}"
        c.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                 "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                          "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "e2e-hostpath",
                          "hostPath": {"path": str(self.storage), "type": "Directory"},
                          "claimRef": {"namespace": ns, "name": PAYLOAD_PVC}}})
        c.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": PAYLOAD_PVC},
                 "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "e2e-hostpath", "volumeName": pv,
                          "resources": {"requests": {"storage": "1Gi"}}}}, namespace=ns)
        # The chart's Results Service only, as a real pod on the real node.
        repo, tag = self.image.rsplit(":", 1)
        values = tmp / "values.json"
        values.write_text(json.dumps({
            "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
            "operator": {"enabled": False}, "adapter": {"enabled": False},
            "priorityClasses": {"create": False}, "networkPolicy": {"enabled": False},
            "resultsService": {"persistence": {"enabled": False}, "nodeSelector": rn.NODE_SELECTOR,
                               "tolerations": [rn.TOLERATION], "extraArgs": ["--retry-delay=0"]},
        }))
        helm(c, "install", "rn", str(CHART), "-n", ns, "-f", str(values))
        pod = wait_for(lambda: self._ready_pod("app.kubernetes.io/component=results"), 120, interval=0.3,
                       what="Results Service pod Ready on the real node")
        assert pod["spec"]["nodeName"] == rn.NODE_NAME
        self.results_pod = pod
        self.results_url = f"http://{pod['status']['podIP']}:8088"
        (secret,) = c.kubectl_json("get", "secrets", "-n", ns, "-l", "app.kubernetes.io/component=results")["items"]
        self.token_secret = secret["metadata"]["name"]
        import base64

        self.token = base64.b64decode(secret["data"]["token"]).decode()
        self.mark("Results Service (chart) Ready as a real pod")

        self.orthanc = Orthanc(tmp / "orthanc")
        self.procs.append(self.orthanc)
        c.kubectl("apply", "-n", ns, "-f", "-",
                  input=pipeline_manifests(self.orthanc.dicom_port, self.image, ai_command, pipeline))
        env = {**os.environ, **c.env}
        self.procs.append(Process(adapter_command(
            "operator", "--namespace", ns, "--liveness-port", "0", "--payload-pvc", PAYLOAD_PVC,
            "--payload-root", str(self.storage), "--results-url", self.results_url,
            "--results-token-secret", self.token_secret, "--prepare-image", self.image,
            "--toleration", json.dumps(rn.TOLERATION),
            "--node-selector", "kubernetes.io/hostname=" + rn.NODE_NAME), tmp / "operator.log", env=env))
        self.dicom_port = free_port()
        self.procs.append(Process(
            ["sh", "-c", 'umask 002 && exec "$@"', "sh", *adapter_command(
                "adapter", "--namespace", ns, "--storage", str(self.storage), "--dicom-port", str(self.dicom_port),
                "--http-port", str(free_port()), "--host", "127.0.0.1")], tmp / "adapter.log",
            env={**env, "CLARA_RESULTS_URL": self.results_url, "CLARA_RESULTS_TOKEN": self.token,
                 "CLARA_EXPORT_POLL_SECONDS": "0.2"}))
        wait_for(lambda: echoscu(self.dicom_port).returncode == 0, 60, interval=0.2, what="AE title CLARA accepted")
        self.mark("stack ready: operator, adapter (local), Results Service (pod), Orthanc")
        return self

    def _ready_pod(self, selector: str) -> dict | None:
        pods = self.cluster.kubectl_json("get", "pods", "-n", self.ns, "-l", selector)["items"]
        for pod in pods:
            if any(x["type"] == "Ready" and x["status"] == "True" for x in pod["status"].get("conditions", [])):
                return pod
        return None

    def send_study(self) -> set[str]:
        study = write_study(self.tmp / "study", slices=12, rows=64, cols=64, patient_id="LOOP-PATIENT")
        storescu(study, self.dicom_port)
        self.mark("study sent (12 CT slices) and acknowledged")
        return {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in study}

    def pipelinejob(self) -> dict:
        (pjob,) = wait_for(lambda: self.cluster.kubectl_json("get", "pipelinejobs", "-n", self.ns)["items"], 30,
                           interval=0.1, what="PipelineJob")
        self.mark(f"PipelineJob {pjob['metadata']['name']} created by the adapter")
        return pjob

    def finished(self, name: str, timeout: float = 300) -> dict:
        def status():
            st = self.cluster.kubectl_json("get", "pipelinejob", name, "-n", self.ns).get("status") or {}
            return st if st.get("phase") in ("Succeeded", "Failed") else None

        st = wait_for(status, timeout, interval=0.3, what=f"PipelineJob {name} finished")
        self.mark(f"PipelineJob {st['phase']} (its pod ran on the real node)")
        return st

    def pods(self, selector: str) -> list[dict]:
        return self.cluster.kubectl_json("get", "pods", "-n", self.ns, "-l", selector)["items"]

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for proc in self.procs:
            print(f"--- {proc.log_path.name} (tail)\n{proc.log()[-3000:]}")
        res = self.cluster.kubectl("logs", "-n", self.ns, "-l", "app.kubernetes.io/component=results",
                                   "--tail=40", check=False)
        print(f"--- results pod (tail)\n{res.stdout}{res.stderr}")
        subprocess.run([self.cluster.tool("helm"), "--kubeconfig", str(self.cluster.kubeconfig), "uninstall", "rn",
                        "-n", self.ns, "--wait", "--timeout", "60s"], capture_output=True, timeout=120)
        self.cluster.kubectl("delete", "pv", f"payloads-{self.ns}", "--wait=false", check=False)

    def report(self) -> str:
        lines, last = [], 0.0
        for what, at in self.marks:
            lines.append(f"  {at:7.2f}s  (+{at - last:5.2f}s)  {what}")
            last = at
        return "\n".join(lines)


def assert_ran_for_real(pod: dict, containers: list[str]) -> None:
    """Every named container was run by the kubelet on the real node and exited 0."""
    assert pod["spec"]["nodeName"] == rn.NODE_NAME
    statuses = {cs["name"]: cs for cs in (pod["status"].get("initContainerStatuses") or [])
                + (pod["status"].get("containerStatuses") or [])}
    for name in containers:
        term = statuses[name]["state"]["terminated"]
        assert term["exitCode"] == 0, (name, term)
        assert statuses[name]["containerID"].startswith("containerd://")


def test_study_in_results_in_pacs_with_real_pods(k8s_cluster, real_node, images, k8s_namespace, tmp_path,
                                                 dcmtk_available, orthanc_available):
    stack = Stack(k8s_cluster, real_node, k8s_namespace, tmp_path, images["image"])
    try:
        stack.start(["python", "/app/ai_standin.py", "--input", "/input", "--output", "/output"], "ai-pipeline")
        sent = stack.send_study()
        name = stack.pipelinejob()["metadata"]["name"]
        status = stack.finished(name)
        assert status["phase"] == "Succeeded", status
        (pod,) = stack.pods("dicom.clara.io/component=pipeline-job")
        assert_ran_for_real(pod, ["prepare-payload", "ai", "register-dicom-output"])
        logs = k8s_cluster.kubectl("logs", "-n", k8s_namespace, pod["metadata"]["name"], "-c", "ai").stdout
        assert "wrote 12 instances" in logs

        register_pods = wait_for(lambda: (lambda ps: ps if ps and ps[0]["status"].get("phase") == "Succeeded"
                                          else None)(stack.pods("dicom.clara.io/component=register-results")),
                                 120, interval=0.3, what="RegisterResults pod Succeeded")
        assert_ran_for_real(register_pods[0], [c["name"] for c in register_pods[0]["spec"]["containers"]])
        stack.mark("RegisterResults Job ran as a real pod")

        from clara_results.client import ResultsClient

        client = ResultsClient(stack.results_url, stack.token)
        tasks = wait_for(lambda: (lambda ts: ts if len(ts) >= 2 else None)(client.list_tasks(agent="ClaraSCU")),
                         60, interval=0.2, what="two export tasks")
        assert sorted(t.operator for t in tasks) == ["register-dicom-output", "register-to-pacs"]

        ai_output = sorted((stack.storage / "payloads" / name / "operators" / "ai" / "dicom").glob("*.dcm"))
        expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ai_output}
        assert len(expected) == 12 and not expected & sent
        assert {f.stat().st_uid for f in ai_output} == {APP_UID}  # written by the image's non-root user
        wait_for(lambda: stack.orthanc.count_instances() >= 12, 120, interval=0.3, what="Orthanc holds the series")
        stack.mark("Orthanc holds the new series (C-STOREd by the SCU export agent)")
        wait_for(lambda: all(client.get_task(t.id).state == 3 for t in tasks), 60, interval=0.2,
                 what="both tasks Succeeded")
        stack.mark("both export tasks Succeeded in the Results Service pod")
        assert stack.orthanc.sop_instance_uids() == expected  # exactly the AI's series: nothing else, nothing twice
        (series,) = stack.orthanc.get("/series")
        assert stack.orthanc.get(f"/series/{series}")["MainDicomTags"]["SeriesDescription"] == "AI RESULT"
        # The chart's securityContext held in the Results Service pod: non-root, read-only root.
        results = stack.results_pod
        assert results["spec"]["securityContext"]["runAsNonRoot"] is True
        assert results["spec"]["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        print("\nfull loop with real pods, stage timings:\n" + stack.report())
    finally:
        stack.stop()


def test_failing_operator_fails_the_pipelinejob_with_its_exit_code(k8s_cluster, real_node, images, k8s_namespace,
                                                                   tmp_path, dcmtk_available, orthanc_available):
    failing = ["python", "-c", "import sys; open('/dev/termination-log', 'w').write('model failed: out of memory'); "
               "print('loading model...'); sys.exit(7)"]
    stack = Stack(k8s_cluster, real_node, k8s_namespace, tmp_path, images["image"])
    try:
        stack.start(failing, "failing-pipeline")
        stack.send_study()
        name = stack.pipelinejob()["metadata"]["name"]
        status = stack.finished(name)
        assert status["phase"] == "Failed", status
        assert status["reason"] == "OperatorFailed" and status.get("failedOperator") == "ai", status
        assert "exited with code 7" in status["message"] and "model failed: out of memory" in status["message"]
        (pod,) = stack.pods("dicom.clara.io/component=pipeline-job")
        assert pod["spec"]["nodeName"] == rn.NODE_NAME
        statuses = {cs["name"]: cs for cs in pod["status"]["initContainerStatuses"]}
        assert statuses["ai"]["state"]["terminated"]["exitCode"] == 7
        assert "register-dicom-output" not in statuses or "terminated" not in statuses["register-dicom-output"]["state"]
        # Nothing registered, nothing exported: no RegisterResults Job for a failed pipeline.
        from clara_results.client import ResultsClient

        assert ResultsClient(stack.results_url, stack.token).list_tasks(agent="ClaraSCU") == []
        assert not stack.pods("dicom.clara.io/component=register-results")
        assert stack.orthanc.count_instances() == 0
        print("\nfailing pipeline, stage timings:\n" + stack.report())
    finally:
        stack.stop()
