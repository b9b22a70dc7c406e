"""RegisterResults → register Jobs on a real kube-apiserver, pods played by kwok (issue 10).

The operator runs as a process; ClaraPipeline, RegisterResults and PipelineJobs are
applied directly (no adapter). kwok completes every pod as soon as it runs.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from test_operator import Rest, wait_for
from test_pipelines import LIVER, PJ_PATH, operators, phase, pipelinejob, priority_classes  # noqa: F401

pytestmark = pytest.mark.e2e

RR_PATH = "/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/registerresults"
SELECTOR = "dicom.clara.io%2Fcomponent%3Dregister-results"


@pytest.fixture
def rest(k8s_cluster) -> Rest:
    return Rest(k8s_cluster)


def register_results(name: str, pipeline: str = "liver-tumor-example", **spec) -> dict:
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "RegisterResults", "metadata": {"name": name},
            "spec": {"agent": "ClaraSCU", "pipeline": pipeline, **spec}}


def register_jobs(rest: Rest, ns: str, rr: str | None = None) -> list[dict]:
    sel = SELECTOR + (f"%2Cdicom.clara.io%2Fregisterresults%3D{rr}" if rr else "")
    return rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs?labelSelector={sel}")["items"]


def rr_status(rest: Rest, ns: str, name: str) -> dict:
    return (rest.get(f"{RR_PATH.format(ns=ns)}/{name}") or {}).get("status") or {}


def results_settled(rest: Rest, ns: str, pj_name: str) -> bool:
    """The PipelineJob's record of the RegisterResults it fires has none left Pending: each has
    its Job (Created, recorded after the create) or waits for its spec to be fixed (Waiting)."""
    status = (rest.get(f"{PJ_PATH.format(ns=ns)}/{pj_name}") or {}).get("status") or {}
    record = status.get("registerResults") or {}
    return bool(record) and all(entry.get("state") != "Pending" for entry in record.values())


def by_rr(jobs: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for job in jobs:
        out.setdefault(job["metadata"]["labels"]["dicom.clara.io/registerresults"], []).append(
            job["metadata"]["labels"]["dicom.clara.io/pipelinejob"])
    return {k: sorted(v) for k, v in out.items()}


def test_succeeded_pipelinejobs_fire_each_registerresults_once(k8s_cluster, k8s_namespace, rest, operators,
                                                                priority_classes):  # noqa: F811
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    for body in (register_results("export-pacs", data=["Orthanc", "DCM4CHEE"], inputs=["dicom-writer"]),
                 register_results("export-all"),
                 register_results("export-other", pipeline="other-pipeline"),
                 register_results("export-bad", inputs=["dicom-writer/nope"])):
        k8s_cluster.apply(body, namespace=ns)
    flags = ("--no-adapter-feedback", "--payload-host-path", "/tmp/clara-dicom-e2e-payloads",
             "--results-url", "http://clara-dicom-results:8000", "--results-token-secret", "results-token",
             "--fs-group", "2000", "--register-image", "clara-dicom:e2e-register")
    first = operators(*flags)
    ready = wait_for(lambda: (c := {x["type"]: x for x in rr_status(rest, ns, "export-pacs").get("conditions", [])})
                     .get("Ready", {}).get("status") == "True" and c, 20, "export-pacs Ready")
    assert "dicom-writer/dicom" in ready["Ready"]["message"]
    other = wait_for(lambda: rr_status(rest, ns, "export-other").get("conditions"), 20, "export-other status")
    assert (other[0]["status"], other[0]["reason"]) == ("False", "PipelineNotFound")
    bad = wait_for(lambda: rr_status(rest, ns, "export-bad").get("conditions"), 20, "export-bad status")
    assert (bad[0]["status"], bad[0]["reason"]) == ("False", "InvalidInputs") and "nope" in bad[0]["message"]

    # A PipelineJob succeeds: one Job per matching, valid RegisterResults.
    k8s_cluster.apply(pipelinejob("liver-rr-1", "liver-tumor-example", "higher"), namespace=ns)
    done = wait_for(lambda: phase(rest, ns, "liver-rr-1", "Succeeded"), 60, "liver-rr-1 Succeeded", interval=0.2)
    wait_for(lambda: results_settled(rest, ns, "liver-rr-1"), 20, "liver-rr-1: no RegisterResults pending")
    jobs = register_jobs(rest, ns)
    assert by_rr(jobs) == {"export-pacs": ["liver-rr-1"], "export-all": ["liver-rr-1"]}
    (pacs,) = register_jobs(rest, ns, "export-pacs")
    meta = pacs["metadata"]
    assert meta["name"].startswith("liver-rr-1-export-pacs-") and len(meta["name"]) <= 52
    assert meta["labels"]["dicom.clara.io/pipeline"] == "liver-tumor-example"
    owner = meta["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("PipelineJob", "liver-rr-1", done["metadata"]["uid"])
    pod = pacs["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "clara-dicom-higher" and pod["securityContext"]["fsGroup"] == 2000
    assert pod["volumes"] == [{"name": "payload", "hostPath": {"path": "/tmp/clara-dicom-e2e-payloads",
                                                               "type": "Directory"}}]
    (c,) = pod["containers"]
    assert c["image"] == "clara-dicom:e2e-register"
    assert c["command"] == ["register-results", "--agent", "ClaraSCU", "--data", '["Orthanc","DCM4CHEE"]']
    assert c["volumeMounts"] == [{"name": "payload", "mountPath": "/payload", "subPath": "payloads/liver-rr-1",
                                  "readOnly": True}]
    env = {e["name"]: e for e in c["env"]}
    assert env["CLARA_INPUT_PATHS"]["value"] == "/payload/operators/dicom-writer/dicom"
    assert env["CLARA_OPERATOR"]["value"] == "register-export-pacs"
    assert env["CLARA_JOB_ID"]["value"] == "liver-rr-1" and env["CLARA_PAYLOAD_ID"]["value"] == "liver-rr-1"
    assert env["CLARA_PIPELINE_ID"]["value"] == "liver-tumor-example"
    assert env["CLARA_PAYLOAD_ROOT"]["value"] == "/payload"
    assert env["CLARA_RESULTS_URL"]["value"] == "http://clara-dicom-results:8000"
    assert env["CLARA_RESULTS_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "results-token"
    (every,) = register_jobs(rest, ns, "export-all")
    c_all = every["spec"]["template"]["spec"]["containers"][0]
    assert c_all["command"] == ["register-results", "--agent", "ClaraSCU"]
    assert {e["name"]: e.get("value") for e in c_all["env"]}["CLARA_INPUT_PATHS"] == ":".join(
        ["/payload/operators/dicom-reader/output", "/payload/operators/liver-tumor-segmentation/segmentation",
         "/payload/operators/dicom-writer/dicom"])

    # kwok completes the register pods: counted once.
    st = wait_for(lambda: (s := rr_status(rest, ns, "export-pacs")).get("succeeded") == 1 and s, 30,
                  "export-pacs succeeded=1")
    assert (st["runs"], st["failed"], st["lastRun"]["jobName"]) == (1, 0, meta["name"])
    table = k8s_cluster.kubectl("get", "rr", "export-pacs", "-n", ns).stdout.splitlines()
    assert table[1].split()[4] == "1", table  # RUNS

    # A RegisterResults created after the PipelineJob succeeded never re-exports it.
    time.sleep(1.1)  # creation timestamps have one-second resolution
    k8s_cluster.apply(register_results("export-late"), namespace=ns)
    wait_for(lambda: rr_status(rest, ns, "export-late").get("conditions"), 20, "export-late status")

    # Killed and restarted (and the PipelineJob's status lost, as if the kill came between the
    # hook and the status write): no second Job.
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(5)
    code, _ = rest.call("PATCH", f"{PJ_PATH.format(ns=ns)}/liver-rr-1/status", {"status": None},
                        "application/merge-patch+json")
    assert code == 200
    second = operators(*flags)
    wait_for(lambda: phase(rest, ns, "liver-rr-1", "Succeeded"), 30, "liver-rr-1 Succeeded again")

    # Deleting a RegisterResults stops future runs only.
    k8s_cluster.kubectl("delete", "rr", "export-all", "-n", ns)
    k8s_cluster.apply(pipelinejob("liver-rr-2", "liver-tumor-example"), namespace=ns)
    wait_for(lambda: phase(rest, ns, "liver-rr-2", "Succeeded"), 60, "liver-rr-2 Succeeded", interval=0.2)
    wait_for(lambda: len(register_jobs(rest, ns, "export-pacs")) == 2, 20, "export-pacs run for liver-rr-2")
    wait_for(lambda: len(register_jobs(rest, ns, "export-late")) == 1, 20, "export-late run for liver-rr-2")
    wait_for(lambda: results_settled(rest, ns, "liver-rr-2"), 20, "liver-rr-2: no RegisterResults pending")
    assert by_rr(register_jobs(rest, ns)) == {"export-pacs": ["liver-rr-1", "liver-rr-2"],
                                              "export-all": ["liver-rr-1"], "export-late": ["liver-rr-2"]}
    assert {j["metadata"]["uid"] for j in register_jobs(rest, ns, "export-pacs")} >= {meta["uid"]}
    st = wait_for(lambda: (s := rr_status(rest, ns, "export-pacs")).get("succeeded") == 2 and s, 30,
                  "export-pacs succeeded=2")
    assert st["runs"] == 2 and st["failed"] == 0
    log = second.log_path.read_text(errors="replace").split(second.start_marker)[-1]
    assert "created Job liver-rr-2-" in log and "created Job liver-rr-1-" not in log, log[-3000:]
    events = k8s_cluster.kubectl_json("get", "events", "-n", ns, "--field-selector",
                                      "involvedObject.name=export-pacs,involvedObject.kind=RegisterResults")["items"]
    assert sum(1 for e in events if e["reason"] == "RunCreated") == 2, json.dumps(events)[:2000]
