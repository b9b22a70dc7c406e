"""PipelineJob → batch Job on a real kube-apiserver, pods played by kwok (issue 9).

The operator runs as a process; PipelineJobs are created with kubectl (no
adapter needed). kwok completes a Job's pod as soon as it runs, unless the pod
carries ``e2e.clara-dicom.io/outcome`` (fail / hold; see e2e/kwok-stages.yaml) —
the operator's ``--pod-annotation`` puts it on every pipeline pod.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

import k8s_cluster as kc
from peers import stops_what_it_starts
from test_operator import Operator, Rest, wait_for

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
LIVER = REPO / "tests" / "fixtures" / "liver-tumor-pipeline.yaml"
PJ_PATH = "/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/pipelinejobs"
PAYLOAD_ROOT = "/var/lib/clara-dicom"
PRIORITY_VALUES = {"lower": 1000, "normal": 2000, "higher": 3000, "immediate": 4000}
ORDER = ["prepare-payload", "dicom-reader", "liver-tumor-segmentation", "dicom-writer", "register-mhd-output"]


@pytest.fixture
def rest(k8s_cluster) -> Rest:
    return Rest(k8s_cluster)


@pytest.fixture(scope="module")
def priority_classes(k8s_cluster):
    """The four PriorityClasses the chart installs (a Job naming a missing one gets no pod),
    and GPUs on the kwok node (the liver segmentation asks for one)."""
    k8s_cluster.kubectl("patch", "node", kc.NODE_NAME, "--subresource=status", "--type=merge", "-p",
                        json.dumps({"status": {"capacity": {"nvidia.com/gpu": "8"},
                                               "allocatable": {"nvidia.com/gpu": "8"}}}))
    for prio, value in PRIORITY_VALUES.items():
        k8s_cluster.apply({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
                           "metadata": {"name": f"clara-dicom-{prio}"}, "value": value,
                           "description": f"clara-dicom e2e: {prio}"})


@pytest.fixture
def operators(k8s_cluster, k8s_namespace, tmp_path):
    def stop(op: Operator) -> None:
        op.stop()
        print(f"--- operator log (tail) ---\n{op.log()}")

    yield from stops_what_it_starts(lambda *extra: Operator(k8s_cluster, k8s_namespace, tmp_path, *extra).start(), stop)


def pipelinejob(name: str, pipeline: str, priority: str = "normal") -> dict:
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob", "metadata": {"name": name},
            "spec": {"pipeline": pipeline, "priority": priority,
                     "source": {"aeTitle": "CLARA", "processor": "by-study"},
                     "group": {"by": "Study", "value": "1.2.3.4"},
                     "payload": {"path": f"{PAYLOAD_ROOT}/payloads/{name}", "instances": 3, "bytes": 1536}}}


def pj(rest: Rest, ns: str, name: str) -> dict | None:
    return rest.get(f"{PJ_PATH.format(ns=ns)}/{name}")


def phase(rest: Rest, ns: str, name: str, want: str):
    body = pj(rest, ns, name) or {}
    return body if (body.get("status") or {}).get("phase") == want else None


def jobs(rest: Rest, ns: str) -> list[dict]:
    return rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs?labelSelector=dicom.clara.io%2Fcomponent%3Dpipeline-job"
                    )["items"]


def payload_volume(k8s_cluster, ns: str) -> None:
    """A PVC bound to a hostPath PV, as the chart's payload PVC would be."""
    pv = f"payloads-{ns}"
    k8s_cluster.apply({"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv},
                       "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"],
                                "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "e2e-manual",
                                "hostPath": {"path": f"/tmp/{pv}"},
                                "claimRef": {"namespace": ns, "name": "clara-dicom-payloads"}}})
    k8s_cluster.apply({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                       "metadata": {"name": "clara-dicom-payloads"},
                       "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "e2e-manual",
                                "volumeName": pv, "resources": {"requests": {"storage": "1Gi"}}}}, namespace=ns)


