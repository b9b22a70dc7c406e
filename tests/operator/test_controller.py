"""The PipelineJob / RegisterResults controller's logic without a cluster: the work
queue's schedule on a controlled clock, how refusals read, and the runner against an
in-memory API whose creates can be refused (the real-API versions of these are
tests/e2e/test_faults.py)."""
from __future__ import annotations

import asyncio
import copy
import json

import pytest
from test_jobspec import SETTINGS, liver_body, pjob
from test_registerjob import rr

from clara_operator.controller import is_settled
from clara_operator.kube import refusal
from clara_operator.pipelinejobs import Runner, needs_reconcile, results_condition
from clara_operator.registerresults import Registrar
from clara_operator.workqueue import Backoff, Retry, Schedule


# --------------------------------------------------------------------------- the schedule


def test_backoff_doubles_up_to_its_cap():
    b = Backoff(base=1, factor=2, cap=15)
    assert [b.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 15, 15]


def test_schedule_dedups_orders_and_pulls_a_key_earlier():
    s = Schedule()
    s.add("a", now=0, delay=5)
    s.add("b", now=0, delay=1)
    s.add("a", now=0, delay=9)  # later than queued: no change
    assert len(s) == 2 and s.pop(0.5) is None
    assert s.pop(1) == "b" and s.pop(1) is None
    s.add("a", now=2, delay=0)  # an event while it waits: due now
    assert s.pop(2) == "a" and s.next_due() is None


def test_failures_back_off_and_success_forgets_them():
    s = Schedule(Backoff(base=1, factor=2, cap=4))
    s.add("k", 0)
    t = 0.0
    delays = []
    for _ in range(4):
        assert s.pop(t) == "k"
        delays.append(s.done("k", t, failed=True))
        assert s.pop(t + delays[-1] - 0.01) is None
        t += delays[-1]
    assert delays == [1, 2, 4, 4]
    assert s.pop(t) == "k"
    assert s.done("k", t, failed=False) is None and "k" not in s.failures
    assert s.next_due() is None  # converged: nothing scheduled
    s.add("k", t)
    assert s.pop(t) == "k" and s.done("k", t, failed=True, delay=0.5) == 0.5  # Retry(delay=…) wins
    assert s.failures["k"] == 1


def test_a_key_added_while_it_runs_runs_once_more_and_never_twice_at_once():
    s = Schedule()
    s.add("k", 0)
    assert s.pop(0) == "k"
    s.add("k", 0.1)
    s.add("k", 0.2)
    assert s.pop(0.3) is None  # still running
    s.done("k", 0.4, failed=False)
    assert s.pop(0.4) == "k" and s.pop(0.4) is None


def test_first_lane_keys_go_before_ordinary_keys_due_earlier():
    s = Schedule()
    s.add("running-1", now=0)
    s.add("running-2", now=0)
    s.add("new-1", now=1, first=True)
    s.add("later", now=1, delay=5, first=True)  # first, but not due yet
    assert s.pop(1) == "new-1"
    assert s.pop(1) == "running-1" and s.pop(1) == "running-2" and s.pop(1) is None
    s.add("k", now=2)
    s.add("k", now=2, delay=3, first=True)  # moves to the first lane, keeps its earlier due time
    s.add("o", now=1.5)
    assert s.pop(2) == "k" and s.pop(2) == "o" and len(s) == 1
    s.add("k", now=2, first=True)  # while it runs: runs once more afterwards, still first
    s.add("p", now=2)
    s.done("k", 2, failed=False)
    assert s.pop(2) == "k" and s.pop(2) == "p"
    assert s.next_due() == 6 and s.pop(6) == "later" and s.next_due() is None


def test_the_queue_hands_a_key_to_a_worker_only_when_one_is_free_so_new_pipelinejobs_go_first():
    """During a burst the workers are busy when status updates and new PipelineJobs become due;
    whatever became due first, a free worker takes the first lane's keys first. (Before, the
    dispatcher moved every due key into a FIFO at once, so the lanes ordered nothing.)"""
    from clara_operator.workqueue import WorkQueue

    now = [0.0]  # a controllable clock: nothing here waits on time
    ran: list[str] = []

    async def scenario():
        release = asyncio.Event()

        async def reconcile(key):
            ran.append(key)
            if key == "busy":
                await release.wait()

        queue = WorkQueue(reconcile, workers=1, clock=lambda: now[0])
        queue.start()
        queue.add("busy")
        while ran != ["busy"]:
            await asyncio.sleep(0)
        queue.add("status-1")
        queue.add("status-2")
        for _ in range(5):
            await asyncio.sleep(0)  # let the dispatcher see them: it must not take them yet
        queue.add("new-1", first=True)
        queue.add("new-2", first=True)
        release.set()
        while len(ran) < 5:
            await asyncio.sleep(0)
        await queue.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert ran == ["busy", "new-1", "new-2", "status-1", "status-2"]


