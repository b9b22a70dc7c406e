"""RegisterResults → register Job, firing rule, inputs, status counters (no cluster)."""
from __future__ import annotations

import datetime as dt
import json

import pytest
from test_jobspec import SETTINGS, liver_body, liver_job, pjob

from clara_dicom.cli import build_parser
from clara_operator import registerjob as rj
from clara_operator.cli import runner_settings
from clara_operator.jobspec import JobSpecError, select_pipeline

SUB = "payloads/ct-liver-0123456789"
ALL = [("dicom-reader", "output"), ("liver-tumor-segmentation", "segmentation"), ("dicom-writer", "dicom")]


def rr(name="export-pacs", pipeline="liver-tumor-example", created="2024-01-01T00:00:00Z", **spec) -> dict:
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "RegisterResults",
            "metadata": {"name": name, "namespace": "imaging", "uid": f"uid-{name}", "generation": 1,
                         "creationTimestamp": created},
            "spec": {"agent": "ClaraSCU", "pipeline": pipeline, **spec}}


def definition():
    return select_pipeline([liver_body()], "liver-tumor-example")[0]


def test_outputs_of_a_run_and_of_the_definition_agree():
    assert rj.run_outputs(liver_job(), SUB) == ALL
    assert rj.definition_outputs(definition()) == ALL


def test_select_inputs():
    assert rj.select_inputs([], ALL) == ALL
    assert rj.select_inputs(["dicom-writer"], ALL) == [("dicom-writer", "dicom")]
    assert rj.select_inputs(["liver-tumor-segmentation/segmentation", "dicom-writer", "dicom-writer/dicom"],
                            ALL) == [("liver-tumor-segmentation", "segmentation"), ("dicom-writer", "dicom")]
    with pytest.raises(JobSpecError) as err:
        rj.select_inputs(["dicom-writer/mhd", "nope"], ALL)
    assert err.value.reason == "InvalidInputs"
    assert "operator dicom-writer has no output mhd" in err.value.message and "no operator nope" in err.value.message
    with pytest.raises(JobSpecError):
        rj.select_inputs([], [])


