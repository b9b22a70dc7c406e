"""The full loop, the project's flagship test: a CT study in over DICOM, the AI
pipeline's result series in a real PACS.

dcmtk storescu -> adapter (Kubernetes mode) -> PipelineJob -> operator -> batch
Job -> (the harness plays the pod's containers: a stand-in AI operator writing a
new series, and register-results as a pipeline operator) -> RegisterResults ->
register Job (played too) -> Results Service -> the adapter's SCU export agent ->
Orthanc, whose REST API must hold exactly the new series. Each stage's time is
printed.

Two modes. ``processes``: the adapter and every container run as local processes
(any machine). ``podman`` (marker ``container``): the adapter runs in the
clara-dicom image (built by tools/image/build.sh) under the chart's
securityContext, its storage owned by uid 10001 as the chart's fsGroup makes it,
and each container of the pipeline pod and of the register Job runs in podman
from its pod spec, the stand-in AI as a small image built on ours.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
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

sys.path.insert(0, str(TESTS / "container"))

import k8s_cluster as kc  # noqa: E402
from clara_dicom.synthetic import write_study  # noqa: E402
from local_setup import SOURCES  # noqa: E402
from peers import Orthanc, Process, adapter_command, echoscu, free_port, port_open, storescu, wait_for  # noqa: E402
from pod_player import PodmanPodPlayer, PodPlayer, dump  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.dcmtk, pytest.mark.orthanc, pytest.mark.slow]

PRIORITIES = {"lower": 1000, "normal": 2000, "higher": 3000, "immediate": 4000}
TOKEN_SECRET = "clara-dicom-results-token"


STANDIN_IMAGE = "clara-dicom-test/ai-standin:1"


def manifests(orthanc_port: int, clara_tag: str = "test") -> str:
    docs = [
        {"kind": "ClaraDestination", "metadata": {"name": "orthanc"},
         "spec": {"aeTitle": "ORTHANC", "host": "127.0.0.1", "port": orthanc_port}},
        {"kind": "ClaraPipeline", "metadata": {"name": "ai-pipeline"}, "spec": {"definition": {
            "api-version": "0.4.0", "name": "ai-pipeline", "operators": [
                {"name": "ai", "container": {
                    "image": STANDIN_IMAGE.split(":")[0], "tag": STANDIN_IMAGE.split(":")[1],
                    "command": ["python", "/app/ai_standin.py", "--input", "/input", "--output", "/output"]},
                 "input": [{"path": "/input"}], "output": [{"name": "dicom", "path": "/output"}]},
                {"name": "register-dicom-output", "container": {
                    "image": "clara-dicom", "tag": clara_tag,
                    "command": ["python", "register.py", "--agent", "ClaraSCU", "--data", '["orthanc"]']},
                 "input": [{"from": "ai", "name": "dicom", "path": "/input"}]},
            ]}}},
        {"kind": "JobProcessor", "metadata": {"name": "ct-by-study"},
         "spec": {"groupBy": "Study", "priority": "higher", "timeout": 5, "pipelines": {"ai": "ai-pipeline"}}},
        {"kind": "ClaraAETitle", "metadata": {"name": "clara"}, "spec": {"aeTitle": "CLARA", "processor": "ct-by-study"}},
        # The same results registered a second way, by a RegisterResults resource ("Orthanc": names are
        # case-insensitive).
        {"kind": "RegisterResults", "metadata": {"name": "to-pacs"},
         "spec": {"agent": "ClaraSCU", "data": ["Orthanc"], "pipeline": "ai-pipeline", "inputs": ["ai/dicom"]}},
    ]
    return "\n---\n".join(json.dumps({"apiVersion": "dicom.clara.io/v1alpha1", **d}) for d in docs) + SOURCES


class Timeline:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> None:
        self.marks.append((what, time.monotonic() - self.t0))
        print(f"[{self.marks[-1][1]:7.2f}s] {what}", flush=True)

    def report(self) -> str:
        lines, last = [], 0.0
        for what, at in self.marks:
            lines.append(f"  {at:7.2f}s  (+{at - last:5.2f}s)  {what}")
            last = at
        return "\n".join(lines)


@pytest.mark.parametrize("mode", ["processes", pytest.param("podman", marks=pytest.mark.container)])
def test_study_in_results_in_pacs(mode, k8s_cluster, k8s_namespace, tmp_path, dcmtk_available, orthanc_available):
    if k8s_cluster.external:
        pytest.skip("the pod player needs the kwok control plane of e2e/ (pods held by annotation)")
    ns, cluster = k8s_namespace, k8s_cluster
    if mode == "podman":
        from container_lib import build_derived, build_image

        image = build_image()  # skips, saying why, where podman cannot run
        build_derived(image, STANDIN_IMAGE, {"/app/ai_standin.py": HERE / "ai_standin.py"})
        clara_tag, prepare_image, payload_root = image.name.split(":")[1], image.name, "/storage"
    else:
        clara_tag, prepare_image, payload_root = "test", "clara-dicom:test", None
    for prio, value in PRIORITIES.items():
        cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                       "metadata": {"name": f"clara-dicom-{prio}"}, "value": value})
    storage = tmp_path / "storage"  # the adapter's storage = the payload volume (hostPath here)
    storage.mkdir()
    if mode == "podman":  # what the chart's fsGroup does to the payload volume
        os.chown(storage, 10001, 10001)
        storage.chmod(0o2775)
    app = tmp_path / "image-app"  # stands in for the image's /app (WORKDIR with register.py)
    app.mkdir()
    shutil.copy(REPO / "results" / "register.py", app / "register.py")
    shutil.copy(HERE / "ai_standin.py", app / "ai_standin.py")
    env = {**os.environ, **cluster.env}
    token = secrets.token_urlsafe(18)
    procs: list[Process] = []
    player = None
    timeline = Timeline()
    try:
        results_port = free_port()
        results_url = f"http://127.0.0.1:{results_port}"
        procs.append(Process(adapter_command("results-service", "--host", "127.0.0.1", "--port", str(results_port),
                                             "--database", str(tmp_path / "results.db"), "--retry-delay", "0"),
                             tmp_path / "results.log", env={**env, "CLARA_RESULTS_TOKEN": token}))
        wait_for(lambda: port_open(results_port), 30, what="Results Service")
        cluster.kubectl("create", "secret", "generic", TOKEN_SECRET, "-n", ns, f"--from-literal=token={token}")
        orthanc = Orthanc(tmp_path / "orthanc")
        procs.append(orthanc)
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=manifests(orthanc.dicom_port, clara_tag))
        procs.append(Process(adapter_command(
            "operator", "--namespace", ns, "--liveness-port", "0", "--payload-host-path", str(storage),
            "--payload-root", payload_root or str(storage), "--results-url", results_url,
            "--results-token-secret", TOKEN_SECRET, "--prepare-image", prepare_image,
            "--pod-annotation", f"{kc.OUTCOME_ANNOTATION}=hold"),
            tmp_path / "operator.log", env=env))
        dicom_port = free_port()
        adapter_env = {"CLARA_RESULTS_URL": results_url, "CLARA_RESULTS_TOKEN": token,
                       "CLARA_EXPORT_POLL_SECONDS": "0.2"}
        if mode == "podman":
            from container_lib import PODMAN, RLIMITS, Container, chart_security_flags

            kube = tmp_path / "kube"  # the kubeconfig, readable by the container's uid 10001
            kube.mkdir(mode=0o755)
            shutil.copy(cluster.kubeconfig, kube / "config")
            (kube / "config").chmod(0o644)
            # Host network: the API server, Orthanc and the Results Service listen on loopback only.
            procs.append(Container(f"clara-e2e-adapter-{ns}", [
                "--network", "host", *RLIMITS, *chart_security_flags(), "-v", f"{storage}:/storage",
                "-v", f"{kube}:/kube:ro", "-e", "KUBECONFIG=/kube/config",
                *[a for k, v in adapter_env.items() for a in ("-e", f"{k}={v}")],
                prepare_image, "clara-dicom", "adapter", "--namespace", ns, "--storage", "/storage",
                "--dicom-port", str(dicom_port), "--http-port", str(free_port()), "--host", "127.0.0.1"]))
            player = PodmanPodPlayer(cluster, ns, PODMAN, RLIMITS).start()
        else:
            procs.append(Process(adapter_command(
                "adapter", "--namespace", ns, "--storage", str(storage), "--dicom-port", str(dicom_port),
                "--http-port", str(free_port()), "--host", "127.0.0.1"), tmp_path / "adapter.log",
                env={**env, **adapter_env}))
            player = PodPlayer(cluster, ns, images={"clara-dicom": app, "clara-dicom-test/ai-standin": app}).start()
        wait_for(lambda: echoscu(dicom_port).returncode == 0, 180 if mode == "podman" else 60, interval=0.2,
                 what="AE title CLARA accepted")
        timeline.mark("stack ready: operator, adapter, Results Service, Orthanc")

        study = write_study(tmp_path / "study", slices=12, rows=64, cols=64, patient_id="LOOP-PATIENT")
        sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in study}
        storescu(study, dicom_port)
        timeline.mark("study sent (12 CT slices) and acknowledged")

        def pjobs():
            return cluster.kubectl_json("get", "pipelinejobs", "-n", ns, "-o", "json")["items"]

        (pjob,) = wait_for(pjobs, 30, interval=0.1, what="PipelineJob")
        timeline.mark(f"PipelineJob {pjob['metadata']['name']} created by the adapter (5 s quiet period)")
        name = pjob["metadata"]["name"]

        def jobs(component: str):
            return cluster.kubectl_json("get", "jobs", "-n", ns, "-l", f"dicom.clara.io/component={component}",
                                        "-o", "json")["items"]

        wait_for(lambda: jobs("pipeline-job"), 30, interval=0.1, what="pipeline batch Job")
        timeline.mark("batch Job created by the operator")

        def phase():
            return (cluster.kubectl_json("get", "pipelinejob", name, "-n", ns, "-o", "json").get("status") or {}
                    ).get("phase")

        wait_for(lambda: phase() in ("Succeeded", "Failed"), 600 if mode == "podman" else 120, interval=0.2,
                 what="PipelineJob finished")
        assert phase() == "Succeeded", dump(player.played)
        timeline.mark("pipeline played (stand-in AI, register-results operator); PipelineJob Succeeded")

        register_jobs = wait_for(lambda: jobs("register-results"), 60, interval=0.2, what="RegisterResults Job")
        assert len(register_jobs) == 1
        register_job = register_jobs[0]["metadata"]["name"]

        def register_played() -> bool:
            pods = cluster.kubectl_json("get", "pods", "-n", ns, "-l", f"job-name={register_job}", "-o",
                                        "json")["items"]
            return any(p["metadata"]["name"] in player.played for p in pods)

        wait_for(register_played, 300 if mode == "podman" else 60, interval=0.2, what="register Job played")
        timeline.mark("RegisterResults Job created and played")

        from clara_results.client import ResultsClient

        client = ResultsClient(results_url, token)
        tasks = wait_for(lambda: (lambda ts: ts if len(ts) >= 2 else None)(client.list_tasks(agent="ClaraSCU")),
                         60, interval=0.2, what="two export tasks")
        operators = sorted(t.operator for t in tasks)
        assert operators == ["register-dicom-output", "register-to-pacs"], operators

        ai_output = sorted((storage / "payloads" / name / "operators" / "ai" / "dicom").glob("*.dcm"))
        expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in ai_output}
        assert len(expected) == 12 and not expected & sent
        wait_for(lambda: orthanc.count_instances() >= 12, 120, interval=0.3, what="Orthanc holds the series")
        timeline.mark("Orthanc holds the new series (C-STOREd by the SCU export agent)")
        wait_for(lambda: all(client.get_task(t.id).state == 3 for t in tasks), 60, interval=0.2,
                 what="both tasks Succeeded")
        timeline.mark("both export tasks reported Succeeded to the Results Service")

        assert orthanc.sop_instance_uids() == expected  # exactly the AI's series: nothing else, nothing twice
        series = orthanc.get("/series")
        assert len(series) == 1
        tags = orthanc.get(f"/series/{series[0]}")["MainDicomTags"]
        assert tags["SeriesDescription"] == "AI RESULT"
        print("\nfull loop stage timings:\n" + timeline.report())
    finally:
        if player is not None:
            player.stop()
            print("pods played:", dump(player.played), "errors:", player.errors)
        for proc in reversed(procs):
            proc.stop()
        for proc in procs:
            print(f"--- {proc.log_path.name} (tail)\n{proc.log()[-3000:]}")
            if hasattr(proc, "remove"):
                proc.remove()