def test_while_creates_are_pending_status_writes_get_a_share_of_the_workers_only():
    """During a burst new PipelineJobs find a free worker at once: the status writes of running
    ones (ordinary keys) may hold only the controller's share of the workers while first-lane
    keys wait or run, and all of them again once the creates are done."""
    from clara_operator.controller import ORDINARY_SHARE_WHILE_CREATING
    from clara_operator.workqueue import WorkQueue

    now = [0.0]
    running: set[str] = set()
    finish = {k: asyncio.Event() for k in ("create-1", "create-2", "s1", "s2", "s3", "s4")}

    async def scenario():
        async def reconcile(key):
            running.add(key)
            await finish[key].wait()
            running.discard(key)

        async def settle():
            for _ in range(20):
                await asyncio.sleep(0)

        queue = WorkQueue(reconcile, workers=8, clock=lambda: now[0], ordinary_share=ORDINARY_SHARE_WHILE_CREATING)
        queue.start()
        queue.add("create-1", first=True)
        for k in ("s1", "s2", "s3", "s4"):
            queue.add(k)
        await settle()
        assert running == {"create-1", "s1", "s2"}  # 8 workers x 0.25: two status writes at once
        queue.add("create-2", first=True)
        await settle()
        assert running == {"create-1", "create-2", "s1", "s2"}  # a free worker took it at once
        finish["s1"].set()
        await settle()
        assert running == {"create-1", "create-2", "s2", "s3"}  # bounded, never stopped
        finish["create-1"].set()
        finish["create-2"].set()
        await settle()
        assert running == {"s2", "s3", "s4"}  # no creates pending: every worker again
        for event in finish.values():
            event.set()
        await settle()
        await queue.stop()

    asyncio.run(asyncio.wait_for(scenario(), 10))


# --------------------------------------------------------------------------- refusals


class ApiError(Exception):
    def __init__(self, status, message="", reason=""):
        super().__init__(f"({status}) {reason}")
        self.status, self.reason = status, reason
        self.body = json.dumps({"kind": "Status", "message": message}) if message else ""


def test_refusals_read_as_reasons_with_the_api_message():
    quota = ApiError(403, 'jobs.batch "x" is forbidden: exceeded quota: no-jobs, requested: count/jobs.batch=1, '
                          'used: count/jobs.batch=0, limited: count/jobs.batch=0', "Forbidden")
    assert refusal(quota) == ("QuotaExceeded", json.loads(quota.body)["message"])
    vap = ApiError(422, 'jobs.batch "x" is forbidden: ValidatingAdmissionPolicy \'no-jobs\' with binding '
                        '\'no-jobs\' denied request: maintenance', "Unprocessable Entity")
    assert refusal(vap)[0] == "AdmissionDenied" and "maintenance" in refusal(vap)[1]
    assert refusal(ApiError(503, reason="Service Unavailable")) == ("APIUnavailable", "503 Service Unavailable")
    assert refusal(ConnectionRefusedError("Connect call failed ('127.0.0.1', 6443)"))[0] == "APIUnavailable"
    assert refusal(ApiError(400, "bad field", "Bad Request")) == ("JobRefused", "bad field")


# --------------------------------------------------------------------------- an in-memory API


