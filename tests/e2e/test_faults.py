"""The operator when the API says no, or is gone, or the operator dies (issue 15):
refusals are real (a ResourceQuota, a ValidatingAdmissionPolicy, a stopped
kube-apiserver, SIGKILL), on the real control plane, pods played by kwok.

Every PipelineJob must end terminal, say why while it waits, and resume by itself
when the refusal goes away (nothing touches it); every RegisterResults runs
exactly once per succeeded PipelineJob.
"""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

import k8s_cluster as kc
from test_operator import Rest, wait_for
from test_pipelines import LIVER, jobs, operators, pipelinejob, pj, priority_classes  # noqa: F401
from test_registerresults import register_jobs, register_results

pytestmark = pytest.mark.e2e

FLAGS = ("--no-adapter-feedback", "--payload-host-path", "/tmp/clara-dicom-e2e-payloads", "--resync-seconds", "10")


@pytest.fixture
def rest(k8s_cluster) -> Rest:
    return Rest(k8s_cluster)


@pytest.fixture(autouse=True)
def kwok_only(k8s_cluster):
    if not k8s_cluster.kwok:
        pytest.skip("pod outcomes are kwok's stages")


def status(rest: Rest, ns: str, name: str) -> dict:
    return (pj(rest, ns, name) or {}).get("status") or {}


def cond(st: dict, ctype: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c.get("type") == ctype), {})


def settled(rest: Rest, ns: str, name: str) -> dict | None:
    """The status once the run succeeded and its RegisterResults ran."""
    st = status(rest, ns, name)
    ok = st.get("phase") == "Succeeded" and cond(st, "ResultsRegistered").get("status") == "True"
    return st if ok else None


def job_refusal(cluster, ns: str) -> str | None:
    """The API's answer to creating a Job in ns right now (server-side dry run), None if it would be created."""
    res = cluster.kubectl("create", "job", "probe", "-n", ns, "--image=busybox", "--dry-run=server", check=False)
    return res.stderr.strip() if res.returncode != 0 else None


def events(cluster, ns: str, name: str, kind: str = "PipelineJob") -> list[dict]:
    return cluster.kubectl_json("get", "events", "-n", ns, "--field-selector",
                                f"involvedObject.name={name},involvedObject.kind={kind}")["items"]


def quota(cluster, ns: str) -> None:
    cluster.apply({"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"},
                   "spec": {"hard": {"count/jobs.batch": "0"}}}, namespace=ns)
    wait_for(lambda: job_refusal(cluster, ns), 30, "the quota enforced", interval=0.2)


def unquota(cluster, ns: str) -> None:
    cluster.kubectl("delete", "resourcequota", "no-jobs", "-n", ns)
    wait_for(lambda: job_refusal(cluster, ns) is None, 30, "the quota gone", interval=0.2)


def one_register_job_each(rest: Rest, ns: str, names: list[str], rr: str = "export") -> None:
    by_pj: dict[str, list[dict]] = {}
    for job in register_jobs(rest, ns, rr):
        by_pj.setdefault(job["metadata"]["annotations"]["dicom.clara.io/pipelinejob"], []).append(job)
    assert sorted(by_pj) == sorted(names)
    for name, found in by_pj.items():
        assert len(found) == 1, (name, [j["metadata"]["name"] for j in found])
        record = status(rest, ns, name)["registerResults"][rr]
        assert (record["state"], record["jobName"]) == ("Created", found[0]["metadata"]["name"]), record


