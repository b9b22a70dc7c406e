"""PipelineJob + ClaraPipeline + runner settings → batch Job, and Job → status (no cluster)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from clara_dicom.cli import build_parser
from clara_operator import jobspec
from clara_operator.cli import runner_settings
from clara_operator.jobspec import JobSpecError, RunnerSettings, build_job, job_name, job_status, select_pipeline

LIVER = Path(__file__).resolve().parents[1] / "fixtures" / "liver-tumor-pipeline.yaml"
ORDER = ["dicom-reader", "liver-tumor-segmentation", "dicom-writer", "register-mhd-output", "register-dicom-output"]


def liver_body() -> dict:
    body = yaml.safe_load(LIVER.read_text())
    body["metadata"].update(namespace="imaging", creationTimestamp="2024-01-01T00:00:00Z")
    return body


def pjob(name="ct-liver-0123456789", pipeline="liver-tumor-example", priority="higher",
         path="/var/lib/clara-dicom/payloads/ct-liver-0123456789") -> dict:
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob",
            "metadata": {"name": name, "namespace": "imaging", "uid": "uid-1", "generation": 1,
                         "annotations": {"dicom.clara.io/clara-job-name": "CT-liver-20240101120000"}},
            "spec": {"pipeline": pipeline, "priority": priority,
                     "source": {"aeTitle": "CT", "processor": "by-study"},
                     "group": {"by": "Study", "value": "1.2.3"},
                     "payload": {"path": path, "instances": 3, "bytes": 10}}}


SETTINGS = RunnerSettings(
    results_url="http://clara-dicom-results:8000", results_token_secret="results-token",
    image_pull_secrets=["regcred"], tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists",
                                                   "effect": "NoSchedule"}],
    node_selector={"gpu": "true"}, fs_group=2000, run_as_non_root=True, active_deadline_seconds=900,
    prepare_image="registry.local/clara-dicom:1.0")


def liver_job(settings: RunnerSettings = SETTINGS, **kw) -> dict:
    definition, reason, _ = select_pipeline([liver_body()], "liver-tumor-example")
    assert reason == "PipelineFound"
    return build_job(pjob(**kw), definition, settings)


def containers(job: dict) -> dict[str, dict]:
    pod = job["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["initContainers"] + pod["containers"]}


def env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def mounts(container: dict) -> dict[str, tuple[str, bool]]:
    return {m["mountPath"]: (m["subPath"], bool(m.get("readOnly"))) for m in container["volumeMounts"]}


# --------------------------------------------------------------------------- the Job


def test_liver_operators_run_in_dependency_order_in_one_pod():
    job = liver_job()
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["prepare-payload"] + ORDER[:-1]
    assert [c["name"] for c in pod["containers"]] == ORDER[-1:]
    assert pod["restartPolicy"] == "Never"
    by = containers(job)
    assert by["dicom-reader"]["image"] == "clara/dicom-reader:0.8.1-2108.1"
    assert "command" not in by["dicom-reader"]  # the image's own entry point
    assert by["register-dicom-output"]["command"] == [
        "python", "register.py", "--agent", "ClaraSCU", "--data", '["Orthanc","DCM4CHEE","ImageViewer1"]']


def test_job_metadata_is_deterministic_and_owned():
    job = liver_job()
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    meta = job["metadata"]
    assert meta["name"] == "ct-liver-0123456789" and meta["namespace"] == "imaging"
    assert meta["ownerReferences"] == [{"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob",
                                        "name": "ct-liver-0123456789", "uid": "uid-1", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert meta["labels"]["dicom.clara.io/component"] == "pipeline-job"
    assert meta["labels"]["dicom.clara.io/pipeline"] == "liver-tumor-example"
    assert job["spec"]["template"]["metadata"]["labels"] == {**meta["labels"],
                                                             "app.kubernetes.io/component": "pipeline"}
    assert "1.2.3" not in json.dumps(job)  # the group value (patient data) is never copied
    assert liver_job() == job


def test_job_names():
    assert job_name("short") == "short"
    long = "a" * 60
    assert len(job_name(long)) <= 52 and job_name(long) == job_name(long) != job_name("a" * 61)


def test_job_spec_settings():
    job = liver_job()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] == 900
    # A preempted or evicted pod is not a failed run: the Job starts another.
    assert spec["podFailurePolicy"] == {"rules": [{"action": "Ignore",
                                                   "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    assert pod["priorityClassName"] == "clara-dicom-higher"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["nodeSelector"] == {"gpu": "true"}
    assert pod["securityContext"] == {"fsGroup": 2000, "fsGroupChangePolicy": "OnRootMismatch",
                                      "runAsNonRoot": True}
    assert pod["automountServiceAccountToken"] is False
    assert pod["volumes"] == [{"name": "payload", "persistentVolumeClaim": {"claimName": "clara-dicom-payloads"}}]
    default = liver_job(RunnerSettings(), priority="lower")["spec"]
    assert default["activeDeadlineSeconds"] == 600
    assert default["template"]["spec"]["priorityClassName"] == "clara-dicom-lower"
    assert "securityContext" not in default["template"]["spec"]
    host = liver_job(RunnerSettings(payload_host_path="/srv/clara"))["spec"]["template"]["spec"]["volumes"]
    assert host == [{"name": "payload", "hostPath": {"path": "/srv/clara", "type": "Directory"}}]


def test_gpu_memory_cpu_requests():
    by = containers(liver_job())
    assert by["liver-tumor-segmentation"]["resources"] == {"requests": {"memory": "8192Mi"},
                                                          "limits": {"nvidia.com/gpu": "1"}}
    assert "resources" not in by["dicom-reader"]
    body = liver_body()
    body["spec"]["definition"]["operators"][0]["requests"] = {"gpu": 2, "memory": "4Gi", "cpu": 1.5}
    definition, _, _ = select_pipeline([body], "liver-tumor-example")
    reader = containers(build_job(pjob(), definition, RunnerSettings()))["dicom-reader"]
    assert reader["resources"] == {"requests": {"memory": "4Gi", "cpu": "1.5"}, "limits": {"nvidia.com/gpu": "2"}}


def test_mounts_payload_read_only_inputs_from_what_they_name_outputs_read_write():
    by = containers(liver_job())
    p = "payloads/ct-liver-0123456789"
    assert mounts(by["dicom-reader"]) == {
        "/payload": (p, True), "/input": (f"{p}/input", True),
        "/output": (f"{p}/operators/dicom-reader/output", False)}
    assert mounts(by["liver-tumor-segmentation"]) == {
        "/payload": (p, True), "/input": (f"{p}/operators/dicom-reader/output", True),
        "/output": (f"{p}/operators/liver-tumor-segmentation/segmentation", False)}
    assert mounts(by["dicom-writer"]) == {
        "/payload": (p, True), "/input": (f"{p}/operators/liver-tumor-segmentation/segmentation", True),
        "/dicom": (f"{p}/input", True), "/output": (f"{p}/operators/dicom-writer/dicom", False)}
    for name in ("register-mhd-output", "register-dicom-output"):
        assert mounts(by[name]) == {"/payload": (p, True), "/input": (f"{p}/operators/dicom-writer/dicom", True)}
    prepare = by["prepare-payload"]
    assert prepare["image"] == "registry.local/clara-dicom:1.0"
    assert prepare["command"][:2] == ["python", "-c"]
    assert prepare["command"][3:] == ["/payload/operators/dicom-reader/output",
                                      "/payload/operators/liver-tumor-segmentation/segmentation",
                                      "/payload/operators/dicom-writer/dicom"]
    assert mounts(prepare) == {"/payload": (p, False)}


def test_environment():
    by = containers(liver_job())
    e = env(by["dicom-writer"])
    assert e["CLARA_JOB_ID"] == e["NVIDIA_CLARA_JOBID"] == "ct-liver-0123456789"
    assert e["CLARA_PIPELINE_ID"] == e["NVIDIA_CLARA_PIPELINEID"] == "liver-tumor-example"
    assert e["CLARA_PAYLOAD_ID"] == e["NVIDIA_CLARA_PAYLOADID"] == "ct-liver-0123456789"
    assert e["CLARA_PAYLOAD_ROOT"] == "/payload"
    assert e["CLARA_OPERATOR"] == "dicom-writer"
    assert e["CLARA_INPUT_PATHS"] == "/payload/operators/liver-tumor-segmentation/segmentation:/payload/input"
    assert e["NVIDIA_CLARA_INPUTPATHS"] == "segmentation:/input;:/dicom"
    assert e["NVIDIA_CLARA_OUTPUTPATHS"] == "dicom:/output"
    assert e["NVIDIA_CLARA_JOBNAME"] == "CT-liver-20240101120000"
    assert e["CLARA_RESULTS_URL"] == "http://clara-dicom-results:8000"
    assert e["CLARA_RESULTS_TOKEN"] == {"secretKeyRef": {"name": "results-token", "key": "token", "optional": True}}
    assert env(by["dicom-reader"])["NVIDIA_CLARA_OUTPUTPATHS"] == "output:/output"
    bare = env(containers(liver_job(RunnerSettings()))["dicom-writer"])
    assert "CLARA_RESULTS_URL" not in bare and "CLARA_RESULTS_TOKEN" not in bare


def test_register_results_in_the_pod_registers_payload_relative_uris(tmp_path):
    """What register-results sees in the pod: CLARA_INPUT_PATHS under CLARA_PAYLOAD_ROOT."""
    from clara_results.register import scan

    e = env(containers(liver_job())["register-dicom-output"])
    payload = tmp_path / "payload"  # plays /payload
    out = payload / "operators" / "dicom-writer" / "dicom"
    out.mkdir(parents=True)
    (out / "1.dcm").write_bytes(b"x")
    inputs = [str(payload / p.removeprefix("/payload/")) for p in e["CLARA_INPUT_PATHS"].split(":")]
    assert scan(inputs, str(payload)) == ["operators/dicom-writer/dicom/1.dcm"]


def test_unnamed_input_from_an_operator_with_several_outputs_mounts_them_all():
    definition = jobspec.ClaraPipelineSpec.model_validate({"definition": {"operators": [
        {"name": "a", "container": {"image": "a"}, "input": [{"path": "/in"}],
         "output": [{"name": "x", "path": "/x"}, {"name": "y", "path": "/y"}]},
        {"name": "b", "container": {"image": "b", "tag": "2"}, "input": [{"from": "a", "path": "/in"}]},
    ]}}).definition
    job = build_job(pjob(), definition, RunnerSettings())
    b = containers(job)["b"]
    assert b["image"] == "b:2"
    assert mounts(b)["/in"] == ("payloads/ct-liver-0123456789/operators/a", True)
    assert [c["name"] for c in job["spec"]["template"]["spec"]["containers"]] == ["b"]


@pytest.mark.parametrize("path, reason", [
    ("/elsewhere/payloads/x", "InvalidPayload"), ("/var/lib/clara-dicom", "InvalidPayload"),
    ("/var/lib/clara-dicom/../x", "InvalidPayload"), ("relative/x", "InvalidPayload"),
])
def test_payload_outside_the_volume_is_refused(path, reason):
    with pytest.raises(JobSpecError) as err:
        liver_job(path=path)
    assert err.value.reason == reason


def test_paths_overlapping_the_payload_root_are_refused():
    body = liver_body()
    body["spec"]["definition"]["operators"][0]["output"][0]["path"] = "/payload/out"
    definition, _, _ = select_pipeline([body], "liver-tumor-example")
    with pytest.raises(JobSpecError, match="overlaps /payload") as err:
        build_job(pjob(), definition, RunnerSettings())
    assert err.value.reason == "InvalidPipeline"


def test_the_prepare_container_never_takes_an_operator_name():
    definition = jobspec.ClaraPipelineSpec.model_validate({"definition": {"operators": [
        {"name": "prepare-payload", "container": {"image": "a"}, "input": [{"path": "/in"}]}]}}).definition
    names = [c["name"] for c in build_job(pjob(), definition, RunnerSettings())["spec"]["template"]["spec"][
        "initContainers"]]
    assert names == ["clara-prepare-payload"]


# --------------------------------------------------------------------------- pipelines


def test_select_pipeline():
    assert select_pipeline([], "liver")[:2] == (None, "PipelineNotFound", )[:2]
    body = liver_body()
    assert select_pipeline([body], "other")[1] == "PipelineNotFound"
    by_id = copy.deepcopy(body)
    by_id["metadata"]["name"] = "renamed"
    by_id["spec"]["pipelineId"] = "liver-tumor-example"
    assert select_pipeline([by_id], "liver-tumor-example")[1] == "PipelineFound"
    # Invalid (a cycle): waits, with the reason.
    broken = copy.deepcopy(body)
    broken["spec"]["definition"]["operators"][0]["input"] = [{"from": "dicom-writer", "name": "dicom",
                                                              "path": "/input"}]
    definition, reason, message = select_pipeline([broken], "liver-tumor-example")
    assert definition is None and reason == "PipelineInvalid" and "cycle" in message
    # ... unless it has a last valid version.
    broken["metadata"]["annotations"] = {"dicom.clara.io/last-valid-spec": json.dumps(
        {"generation": 1, "spec": body["spec"]})}
    definition, reason, _ = select_pipeline([broken], "liver-tumor-example")
    assert reason == "PipelineFound" and len(definition.operators) == 5
    # Two claim the ID: the earlier one holds it.
    later = copy.deepcopy(by_id)
    later["metadata"]["creationTimestamp"] = "2025-01-01T00:00:00Z"
    later["spec"]["definition"]["operators"] = later["spec"]["definition"]["operators"][:1]
    definition, _, message = select_pipeline([later, body], "liver-tumor-example")
    assert len(definition.operators) == 5 and message == "ClaraPipeline liver-tumor-example"


# --------------------------------------------------------------------------- status


def job(status: dict) -> dict:
    return {"metadata": {"name": "j", "ownerReferences": [
        {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob", "name": "p", "uid": "u"}]},
        "status": status}


def test_job_status():
    assert job_status(job({}))["phase"] == "Pending" and job_status(job({}))["reason"] == "JobCreated"
    running = job_status(job({"active": 1, "startTime": "2024-01-01T00:00:00+00:00"}))
    assert (running["phase"], running["startTime"], running["jobName"]) == ("Running", "2024-01-01T00:00:00Z", "j")
    done = job_status(job({"startTime": "2024-01-01T00:00:00Z", "completionTime": "2024-01-01T00:01:00Z",
                           "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}))
    assert (done["phase"], done["reason"], done["completionTime"]) == ("Succeeded", "Completed",
                                                                       "2024-01-01T00:01:00Z")
    failed_cond = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                   "message": "Job has reached the specified backoff limit", "lastTransitionTime": "2024-01-01T00:02:00Z"}
    plain = job_status(job({"failed": 1, "conditions": [failed_cond]}))
    assert (plain["phase"], plain["reason"]) == ("Failed", "BackoffLimitExceeded")
    pod = {"status": {"initContainerStatuses": [{"name": "dicom-reader", "state": {"terminated": {"exitCode": 0}}},
                                                {"name": "dicom-writer", "state": {"terminated": {
                                                    "exitCode": 3, "reason": "Error", "message": "no series"}}}]}}
    culprit = job_status(job({"failed": 1, "conditions": [failed_cond]}), [pod])
    assert culprit["reason"] == "OperatorFailed" and culprit["failedOperator"] == "dicom-writer"
    assert culprit["message"].startswith("operator dicom-writer exited with code 3 (Error: no series)")
    assert culprit["completionTime"] == "2024-01-01T00:02:00Z"
    deadline = dict(failed_cond, reason="DeadlineExceeded", message="Job was active longer than specified deadline")
    assert job_status(job({"failed": 1, "conditions": [deadline]}), [pod])["reason"] == "DeadlineExceeded"


# --------------------------------------------------------------------------- CLI


def test_runner_flags():
    args = build_parser().parse_args([
        "operator", "-n", "x", "--payload-pvc", "pvc", "--payload-root", "/data", "--results-url", "http://r",
        "--results-token-secret", "tok", "--results-token-key", "t", "--image-pull-secret", "a",
        "--image-pull-secret", "b", "--toleration", '{"key": "k", "operator": "Exists"}', "--node-selector", "a=b",
        "--pod-annotation", "sidecar.istio.io/inject=false", "--fs-group", "3", "--run-as-user", "4",
        "--run-as-non-root", "--active-deadline-seconds", "60", "--job-retention-hours", "2",
        "--prepare-image", "img"])
    s = runner_settings(args)
    assert (s.payload_pvc, s.payload_root, s.results_url, s.results_token_secret, s.results_token_key) == (
        "pvc", "/data", "http://r", "tok", "t")
    assert s.image_pull_secrets == ["a", "b"] and s.tolerations == [{"key": "k", "operator": "Exists"}]
    assert s.node_selector == {"a": "b"} and s.pod_annotations == {"sidecar.istio.io/inject": "false"}
    assert (s.fs_group, s.run_as_user, s.run_as_non_root, s.active_deadline_seconds, s.retention_hours) == (
        3, 4, True, 60, 2.0)
    assert s.prepare_image == "img"
    defaults = runner_settings(build_parser().parse_args(["operator"]))
    assert (defaults.payload_pvc, defaults.payload_root, defaults.active_deadline_seconds) == (
        "clara-dicom-payloads", "/var/lib/clara-dicom", 600)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operator", "--toleration", "[1]"])