class FakeKube:
    """Enough of kube.Kube: objects in dicts; creates refused while ``refuse`` is set."""

    ApiException = ApiError

    def __init__(self):
        self.objects: dict[tuple[str, str], dict] = {}
        self.jobs: dict[str, dict] = {}
        self.refuse: ApiError | None = None
        self.creates = 0
        self.status_writes: list[dict] = []
        self.events: list[tuple[str, dict]] = []

    async def create_event(self, namespace, event):
        self.events.append((namespace, event))

    def add(self, plural, body):
        body = copy.deepcopy(body)
        body["metadata"].setdefault("namespace", "imaging")
        body["metadata"].setdefault("uid", f"uid-{body['metadata']['name']}")
        self.objects[(plural, body["metadata"]["name"])] = body
        return body

    async def get(self, plural, ns, name):
        return copy.deepcopy(self.objects.get((plural, name)))

    async def list(self, plural, ns, keep=None):
        return [(keep or (lambda x: x))(copy.deepcopy(b)) for (p, _), b in self.objects.items() if p == plural]

    async def patch_status(self, plural, ns, name, status):
        body = self.objects.get((plural, name))
        if body is None:
            return None
        self.status_writes.append(copy.deepcopy(status))
        body["status"] = _merge(body.get("status") or {}, copy.deepcopy(status))
        return copy.deepcopy(body)

    async def get_job(self, ns, name):
        return copy.deepcopy(self.jobs.get(name))

    async def list_jobs(self, ns, selector, keep=None):
        return [(keep or (lambda x: x))(copy.deepcopy(j)) for j in self.jobs.values()]

    async def create_job(self, manifest):
        if self.refuse is not None:
            raise self.refuse
        name = manifest["metadata"]["name"]
        if name in self.jobs:
            return None
        self.creates += 1
        job = copy.deepcopy(manifest)
        job["metadata"]["uid"] = f"job-uid-{name}"
        self.jobs[name] = job
        return copy.deepcopy(job)

    async def job_pods(self, ns, name):
        return []

    async def delete(self, plural, ns, name):
        self.objects.pop((plural, name), None)


def _merge(old: dict, patch: dict) -> dict:
    out = dict(old)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def complete(kube: FakeKube, name: str, when="2024-01-01T00:30:00Z") -> None:
    kube.jobs[name]["status"] = {"startTime": "2024-01-01T00:20:00Z", "completionTime": when, "succeeded": 1,
                                 "conditions": [{"type": "Complete", "status": "True"}]}


def setup(rrs=()):
    kube = FakeKube()
    kube.add("clarapipelines", liver_body())
    body = kube.add("pipelinejobs", pjob())
    for r in rrs:
        kube.add("registerresults", r)
    events: list[tuple] = []
    post = lambda b, t, r, m: events.append((b["kind"], t, r, m))  # noqa: E731
    runner = Runner(kube, SETTINGS, results=Registrar(kube, SETTINGS, post_event=post), post_event=post)
    return kube, runner, body["metadata"]["name"], events


def status(kube, name="ct-liver-0123456789"):
    return kube.objects[("pipelinejobs", name)]["status"]


def conds(st):
    return {c["type"]: (c["status"], c["reason"]) for c in st.get("conditions", [])}


QUOTA = ApiError(403, 'jobs.batch "ct-liver-0123456789" is forbidden: exceeded quota: no-jobs, requested: '
                      'count/jobs.batch=1, used: count/jobs.batch=0, limited: count/jobs.batch=0', "Forbidden")


def test_a_refused_job_says_why_is_retried_and_then_created():
    kube, runner, name, events = setup()
    kube.refuse = QUOTA
    for _ in range(3):  # every retry refused: one status write, one Event
        with pytest.raises(Retry, match="QuotaExceeded"):
            asyncio.run(runner.reconcile("imaging", name))
    st = status(kube)
    assert (st["phase"], st["reason"]) == ("Pending", "QuotaExceeded") and "exceeded quota: no-jobs" in st["message"]
    assert conds(st)["JobCreated"] == ("False", "QuotaExceeded")
    assert [e[1:3] for e in events] == [("Warning", "QuotaExceeded")] and "exceeded quota" in events[0][3]
    assert len(kube.status_writes) == 1
    kube.refuse = None
    asyncio.run(runner.reconcile("imaging", name))
    assert list(kube.jobs) == [name] and status(kube)["reason"] == "JobCreated"
    assert conds(status(kube))["JobCreated"] == ("True", "JobCreated")