def test_a_quota_holds_pipeline_and_register_jobs_and_they_follow_when_it_goes(
        k8s_cluster, k8s_namespace, rest, operators, priority_classes):  # noqa: F811
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    k8s_cluster.apply(register_results("export"), namespace=ns)
    quota(k8s_cluster, ns)
    operators(*FLAGS, "--pod-annotation", f"{kc.OUTCOME_ANNOTATION}=hold")
    names = [f"quota-{i}" for i in range(3)]
    for name in names:
        k8s_cluster.apply(pipelinejob(name, "liver-tumor-example"), namespace=ns)

    # The PipelineJobs say why they wait: the API's own message, in the status and an Event.
    for name in names:
        st = wait_for(lambda: (s := status(rest, ns, name)).get("reason") == "QuotaExceeded" and s, 30,
                      f"{name} Pending/QuotaExceeded")
        assert st["phase"] == "Pending" and "exceeded quota: no-jobs" in st["message"], st
        assert cond(st, "JobCreated")["reason"] == "QuotaExceeded"
    warned = wait_for(lambda: [e for e in events(k8s_cluster, ns, names[0]) if e["reason"] == "QuotaExceeded"],
                      20, "a QuotaExceeded Event")
    assert warned[0]["type"] == "Warning" and "exceeded quota: no-jobs" in warned[0]["message"]
    assert jobs(rest, ns) == []

    # The quota goes: the Jobs follow by themselves (retries), nothing touches the PipelineJobs.
    unquota(k8s_cluster, ns)
    gone = time.monotonic()
    wait_for(lambda: len(jobs(rest, ns)) == 3, 30, "the three Jobs after the quota went", interval=0.2)
    print(f"Jobs created {time.monotonic() - gone:.1f}s after the quota went")
    for name in names:
        wait_for(lambda: status(rest, ns, name).get("reason") in ("JobCreated", "Running"), 20, f"{name} has its Job")

    # A quota again while the runs finish: the register Jobs wait, the PipelineJobs say why.
    quota(k8s_cluster, ns)
    pods = wait_for(lambda: _running_pods(rest, ns, 3), 60, "3 running pods")
    for pod in pods:
        k8s_cluster.kubectl("annotate", "-n", ns, f"pod/{pod}", f"{kc.OUTCOME_ANNOTATION}=succeed", "--overwrite")
    for name in names:
        st = wait_for(lambda: (s := status(rest, ns, name)).get("phase") == "Succeeded"
                      and cond(s, "ResultsRegistered").get("reason") == "QuotaExceeded" and s, 60,
                      f"{name} Succeeded, results waiting on the quota")
        assert cond(st, "ResultsRegistered")["status"] == "False"
        assert "exceeded quota: no-jobs" in cond(st, "ResultsRegistered")["message"]
        assert st["registerResults"]["export"]["state"] == "Pending"
    assert register_jobs(rest, ns) == []
    assert wait_for(lambda: [e for e in events(k8s_cluster, ns, names[0]) if e["reason"] == "QuotaExceeded"
                             and "ResultsRegistered" in e["message"]], 20, "a ResultsRegistered Event")
    unquota(k8s_cluster, ns)
    gone = time.monotonic()
    for name in names:
        wait_for(lambda: settled(rest, ns, name), 30, f"{name}'s results registered after the quota went")
    print(f"register Jobs created {time.monotonic() - gone:.1f}s after the quota went")
    one_register_job_each(rest, ns, names)


def _running_pods(rest: Rest, ns: str, count: int) -> list[str] | None:
    pods = rest.get(f"/api/v1/namespaces/{ns}/pods")["items"]
    running = [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"
               and p["metadata"].get("labels", {}).get("job-name")]
    return running if len(running) >= count else None