def test_fires_only_for_its_pipeline_and_after_it_exists():
    job = pjob()
    assert rj.fires(rr(created="2024-01-01T00:00:00Z"), job, "2024-01-01T00:00:05Z")
    assert rj.fires(rr(created="2024-01-01T00:00:05Z"), job, "2024-01-01T00:00:05Z")  # same second: existed
    assert not rj.fires(rr(created="2024-01-01T00:00:06Z"), job, "2024-01-01T00:00:05Z")  # history
    assert not rj.fires(rr(pipeline="other"), job, "2024-01-01T00:00:05Z")
    assert not rj.fires(rr(), job, None)
    gone = rr()
    gone["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:01Z"
    assert not rj.fires(gone, job, "2024-01-01T00:00:05Z")
    done = {"status": {"completionTime": "2024-01-01T00:00:05Z"}}
    assert rj.succeeded_at(done) == "2024-01-01T00:00:05Z"


def test_register_job_names_are_deterministic_distinct_and_short():
    a = rj.register_job_name("ct-liver-1", "export-pacs")
    assert a == rj.register_job_name("ct-liver-1", "export-pacs") and a.startswith("ct-liver-1-export-pacs-")
    assert rj.register_job_name("a-b", "c") != rj.register_job_name("a", "b-c")
    long = rj.register_job_name("x" * 52, "y" * 200)
    assert len(long) <= 52 and long[-9] == "-"


def test_the_register_job():
    body = rr(data=["Orthanc", {"dest": "PACS"}], inputs=["dicom-writer"])
    job = rj.build_register_job(body, pjob(), [("dicom-writer", "dicom")], SETTINGS)
    meta = job["metadata"]
    assert meta["name"] == rj.register_job_name("ct-liver-0123456789", "export-pacs")
    assert meta["labels"]["dicom.clara.io/component"] == "register-results"
    assert meta["labels"]["dicom.clara.io/registerresults"] == "export-pacs"
    assert meta["labels"]["dicom.clara.io/pipelinejob"] == "ct-liver-0123456789"
    assert meta["ownerReferences"] == [{"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob",
                                        "name": "ct-liver-0123456789", "uid": "uid-1", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert job["spec"]["backoffLimit"] == rj.BACKOFF_LIMIT
    pod = job["spec"]["template"]["spec"]
    assert "initContainers" not in pod and pod["restartPolicy"] == "Never"
    assert pod["priorityClassName"] == "clara-dicom-higher"
    assert pod["securityContext"]["fsGroup"] == 2000 and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["volumes"] == [{"name": "payload", "persistentVolumeClaim": {"claimName": "clara-dicom-payloads"}}]
    (c,) = pod["containers"]
    assert c["image"] == "registry.local/clara-dicom:1.0"  # --register-image defaults to --prepare-image
    assert c["command"] == ["register-results", "--agent", "ClaraSCU", "--data", '["Orthanc",{"dest":"PACS"}]']
    assert json.loads(c["command"][4]) == ["Orthanc", {"dest": "PACS"}]
    assert c["volumeMounts"] == [{"name": "payload", "mountPath": "/payload", "subPath": SUB, "readOnly": True}]
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}
    assert env["CLARA_JOB_ID"] == "ct-liver-0123456789" and env["CLARA_PIPELINE_ID"] == "liver-tumor-example"
    assert env["CLARA_PAYLOAD_ID"] == "ct-liver-0123456789" and env["CLARA_PAYLOAD_ROOT"] == "/payload"
    assert env["CLARA_OPERATOR"] == "register-export-pacs"
    assert env["CLARA_INPUT_PATHS"] == "/payload/operators/dicom-writer/dicom"
    assert env["CLARA_RESULTS_URL"] == "http://clara-dicom-results:8000"
    assert env["CLARA_RESULTS_TOKEN"] == {"secretKeyRef": {"name": "results-token", "key": "token",
                                                           "optional": True}}
    no_data = rj.build_register_job(rr(), pjob(), ALL, SETTINGS)["spec"]["template"]["spec"]["containers"][0]
    assert no_data["command"] == ["register-results", "--agent", "ClaraSCU"]


def test_register_image_flag():
    args = build_parser().parse_args(["operator", "--prepare-image", "p:1", "--register-image", "r:2"])
    assert runner_settings(args).register_image == "r:2"
    job = rj.build_register_job(rr(), pjob(), ALL, runner_settings(args))
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "r:2"


def test_ready_condition():
    d = definition()
    assert rj.ready_condition(None, "liver-tumor-example", d, "PipelineFound", "", ["dicom-writer"])[:2] == \
        (True, "Ready")
    status, reason, msg = rj.ready_condition(None, "liver-tumor-example", d, "PipelineFound", "", ["nope/x"])
    assert (status, reason) == (False, "InvalidInputs") and "nope" in msg
    assert rj.ready_condition(None, "p", None, "PipelineNotFound", "", [])[:2] == (False, "PipelineNotFound")


def _job(name, created, outcome=None):
    conds = [] if outcome is None else [{"type": outcome, "status": "True"}]
    return {"metadata": {"name": name, "creationTimestamp": created,
                         "annotations": {rj.ANNOTATION_PIPELINEJOB: f"pj-{name}"}},
            "status": {"conditions": conds}}


def test_counts_are_recomputed_and_stay_monotonic_when_jobs_vanish():
    now = dt.datetime(2024, 1, 1, 0, 1, tzinfo=dt.timezone.utc)
    jobs = [_job("a", "2024-01-01T00:00:00Z", "Complete"), _job("b", "2024-01-01T00:00:10Z", "Failed"),
            _job("c", "2024-01-01T00:00:20Z"), _job("d", "2024-01-01T00:00:30Z", "Complete")]
    first = rj.count_runs({}, jobs, now)
    assert (first["runs"], first["succeeded"], first["failed"], first["active"]) == (4, 2, 1, 1)
    assert first["folded"] == {"runs": 2, "succeeded": 1, "failed": 1, "until": "2024-01-01T00:00:10Z|b"}
    assert first["lastRun"]["jobName"] == "d" and first["lastRun"]["outcome"] == "Succeeded"
    assert rj.count_runs(first, jobs, now) == first  # the same events again: the same counts
    # a and b go with their PipelineJobs (retention); c finishes; e is new.
    later = [jobs[2], jobs[3], _job("e", "2024-01-01T00:00:59Z", "Complete")]
    later[0] = _job("c", "2024-01-01T00:00:20Z", "Complete")
    second = rj.count_runs(first, later, now)
    assert (second["runs"], second["succeeded"], second["failed"], second["active"]) == (5, 4, 1, 0)
    assert second["folded"]["until"] == "2024-01-01T00:00:30Z|d"  # e is too recent to fold
    assert rj.count_runs(second, [], now)["runs"] == 4  # e vanished unfolded: the one loss, documented