def test_register_jobs_are_recorded_refusals_retried_and_each_created_once():
    kube, runner, name, events = setup([rr("a"), rr("b", inputs=["dicom-writer/dicom"]), rr("other", pipeline="x"),
                                        rr("late", created="2024-01-01T01:00:00Z"), rr("bad", inputs=["nope"])])
    asyncio.run(runner.reconcile("imaging", name))
    complete(kube, name)
    kube.refuse = QUOTA  # the run succeeds while register Jobs are refused
    with pytest.raises(Retry, match="QuotaExceeded"):
        asyncio.run(runner.reconcile("imaging", name))
    st = status(kube)
    assert st["phase"] == "Succeeded"  # the success is written, with what fires for it
    assert {n: e["state"] for n, e in st["registerResults"].items()} == {"a": "Pending", "b": "Pending",
                                                                          "bad": "Waiting"}
    assert conds(st)["ResultsRegistered"] == ("False", "QuotaExceeded")
    assert not is_settled(kube.objects[("pipelinejobs", name)])
    assert needs_reconcile(kube.objects[("pipelinejobs", name)], None, [])
    kube.refuse = None
    asyncio.run(runner.reconcile("imaging", name))
    st = status(kube)
    assert {n: e["state"] for n, e in st["registerResults"].items()} == {"a": "Created", "b": "Created",
                                                                          "bad": "Waiting"}
    assert conds(st)["ResultsRegistered"] == ("False", "InvalidInputs")
    assert kube.creates == 3  # the pipeline Job and two register Jobs
    # Fixing the RegisterResults resumes its waiting run; a deleted register Job is never recreated.
    kube.objects[("registerresults", "bad")]["spec"]["inputs"] = ["dicom-writer"]
    del kube.jobs[st["registerResults"]["a"]["jobName"]]
    asyncio.run(runner.reconcile("imaging", name))
    st = status(kube)
    assert conds(st)["ResultsRegistered"][0] == "True" and kube.creates == 4
    assert st["registerResults"]["bad"] == {"uid": "uid-bad", "state": "Created",
                                            "jobName": st["registerResults"]["bad"]["jobName"]}
    assert is_settled(kube.objects[("pipelinejobs", name)])
    writes = len(kube.status_writes)
    asyncio.run(runner.reconcile("imaging", name))
    assert kube.creates == 4 and len(kube.status_writes) == writes  # converged: no calls that change anything
    assert sum(1 for e in events if e[2] == "RunCreated") == 3


def test_a_lost_status_finds_the_existing_register_jobs():
    kube, runner, name, _ = setup([rr("a")])
    asyncio.run(runner.reconcile("imaging", name))
    complete(kube, name)
    asyncio.run(runner.reconcile("imaging", name))
    assert kube.creates == 2
    del kube.objects[("pipelinejobs", name)]["status"]  # e.g. a kill between create and the status write
    asyncio.run(runner.reconcile("imaging", name))
    st = status(kube)
    assert st["phase"] == "Succeeded" and st["registerResults"]["a"]["state"] == "Created"
    assert kube.creates == 2


def test_phases_never_go_backwards_and_a_deleted_job_fails_the_run():
    kube, runner, name, _ = setup()
    asyncio.run(runner.reconcile("imaging", name))
    kube.jobs[name]["status"] = {"active": 1}
    asyncio.run(runner.reconcile("imaging", name))
    assert status(kube)["phase"] == "Running"
    kube.jobs[name]["status"] = {}  # a stale view
    asyncio.run(runner.reconcile("imaging", name))
    assert status(kube)["phase"] == "Running"
    assert not needs_reconcile(kube.objects[("pipelinejobs", name)], kube.jobs[name] | {"status": {"active": 1}}, [])
    del kube.jobs[name]
    assert needs_reconcile(kube.objects[("pipelinejobs", name)], None, [])
    asyncio.run(runner.reconcile("imaging", name))
    assert (status(kube)["phase"], status(kube)["reason"]) == ("Failed", "JobDeleted")


def test_a_waiting_pipelinejob_is_resynced_only_when_its_pipeline_appears():
    body = pjob()
    body["status"] = {"phase": "Pending", "reason": "PipelineNotFound"}
    assert not needs_reconcile(body, None, [])
    assert needs_reconcile(body, None, [liver_body()])
    assert needs_reconcile(pjob(), None, [])  # never reconciled: its status is due


def test_results_condition():
    assert results_condition({}, []).reason == "NoRegisterResults"
    ok = results_condition({"a": {"state": "Created"}, "b": {"state": "Skipped"}}, [])
    assert ok.status and ok.reason == "Registered" and ok.message.endswith(": a")
    refused = results_condition({"a": {"state": "Pending"}}, [("a", "AdmissionDenied", "no")])
    assert (refused.status, refused.reason) == (False, "AdmissionDenied") and refused.message.endswith(": no")