def test_an_admission_policy_denying_jobs_for_a_while(k8s_cluster, k8s_namespace, rest, operators,
                                                      priority_classes):  # noqa: F811
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    policy = f"no-jobs-{ns}"
    k8s_cluster.apply({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": policy},
        "spec": {"failurePolicy": "Fail",
                 "matchConstraints": {"resourceRules": [{"apiGroups": ["batch"], "apiVersions": ["v1"],
                                                         "operations": ["CREATE"], "resources": ["jobs"]}]},
                 "validations": [{"expression": "false", "message": "maintenance window: no new Jobs"}]}})
    binding = {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
               "metadata": {"name": policy},
               "spec": {"policyName": policy, "validationActions": ["Deny"],
                        "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}}
    try:
        k8s_cluster.apply(binding)
        wait_for(lambda: job_refusal(k8s_cluster, ns), 30, "the policy enforced", interval=0.2)
        operators(*FLAGS)
        k8s_cluster.apply(pipelinejob("denied", "liver-tumor-example"), namespace=ns)
        st = wait_for(lambda: (s := status(rest, ns, "denied")).get("reason") == "AdmissionDenied" and s, 30,
                      "Pending/AdmissionDenied")
        assert st["phase"] == "Pending" and "maintenance window: no new Jobs" in st["message"], st
        ev = wait_for(lambda: [e for e in events(k8s_cluster, ns, "denied") if e["reason"] == "AdmissionDenied"],
                      20, "an AdmissionDenied Event")
        assert ev[0]["type"] == "Warning" and "maintenance window" in ev[0]["message"]
        assert jobs(rest, ns) == []
    finally:
        k8s_cluster.kubectl("delete", "validatingadmissionpolicybinding", policy, "--ignore-not-found")
    wait_for(lambda: job_refusal(k8s_cluster, ns) is None, 30, "the policy lifted", interval=0.2)
    lifted = time.monotonic()
    wait_for(lambda: jobs(rest, ns), 30, "the Job after the policy was lifted", interval=0.2)
    print(f"Job created {time.monotonic() - lifted:.1f}s after the policy was lifted")
    wait_for(lambda: status(rest, ns, "denied").get("phase") == "Succeeded", 60, "Succeeded")
    k8s_cluster.kubectl("delete", "validatingadmissionpolicy", policy, "--ignore-not-found")


def test_the_api_server_stopped_for_20s_while_pipelinejobs_run(k8s_cluster, k8s_namespace, rest, operators,
                                                               priority_classes):  # noqa: F811
    if k8s_cluster.external:
        pytest.skip("stops the kube-apiserver this session started")
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    k8s_cluster.apply(register_results("export"), namespace=ns)
    operators(*FLAGS)
    names = [f"outage-{i}" for i in range(8)]
    for name in names[:4]:
        k8s_cluster.apply(pipelinejob(name, "liver-tumor-example"), namespace=ns)
    for name in names[4:]:  # these race the outage: created, not yet run
        assert rest.call("POST", f"/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/pipelinejobs",
                         pipelinejob(name, "liver-tumor-example"))[0] == 201
    k8s_cluster.stop_apiserver()
    stopped = time.monotonic()
    try:
        time.sleep(20)  # the fault itself: 20 s without an API server
    finally:
        k8s_cluster.start_apiserver()
    print(f"kube-apiserver down for {time.monotonic() - stopped:.1f}s")
    back = time.monotonic()
    for name in names:
        wait_for(lambda: settled(rest, ns, name), 120, f"{name} Succeeded with its results registered",
                 interval=0.5)
    print(f"all settled {time.monotonic() - back:.1f}s after the API server came back")
    assert sorted(j["metadata"]["name"] for j in jobs(rest, ns)) == sorted(names)
    one_register_job_each(rest, ns, names)


def test_the_operator_sigkilled_at_random_moments_across_30_pipelinejobs(k8s_cluster, k8s_namespace, rest,
                                                                         operators, priority_classes):  # noqa: F811
    ns = k8s_namespace
    k8s_cluster.kubectl("apply", "-n", ns, "-f", str(LIVER))
    k8s_cluster.apply(register_results("export"), namespace=ns)
    seed = int(os.environ.get("CLARA_DICOM_FAULT_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    print(f"seed {seed} (CLARA_DICOM_FAULT_SEED reproduces the kill times)")
    names = [f"kill-{i:02d}" for i in range(30)]
    errors: list[str] = []

    def arrive() -> None:  # studies keep arriving while the operator dies and comes back
        for name in names:
            code, body = rest.call("POST", f"/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/pipelinejobs",
                                   pipelinejob(name, "liver-tumor-example"))
            if code != 201:
                errors.append(f"{name}: {code} {body}")
            time.sleep(rng.uniform(0.05, 0.4))

    def progress() -> int:
        """Writes the operator made so far: Jobs of both kinds, and PipelineJob phases."""
        made = rest.get(f"/apis/batch/v1/namespaces/{ns}/jobs")["items"]
        pjs = rest.get(f"/apis/dicom.clara.io/v1alpha1/namespaces/{ns}/pipelinejobs")["items"]
        return len(made) + sum(1 + ((p.get("status") or {}).get("phase") == "Succeeded") for p in pjs
                               if (p.get("status") or {}).get("phase"))

    arrivals = threading.Thread(target=arrive, daemon=True)
    arrivals.start()
    kills, busy = 0, 0
    op = operators(*FLAGS)
    deadline = time.monotonic() + 150
    while (arrivals.is_alive() or kills < 8) and time.monotonic() < deadline:
        # A random moment of its work: once it has been seen working, up to 1.5 s later.
        before = progress()
        try:
            wait_for(lambda: progress() > before, 20, "the operator making progress", interval=0.1)
            busy += 1
        except AssertionError:
            pass  # nothing left to do right now: kill it idle
        time.sleep(rng.uniform(0, 1.5))
        os.killpg(op.proc.pid, signal.SIGKILL)
        op.proc.wait(5)
        kills += 1
        op = operators(*FLAGS)
    arrivals.join(30)
    assert not errors, errors
    print(f"{kills} kills, {busy} of them while it was seen working")
    assert busy >= 3
    for name in names:
        wait_for(lambda: settled(rest, ns, name), 120, f"{name} Succeeded with its results registered",
                 interval=0.5)
    assert sorted(j["metadata"]["name"] for j in jobs(rest, ns)) == names  # one pipeline Job each
    one_register_job_each(rest, ns, names)
    # No register Job was created twice (a second create would be AlreadyExists, never logged as created).
    logs = "".join(p.read_text(errors="replace") for p in op.log_path.parent.glob("operator-*.log"))
    for job in register_jobs(rest, ns, "export"):
        assert logs.count(f"created Job {job['metadata']['name']} ") <= 1
