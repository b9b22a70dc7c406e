"""The operator's lean Job watch (clara_operator/jobwatch.py) and its raw-JSON API calls
(kube.Kube) against the real kube-apiserver: list then watch, a relist (which forgets a
Job deleted meanwhile), paged lists."""
from __future__ import annotations

import asyncio

import pytest

from clara_operator import kube as kube_module
from clara_operator.jobspec import COMPONENT_PIPELINE, LABEL_COMPONENT
from clara_operator.jobwatch import JobWatch
from clara_operator.kube import Kube
from clara_operator.seen import Seen

pytestmark = pytest.mark.e2e
SELECTOR = f"{LABEL_COMPONENT}={COMPONENT_PIPELINE}"


def job(ns: str, name: str, component: str = COMPONENT_PIPELINE) -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": ns, "labels": {LABEL_COMPONENT: component}},
            "spec": {"suspend": True, "template": {"spec": {
                "restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}}}


async def wait_for(test, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not test():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_job_watch_lists_watches_relists_and_forgets(k8s_cluster, k8s_namespace, monkeypatch):
    from kubernetes_asyncio import client

    ns = k8s_namespace
    cfg = await k8s_cluster.kubernetes_asyncio_configuration()
    async with client.ApiClient(configuration=cfg) as api:
        kube = Kube(api)
        created = await kube.create_job(job(ns, "before"))
        # answered with the stored metadata only (no pod template back), which is what the runner keeps
        assert created["kind"] == "PartialObjectMetadata" and "spec" not in created, created
        assert created["metadata"]["name"] == "before" and created["metadata"]["uid"]
        assert created["metadata"]["labels"] == {LABEL_COMPONENT: COMPONENT_PIPELINE}
        assert await kube.create_job(job(ns, "before")) is None  # AlreadyExists: None, as the runner expects
        await kube.create_job(job(ns, "other", component="register"))  # not selected

        seen, events, lists = Seen(), [], []

        def on_event(body, deleted):
            events.append((body["metadata"]["name"], deleted))
            (seen.forget_job(ns, body["metadata"]["name"]) if deleted else seen.job(body))

        def on_list(namespace, jobs):
            lists.append(sorted(j["metadata"]["name"] for j in jobs))
            seen.replace_jobs(namespace, jobs)

        watch = JobWatch(kube, ns, SELECTOR, on_event, on_list)
        task = asyncio.create_task(watch.run())
        try:
            await wait_for(lambda: lists == [["before"]])
            assert set(seen.jobs) == {(ns, "before")}
            assert "spec" not in seen.jobs[(ns, "before")]  # kept trimmed

            await kube.create_job(job(ns, "after"))
            await wait_for(lambda: ("after", False) in events)
            await kube.batch.delete_namespaced_job("after", ns, propagation_policy="Background")
            await wait_for(lambda: ("after", True) in events)
            assert (ns, "after") not in seen.jobs

            # Away for a while, then a relist (what a 410 Gone leads to, see the unit test): the
            # list forgets a Job deleted while the watch was away and brings the new one.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.batch.delete_namespaced_job("before", ns, propagation_policy="Background")
            await kube.create_job(job(ns, "while-away"))
            watch.version = None
            task = asyncio.create_task(watch.run())
            await wait_for(lambda: len(lists) == 2)
            assert lists[1] == ["while-away"]
            assert set(seen.jobs) == {(ns, "while-away")}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        # Lists are paged: every object, whatever the page size.
        monkeypatch.setattr(kube_module, "LIST_PAGE", 2)
        for i in range(5):
            await kube.create_job(job(ns, f"paged-{i}"))
        names = {j["metadata"]["name"] for j in await kube.list_jobs(ns, SELECTOR)}
        assert names == {"while-away"} | {f"paged-{i}" for i in range(5)}
        got = await kube.get_job(ns, "paged-0")
        assert got["metadata"]["labels"][LABEL_COMPONENT] == COMPONENT_PIPELINE  # the API's JSON, camelCase
        assert "restartPolicy" in got["spec"]["template"]["spec"]
        assert await kube.get_job(ns, "nope") is None


def pipelinejob(name: str) -> dict:
    return {"apiVersion": "dicom.clara.io/v1alpha1", "kind": "PipelineJob", "metadata": {"name": name},
            "spec": {"pipeline": "p", "priority": "normal", "source": {"aeTitle": "CT", "processor": "by-study"},
                     "group": {"by": "Study", "value": "1.2.3"},
                     "payload": {"path": f"/var/lib/clara-dicom/payloads/{name}", "instances": 1, "bytes": 1}}}


async def test_pipelinejob_watch_lists_trimmed_watches_and_relists(k8s_cluster, k8s_namespace):
    """The controller's own PipelineJob watch (kopf no longer watches them): list, then events
    (our status write among them), then a relist that forgets what was deleted meanwhile."""
    from kubernetes_asyncio import client

    from clara_dicom.models import GROUP, VERSION
    from clara_operator.jobwatch import PipelineJobWatch
    from clara_operator.kube import PIPELINEJOBS

    ns = k8s_namespace

    async def create(custom, name):
        await custom.create_namespaced_custom_object(GROUP, VERSION, ns, PIPELINEJOBS, pipelinejob(name))

    cfg = await k8s_cluster.kubernetes_asyncio_configuration()
    async with client.ApiClient(configuration=cfg) as api:
        kube = Kube(api)
        await create(kube.custom, "before")
        bodies, events, lists, listed = {}, [], [], []

        def on_event(body, deleted):
            events.append((body["metadata"]["name"], deleted))
            bodies[body["metadata"]["name"]] = body

        def on_list(namespace, items):
            lists.append(sorted(p["metadata"]["name"] for p in items))
            listed.extend(items)

        watch = PipelineJobWatch(kube, ns, on_event, on_list)
        task = asyncio.create_task(watch.run())
        try:
            await wait_for(lambda: lists == [["before"]])
            assert "managedFields" not in listed[0]["metadata"]  # a (re)list is trimmed page by page
            assert listed[0]["spec"]["pipeline"] == "p"
            await create(kube.custom, "after")
            await wait_for(lambda: ("after", False) in events)  # (events are trimmed where kept: seen.py)
            await kube.patch_status(PIPELINEJOBS, ns, "after", {"phase": "Pending", "reason": "JobCreated"})
            await wait_for(lambda: (bodies["after"].get("status") or {}).get("reason") == "JobCreated")
            await kube.delete(PIPELINEJOBS, ns, "after")
            await wait_for(lambda: ("after", True) in events)

            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await kube.delete(PIPELINEJOBS, ns, "before")
            await create(kube.custom, "while-away")
            watch.version = None
            task = asyncio.create_task(watch.run())
            await wait_for(lambda: len(lists) == 2)
            assert lists[1] == ["while-away"]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