def test_troubleshooting_explains_every_refusal_reason():
    import re
    from pathlib import Path

    from clara_operator import kube

    doc = (Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md").read_text()
    documented = set(re.findall(r"^### `(\w+)`", doc, flags=re.M))
    reasons = set(re.findall(r"^    (\w+) {2,}", kube.refusal.__doc__ or "", flags=re.M))
    assert reasons == {"QuotaExceeded", "AdmissionDenied", "APIUnavailable", "JobRefused"}
    assert reasons <= documented


def test_the_watch_event_of_our_own_status_write_is_no_news():
    from clara_operator.controller import Controller

    kube, runner, name, _ = setup()
    controller = Controller(kube, SETTINGS, namespaces=["imaging"])
    controller.runner = runner
    asyncio.run(runner.reconcile("imaging", name))
    ours = copy.deepcopy(kube.objects[("pipelinejobs", name)])
    ours["metadata"]["resourceVersion"] = "7"
    runner.own_writes[("imaging", name)] = "7"
    controller.pipelinejob_event(ours)
    assert len(controller.queue.schedule) == 0
    ours["metadata"]["resourceVersion"] = "8"  # someone else's change
    controller.pipelinejob_event(ours)
    assert len(controller.queue.schedule) == 1
    controller.pipelinejob_event(ours, deleted=True)
    assert ("imaging", name) not in runner.own_writes


def test_seen_keeps_the_newest_version_and_trims_jobs():
    from clara_operator.seen import Seen

    seen = Seen()
    new = {"metadata": {"namespace": "n", "name": "a", "resourceVersion": "12"}, "status": {"phase": "Running"}}
    old = {"metadata": {"namespace": "n", "name": "a", "resourceVersion": "9"}, "status": {"phase": "Pending"}}
    seen.pipelinejob(new)
    seen.pipelinejob(old)  # an older event arriving after our newer write
    assert seen.pipelinejobs[("n", "a")]["status"]["phase"] == "Running"
    seen.job({"metadata": {"namespace": "n", "name": "a", "resourceVersion": "3", "labels": {"x": "y"}},
              "spec": {"template": {}}, "status": {"active": 1}})
    assert seen.jobs[("n", "a")] == {"metadata": {"namespace": "n", "name": "a", "resourceVersion": "3"},
                                     "status": {"active": 1}}


def test_no_import_cycles_between_the_operator_modules():
    """events/conditions import none of ours; the controller wires runner and registrar, which
    know nothing of each other or of the kopf handlers."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[2] / "operator" / "clara_operator"

    def ours(module: str) -> set[str]:
        tree = ast.parse((pkg / f"{module}.py").read_text())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clara_operator"):
                names.add((node.module or "").split(".")[-1] if node.module != "clara_operator" else
                          ",".join(a.name for a in node.names))
            elif isinstance(node, ast.Import):
                names |= {a.name.split(".")[-1] for a in node.names if a.name.startswith("clara_operator")}
        return names

    assert ours("events") == set() and ours("conditions") == set()
    assert not ours("pipelinejobs") & {"registerresults", "handlers", "controller"}
    assert not ours("registerresults") & {"pipelinejobs", "handlers", "controller"}
    assert "handlers" not in ours("controller")


# --------------------------------------------------------------------------- scale: lean watch, lean kopf


def test_job_watch_events_advance_the_version_and_an_expired_one_raises_gone():
    from clara_operator.jobwatch import Gone, JobWatch

    got = []
    watch = JobWatch(kube=None, namespace="n", selector="x=y", on_event=lambda b, d: got.append((b, d)),
                     on_list=lambda ns, jobs: None)
    watch._event({"type": "MODIFIED", "object": {"metadata": {"name": "a", "resourceVersion": "5"}}})
    watch._event({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}})
    assert watch.version == "9" and len(got) == 1 and watch.events == 1
    watch._event({"type": "DELETED", "object": {"metadata": {"name": "a", "resourceVersion": "10"}}})
    assert got[-1][1] is True
    with pytest.raises(Gone):
        watch._event({"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}})
    with pytest.raises(RuntimeError):
        watch._event({"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}})


def test_lean_diff_base_is_kopfs_essence():
    import kopf

    from clara_operator.handlers import LeanDiffBaseStorage

    lean = LeanDiffBaseStorage(prefix="dicom.clara.io", key="last-handled-configuration")
    kopfs = kopf.AnnotationsDiffBaseStorage(prefix="dicom.clara.io", key="last-handled-configuration")
    bodies = [
        {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "ClaraAETitle",
         "metadata": {"name": "a", "namespace": "n", "uid": "u", "resourceVersion": "3", "generation": 2,
                      "labels": {"x": "1"}, "managedFields": [{"manager": "kubectl"}],
                      "annotations": {"note": "kept", "kubectl.kubernetes.io/last-applied-configuration": "{}",
                                      "dicom.clara.io/last-handled-configuration": "{}"},
                      "finalizers": ["dicom.clara.io/finalizer"]},
         "spec": {"aeTitle": "CT", "processors": [{"name": "p", "timeout": 5}]}, "status": {"ready": True}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"}, "spec": {}, "status": {"active": 1}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "annotations": {}}, "data": {"a": "b"}},
    ]
    for body in bodies:
        assert lean.build(body=kopf.Body(body)) == kopfs.build(body=kopf.Body(body))
    assert lean.build(body=kopf.Body(bodies[1]), extra_fields=["status.active"]) == \
        kopfs.build(body=kopf.Body(bodies[1]), extra_fields=["status.active"])


def test_seen_drops_managed_fields_and_a_relist_replaces_the_jobs_of_its_namespace():
    from clara_operator.seen import Seen

    seen = Seen()
    seen.pipelinejob({"metadata": {"namespace": "n", "name": "a", "resourceVersion": "1",
                                   "managedFields": [{"manager": "x"}]}, "spec": {"pipeline": "p"}})
    assert seen.pipelinejobs[("n", "a")] == {"metadata": {"namespace": "n", "name": "a", "resourceVersion": "1"},
                                             "spec": {"pipeline": "p"}}
    for ns, name in (("n", "gone"), ("n", "kept"), ("m", "other")):
        seen.job({"metadata": {"namespace": ns, "name": name}})
    seen.replace_jobs("n", [{"metadata": {"namespace": "n", "name": "kept"}}, {"metadata": {"namespace": "n",
                                                                                          "name": "new"}}])
    assert set(seen.jobs) == {("n", "kept"), ("n", "new"), ("m", "other")}
    seen.replace_jobs(None, [])
    assert seen.jobs == {}


def test_the_resync_compares_with_the_watched_jobs_once_the_watch_has_listed():
    from clara_operator.seen import trim_job

    kube, runner, name, _ = setup()
    asyncio.run(runner.reconcile("imaging", name))  # creates the Job: Pending, JobCreated
    job_key = next(iter(kube.jobs))
    complete(kube, job_key)  # the world: Complete; not yet seen by the watch
    assert asyncio.run(runner.out_of_step("imaging")) == [("imaging", name)]  # listed: out of step
    kube.jobs[job_key]["status"] = {"active": 1}
    asyncio.run(runner.reconcile("imaging", name))  # Running now
    runner.seen.job(trim_job(copy.deepcopy(kube.jobs[job_key])))  # the watch's view: running
    complete(kube, job_key)
    assert asyncio.run(runner.out_of_step("imaging", watched_jobs=True)) == []  # the watch saw no change yet
    runner.seen.job({**kube.jobs[job_key], "metadata": {**kube.jobs[job_key]["metadata"], "resourceVersion": "99"}})
    assert asyncio.run(runner.out_of_step("imaging", watched_jobs=True)) == [("imaging", name)]


def test_a_created_job_is_followed_by_the_next_reconcile_and_its_events_coalesce():
    """The controller's reconcile creates the Job and asks to come back (the worker goes on to
    the next create); the PipelineJob's status is written by that next reconcile, once for
    whatever the Job reached meanwhile; the Job's watch events make its key due after a delay."""
    from clara_operator.controller import JOB_EVENT_DELAY, PIPELINEJOB, Controller

    kube, _, name, events = setup()
    controller = Controller(kube, SETTINGS, namespaces=["imaging"])
    controller.runner.post_event = lambda b, t, r, m: events.append((b["kind"], t, r, m))
    key = (PIPELINEJOB, "imaging", name)
    asyncio.run(controller.reconcile(key))
    assert kube.creates == 1 and kube.status_writes == []  # created, status not yet written
    assert key in controller.queue.schedule._due  # comes back to write it
    job = next(iter(kube.jobs.values()))
    kube.jobs[job["metadata"]["name"]]["status"] = {"active": 1}  # the Job started meanwhile
    controller.job_event(copy.deepcopy(kube.jobs[job["metadata"]["name"]]))
    due, first = controller.queue.schedule._due[key]
    assert not first
    asyncio.run(controller.reconcile(key))
    assert kube.creates == 1 and len(kube.status_writes) == 1  # one write: straight to Running
    assert status(kube)["phase"] == "Running" and status(kube)["jobName"] == job["metadata"]["name"]
    assert conds(status(kube))["JobCreated"] == ("True", "JobCreated")
    assert [e[2] for e in events] == ["Running"]

    # A Job's burst of watch events: one key, due JOB_EVENT_DELAY after the first.
    schedule = controller.queue.schedule
    schedule._due.clear()
    for heap in schedule._heaps.values():
        heap.clear()
    before = controller.queue._clock()
    for _ in range(5):
        controller.job_event(copy.deepcopy(kube.jobs[job["metadata"]["name"]]))
    assert len(schedule) == 1
    assert schedule._due[key][0] >= before + JOB_EVENT_DELAY
    assert schedule.pop(before + JOB_EVENT_DELAY / 2) is None