def test_liver_pipeline_waits_for_its_pipeline_then_runs(k8s_cluster, k8s_namespace, rest, operators,
                                                         priority_classes):
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    ns = k8s_namespace
    payload_volume(k8s_cluster, ns)
    operators("--no-adapter-feedback", "--results-url", "http://clara-dicom-results:8000",
              "--results-token-secret", "clara-dicom-results-token", "--fs-group", "2000",
              "--image-pull-secret", "regcred", "--node-selector", "clara.io/pipelines=true",
              "--toleration", '{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}',
              "--active-deadline-seconds", "300", "--prepare-image", "clara-dicom:e2e")
    k8s_cluster.kubectl("label", "node", kc.NODE_NAME, "clara.io/pipelines=true", "--overwrite")

    # The pipeline does not exist yet: the job waits.
    k8s_cluster.apply(pipelinejob("liver-1", "liver-tumor-example", "higher"), namespace=ns)
    waiting = wait_for(lambda: phase(rest, ns, "liver-1", "Pending"), 15, "PipelineJob Pending")
    assert waiting["status"]["reason"] == "PipelineNotFound", waiting["status"]
    assert "liver-tumor-example" in waiting["status"]["message"]
    assert jobs(rest, ns) == []

    # Applied: the job starts and kwok completes the pod.
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    done = wait_for(lambda: phase(rest, ns, "liver-1", "Succeeded"), 60, "PipelineJob Succeeded", interval=0.2)
    status = done["status"]
    assert status["jobName"] == "liver-1" and status["reason"] == "Completed"
    assert status["startTime"] and status["completionTime"] >= status["startTime"]
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Succeeded"]["status"] == "True" and conds["JobCreated"]["status"] == "True"
    assert not done["metadata"].get("finalizers")  # nothing holds a PipelineJob's deletion
    assert not [k for k in done["metadata"].get("annotations") or {} if "kopf" in k]

    # The Job as the API server stored it.
    (job,) = jobs(rest, ns)
    assert job["metadata"]["name"] == "liver-1"
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == \
        ("PipelineJob", "liver-1", done["metadata"]["uid"], True)
    assert job["spec"]["backoffLimit"] == 0 and job["spec"]["activeDeadlineSeconds"] == 300
    assert any(c["type"] == "Complete" and c["status"] == "True" for c in job["status"]["conditions"])
    pod_spec = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod_spec["initContainers"]] == ORDER
    assert [c["name"] for c in pod_spec["containers"]] == ["register-dicom-output"]
    assert pod_spec["priorityClassName"] == "clara-dicom-higher"
    assert pod_spec["securityContext"]["fsGroup"] == 2000
    assert pod_spec["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod_spec["volumes"] == [{"name": "payload", "persistentVolumeClaim": {"claimName": "clara-dicom-payloads"}}]
    by_name = {c["name"]: c for c in pod_spec["initContainers"] + pod_spec["containers"]}
    seg = by_name["liver-tumor-segmentation"]
    assert seg["image"] == "clara/ai-livertumor:0.8.1-2108.1"
    assert seg["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    mounts = {m["mountPath"]: m for m in seg["volumeMounts"]}
    assert mounts["/payload"]["subPath"] == "payloads/liver-1" and mounts["/payload"]["readOnly"]
    assert mounts["/input"]["subPath"] == "payloads/liver-1/operators/dicom-reader/output"
    assert mounts["/input"]["readOnly"]
    assert mounts["/output"]["subPath"] == "payloads/liver-1/operators/liver-tumor-segmentation/segmentation"
    assert not mounts["/output"].get("readOnly")
    writer = {m["mountPath"]: m["subPath"] for m in by_name["dicom-writer"]["volumeMounts"]}
    assert writer["/dicom"] == "payloads/liver-1/input"
    register = by_name["register-dicom-output"]
    assert register["command"][:4] == ["python", "register.py", "--agent", "ClaraSCU"]
    env = {e["name"]: e for e in register["env"]}
    assert env["CLARA_JOB_ID"]["value"] == env["NVIDIA_CLARA_JOBID"]["value"] == "liver-1"
    assert env["CLARA_PIPELINE_ID"]["value"] == env["NVIDIA_CLARA_PIPELINEID"]["value"] == "liver-tumor-example"
    assert env["CLARA_PAYLOAD_ID"]["value"] == "liver-1"
    assert env["CLARA_PAYLOAD_ROOT"]["value"] == "/payload"
    assert env["CLARA_OPERATOR"]["value"] == "register-dicom-output"
    assert env["CLARA_INPUT_PATHS"]["value"] == "/payload/operators/dicom-writer/dicom"
    assert env["CLARA_RESULTS_URL"]["value"] == "http://clara-dicom-results:8000"
    assert env["CLARA_RESULTS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "clara-dicom-results-token"
    assert "value" not in env["CLARA_RESULTS_TOKEN"]

    # The pod the Job controller made: scheduled (PVC bound, node selector), priority resolved by admission.
    (pod,) = rest.get(f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3Dliver-1")["items"]
    assert pod["spec"]["priorityClassName"] == "clara-dicom-higher"
    assert pod["spec"]["priority"] == PRIORITY_VALUES["higher"]
    assert pod["spec"]["nodeName"] == kc.NODE_NAME and pod["status"]["phase"] == "Succeeded"
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ORDER

    events = k8s_cluster.kubectl_json("get", "events", "-n", ns, "--field-selector",
                                      "involvedObject.name=liver-1,involvedObject.kind=PipelineJob")["items"]
    assert {"PipelineNotFound", "Succeeded"} <= {e["reason"] for e in events}
    table = k8s_cluster.kubectl("get", "pjob", "-n", ns).stdout
    assert "Succeeded" in table.splitlines()[1], table


def test_failing_pod_fails_the_pipelinejob_and_retention_deletes_it(k8s_cluster, k8s_namespace, rest, operators,
                                                                    priority_classes):
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    operators("--no-adapter-feedback", "--payload-host-path", "/tmp/clara-dicom-e2e-payloads",
              "--pod-annotation", f"{kc.OUTCOME_ANNOTATION}=fail", "--pod-annotation", f"{kc.EXIT_CODE_ANNOTATION}=3",
              "--job-retention-hours", "0.002")  # 7.2 s
    k8s_cluster.apply(pipelinejob("liver-bad", "liver-tumor-example", "lower"), namespace=ns)
    failed = wait_for(lambda: phase(rest, ns, "liver-bad", "Failed"), 60, "PipelineJob Failed", interval=0.1)
    status = failed["status"]
    assert status["reason"] == "OperatorFailed", status
    assert "register-dicom-output exited with code 3" in status["message"]
    assert status["failedOperator"] == "register-dicom-output" and status["jobName"] == "liver-bad"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Succeeded"] == "False"
    (job,) = jobs(rest, ns)
    assert job["spec"]["template"]["spec"]["volumes"][0]["hostPath"]["path"] == "/tmp/clara-dicom-e2e-payloads"
    assert job["spec"]["template"]["spec"]["priorityClassName"] == "clara-dicom-lower"
    events = k8s_cluster.kubectl_json("get", "events", "-n", ns, "--field-selector",
                                      "involvedObject.name=liver-bad,involvedObject.kind=PipelineJob")["items"]
    assert any(e["type"] == "Warning" and e["reason"] == "OperatorFailed" for e in events)

    # Retention: the PipelineJob goes, and its Job and pod with it (owner references).
    wait_for(lambda: pj(rest, ns, "liver-bad") is None, 30, "PipelineJob deleted after retention", interval=0.5)
    wait_for(lambda: jobs(rest, ns) == [], 60, "its Job garbage-collected", interval=0.5)


def test_operator_killed_after_creating_the_job_makes_no_duplicate(k8s_cluster, k8s_namespace, rest, operators,
                                                                   priority_classes):
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    flags = ("--no-adapter-feedback", "--payload-host-path", "/tmp/clara-dicom-e2e-payloads",
             "--pod-annotation", f"{kc.OUTCOME_ANNOTATION}=hold")
    first = operators(*flags)
    k8s_cluster.apply(pipelinejob("liver-kill", "liver-tumor-example"), namespace=ns)
    created = wait_for(lambda: jobs(rest, ns), 30, "the Job")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(5)
    (job,) = created
    # The state of a kill between Job creation and the status write: no status at all.
    path = f"{PJ_PATH.format(ns=ns)}/liver-kill/status"
    code, _ = rest.call("PATCH", path, {"status": None}, "application/merge-patch+json")
    assert code == 200
    assert not (pj(rest, ns, "liver-kill").get("status") or {}).get("jobName")
    # The pod finishes while the operator is down.
    pod = wait_for(lambda: [p["metadata"]["name"] for p in rest.get(
        f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name%3Dliver-kill")["items"]], 30, "the pod")[0]
    k8s_cluster.kubectl("annotate", "-n", ns, f"pod/{pod}", f"{kc.OUTCOME_ANNOTATION}=succeed", "--overwrite")
    k8s_cluster.kubectl("wait", "-n", ns, "--for=condition=Complete", "job/liver-kill", "--timeout=60s", timeout=90)

    second = operators(*flags)
    done = wait_for(lambda: phase(rest, ns, "liver-kill", "Succeeded"), 30, "PipelineJob Succeeded after restart")
    assert done["status"]["jobName"] == "liver-kill"
    after = jobs(rest, ns)
    assert [j["metadata"]["uid"] for j in after] == [job["metadata"]["uid"]]  # the same, only Job
    assert "created Job" not in second.log().split(second.start_marker)[-1]