def test_the_resyncs_brief_pipelinejob_decides_as_the_whole_one():
    """The resync holds PipelineJobs as seen.brief_pipelinejob: it must judge every state as the
    whole object does (a field needs_reconcile reads and brief drops would hide a PipelineJob)."""
    from clara_operator.seen import brief_pipelinejob

    kube, runner, name, _ = setup(rrs=[rr()])
    states = []
    job_key = None
    for step in range(5):
        body = copy.deepcopy(kube.objects[("pipelinejobs", name)])
        job = copy.deepcopy(kube.jobs.get(job_key)) if job_key else None
        states.append((body, job))
        if step == 1:
            kube.jobs[job_key]["status"] = {"active": 1}
        if step == 2:
            complete(kube, job_key)
        try:
            asyncio.run(runner.reconcile("imaging", name))
        except Retry:
            pass
        job_key = next(iter(kube.jobs), None)
    states.append(({**pjob(), "metadata": {**pjob()["metadata"], "deletionTimestamp": "2024-01-01T00:00:00Z"}}, None))
    states.append((pjob(), None))
    decided = []
    for body, job in states:
        for pipelines in ([], [liver_body()]):
            whole = needs_reconcile(body, job, pipelines)
            assert needs_reconcile(brief_pipelinejob(body), job, pipelines) == whole, body.get("status")
            decided.append(whole)
    assert True in decided and False in decided
    assert len(json.dumps(brief_pipelinejob(states[3][0]))) < len(json.dumps(states[3][0])) / 3


# --------------------------------------------------------------------------- the controller's own watches and Events


def test_events_go_out_one_at_a_time_while_the_controller_creates_jobs():
    """While Job creates are pending (the work queue's first lane), one poster only; all of
    them once the creates are done. Nothing is dropped meanwhile."""
    from clara_operator.controller import Controller
    from clara_operator.events import EVENT_POSTERS

    in_flight, peak, posted = [0], [0], []
    gate = asyncio.Event()

    class Kube:
        async def create_event(self, namespace, event):
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
            await gate.wait()
            in_flight[0] -= 1
            posted.append(event["reason"])

    async def scenario():
        controller = Controller(Kube(), SETTINGS, ["imaging"])
        controller.queue.schedule.add(("PipelineJob", "imaging", "new"), 0.0, first=True)  # a create pending
        controller.events._busy_poll = 0.01
        task = asyncio.create_task(controller.events.run())
        for i in range(20):
            controller.events.post(pjob(), "Normal", f"r{i}", "m")
        await asyncio.sleep(0.1)
        assert peak[0] == 1
        controller.queue.schedule.pop(controller.queue._clock())
        controller.queue.schedule.done(("PipelineJob", "imaging", "new"), controller.queue._clock(), failed=False)
        await asyncio.sleep(0.1)
        assert peak[0] == EVENT_POSTERS  # the creates are done: every poster
        gate.set()
        while len(posted) < 20:
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert sorted(posted) == sorted(f"r{i}" for i in range(20))


def test_event_queue_posts_as_kopf_did_retries_once_and_drops_past_its_backlog():
    from clara_operator.events import REPORTING_COMPONENT, EventQueue

    posted, failures = [], {"left": 1}

    async def create(namespace, event):
        if failures["left"]:
            failures["left"] -= 1
            raise ApiError(503, "Service Unavailable")
        posted.append((namespace, event))

    async def scenario():
        queue = EventQueue(create, posters=2, backlog=3, retry_delay=0)
        pj = {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob",
              "metadata": {"name": "a", "namespace": "imaging", "uid": "u1"}}
        for reason in ("Running", "Succeeded", "Other", "Fourth"):
            queue.post(pj, "Normal", reason, "x" * 2000)  # never blocks, never raises
        assert queue.dropped == 1  # the backlog holds 3
        task = asyncio.create_task(queue.run())
        for _ in range(100):
            if queue.posted == 3:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return queue

    queue = asyncio.run(scenario())
    assert queue.posted == 3 and queue.failed == 0  # the 503 was retried
    assert sorted(e["reason"] for _, e in posted) == ["Other", "Running", "Succeeded"]
    namespace, event = posted[0]
    assert namespace == "imaging"
    assert event["involvedObject"] == {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob",
                                       "name": "a", "namespace": "imaging", "uid": "u1"}
    assert event["source"] == {"component": REPORTING_COMPONENT}
    assert event["reportingComponent"] == REPORTING_COMPONENT and event["metadata"]["generateName"]
    assert len(event["message"]) == 1000


def test_controller_events_go_through_its_own_queue():
    from clara_operator.controller import Controller

    kube, _, name, _ = setup()
    controller = Controller(kube, SETTINGS, namespaces=["imaging"])
    assert controller.runner.post_event == controller.events.post
    assert controller.registrar.post_event == controller.events.post


def test_a_relist_of_pipelinejobs_forgets_the_deleted_and_queues_the_rest():
    from clara_operator.controller import Controller

    kube, runner, name, _ = setup()
    controller = Controller(kube, SETTINGS, namespaces=["imaging"])
    gone = {"metadata": {"namespace": "imaging", "name": "gone", "resourceVersion": "3"}, "spec": {}}
    other_ns = {"metadata": {"namespace": "elsewhere", "name": "kept", "resourceVersion": "3"}, "spec": {}}
    controller.pipelinejob_event(gone)
    controller.pipelinejob_event(other_ns)
    controller.runner.own_writes[("imaging", "gone")] = "3"
    assert ("imaging", "gone") in controller.runner.seen.pipelinejobs
    listed = copy.deepcopy(kube.objects[("pipelinejobs", name)])
    listed["metadata"]["resourceVersion"] = "5"
    controller.queue.schedule = type(controller.queue.schedule)()  # empty
    controller.pipelinejobs_listed("imaging", [listed])
    assert ("imaging", "gone") not in controller.runner.seen.pipelinejobs  # deleted while the watch was away
    assert ("imaging", "gone") not in controller.runner.own_writes
    assert ("elsewhere", "kept") in controller.runner.seen.pipelinejobs  # another namespace's list
    assert ("imaging", name) in controller.runner.seen.pipelinejobs
    assert len(controller.queue.schedule) == 1


def test_startup_starts_the_controller_without_kopfs_handler_context():
    """The controller starts from kopf's startup activity (not from a first event, which never
    comes in an empty namespace), and no kopf handler watches PipelineJobs any more."""
    import kopf

    from clara_operator import handlers

    started = []
    memo = kopf.Memo()
    memo.controller = type("C", (), {"start": lambda self: started.append(True)})()
    asyncio.run(handlers.start_controller(memo=memo))
    assert started == [True]
    watched = {h.selector.any_name for h in handlers.registry._watching.get_all_handlers()}
    assert "registerresults" in watched and "pipelinejobs" not in watched


def test_kopfs_job_watch_asks_the_server_for_register_jobs_only():
    """kopf filters a handler's labels in the client: without a server-side selector its Job watch
    received every pipeline Job event (a third of the operator's CPU in a 1,000 burst)."""
    import kopf
    from kopf._cogs.structs.references import Resource

    from clara_operator.handlers import configure
    from clara_operator.jobspec import LABEL_COMPONENT
    from clara_operator.registerjob import COMPONENT_REGISTER

    settings = kopf.OperatorSettings()
    configure(settings)
    jobs = Resource(group="batch", version="v1", plural="jobs", kind="Job", singular="job", namespaced=True)
    assert settings.watching.label_selectors.collect(jobs) == [f"{LABEL_COMPONENT}={COMPONENT_REGISTER}"]
    others = [Resource(group="dicom.clara.io", version="v1alpha1", plural=p, namespaced=True)
              for p in ("registerresults", "clarapipelines", "claraaetitles")]
    others.append(Resource(group="", version="v1", plural="configmaps", kind="ConfigMap", namespaced=True))
    assert all(settings.watching.label_selectors.collect(r) == [] for r in others)
