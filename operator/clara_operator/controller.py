"""The PipelineJob / Job / RegisterResults controller: kopf's watch events and a
periodic resync add keys to a work queue (workqueue.py); its workers reconcile them
(pipelinejobs.Runner, registerresults.Registrar) and retry what did not converge
with backoff. Nothing is decided in an event handler, so a missed or failed event
costs at most one resync interval, and a refused create is retried until it works.

The pipeline Jobs and the PipelineJobs are watched by jobwatch.JobWatch and
jobwatch.PipelineJobWatch (not kopf: see there why), and the controller posts its
Events itself (events.EventQueue); every other kind comes through kopf's handlers
(handlers.py). ``start`` runs from kopf's startup activity.

Keys: (``PipelineJob``, ns, name), (``RegisterResults``, ns, name) and
(``ClaraPipeline``, ns, pipeline ID) — the last re-checks what waits for a pipeline.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from clara_operator.jobspec import COMPONENT_PIPELINE, LABEL_COMPONENT, RunnerSettings, owner_of, pipeline_id_of
from clara_operator.events import EventQueue
from clara_operator.jobwatch import JobWatch, ListWatch, PipelineJobWatch
from clara_operator.kube import PIPELINEJOBS, REGISTERRESULTS, Kube
from clara_operator.pipelinejobs import OPEN_STATES, RESULTS_CONDITION, Runner, condition
from clara_operator.registerjob import ANNOTATION_REGISTERRESULTS
from clara_operator.registerresults import Registrar
from clara_operator.workqueue import Backoff, WorkQueue

log = logging.getLogger("clara_operator.controller")

PIPELINEJOB, REGISTER_RESULTS, PIPELINE = "PipelineJob", "RegisterResults", "ClaraPipeline"
RESYNC_SECONDS = 30.0
WORKERS = 32  # reconciles in flight: each waits on the API most of the time
# While Job creates are pending, status writes of running PipelineJobs get a quarter of the
# workers: a new PipelineJob finds a free worker at once, and the API server, the limit on
# 2 cores, spends less of itself on writes that can wait a second.
ORDINARY_SHARE_WHILE_CREATING = 0.25
# A Job brings about six watch events within seconds (created, pod active, ready, succeeded,
# Complete...): its owner's key is due this long after the first, so they cost one reconcile
# (one status write) instead of one each. Also the wait between a create and the status write.
JOB_EVENT_DELAY = 1.0


def is_settled(pipelinejob: dict[str, Any]) -> bool:
    """Nothing left to do for this PipelineJob (failed, or succeeded with its results registered)."""
    status = pipelinejob.get("status") or {}
    if status.get("phase") == "Failed":
        return True
    cond = condition(status, RESULTS_CONDITION)
    return status.get("phase") == "Succeeded" and cond is not None and cond.get("status") == "True"


class Controller:
    def __init__(self, kube: Kube, settings: RunnerSettings, namespaces: list[str] | None,
                 resync_seconds: float = RESYNC_SECONDS, workers: int = WORKERS, backoff: Backoff = Backoff()) -> None:
        self.kube = kube
        self.namespaces = namespaces  # None: every namespace
        self.events = EventQueue(kube.create_event)
        self.registrar = Registrar(kube, settings, post_event=self.events.post)
        self.runner = Runner(kube, settings, results=self.registrar, post_event=self.events.post,
                             namespaces=namespaces)
        self.runner.follow_delay = JOB_EVENT_DELAY
        self.queue = WorkQueue(self.reconcile, workers=workers, backoff=backoff,
                               ordinary_share=ORDINARY_SHARE_WHILE_CREATING)
        self.events.busy = self.queue.creating  # Events wait for the creates too
        self.resync_seconds = resync_seconds
        self._tasks: list[asyncio.Task] = []
        self.job_watches: list[ListWatch] = []
        self.pipelinejob_watches: list[ListWatch] = []
        self.resyncs = 0

    # ---- triggers (the watches and kopf's event handlers call these; they only add keys)
    def pipelinejob_event(self, body: dict[str, Any], deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        if deleted or is_settled(body) or meta.get("deletionTimestamp"):
            self.runner.forget(meta.get("namespace"), meta.get("name"))
        elif not self.runner.is_own_write(body):
            self.runner.seen.pipelinejob(body)
            # No Job yet: ahead of the status updates of running ones (p95 created → Job during a burst).
            waits_for_job = not (body.get("status") or {}).get("jobName")
            if waits_for_job:
                self.runner.noticed(meta["namespace"], meta["name"])
            self.queue.add((PIPELINEJOB, meta["namespace"], meta["name"]), first=waits_for_job)

    def pipelinejobs_listed(self, namespace: str | None, pipelinejobs: list[dict[str, Any]]) -> None:
        """A (re)list of the PipelineJobs: one deleted while the watch was away is forgotten,
        every other one is looked at as if it had just changed."""
        listed = {(p["metadata"]["namespace"], p["metadata"]["name"]) for p in pipelinejobs}
        for ns, name in [k for k in self.runner.seen.pipelinejobs if (namespace is None or k[0] == namespace)
                         and k not in listed]:
            self.runner.forget(ns, name)
        for body in pipelinejobs:
            self.pipelinejob_event(body)

    def job_event(self, body: dict[str, Any], deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        if deleted:
            self.runner.seen.forget_job(meta.get("namespace"), meta.get("name"))
        else:
            self.runner.seen.job(body)
        ref = owner_of(body)
        if ref is not None:
            self.queue.add((PIPELINEJOB, meta["namespace"], ref["name"]), delay=JOB_EVENT_DELAY)

    def jobs_listed(self, namespace: str | None, jobs: list[dict[str, Any]]) -> None:
        """A (re)list of the pipeline Jobs: what is kept is replaced (a Job deleted while the
        watch was away is forgotten) and every owner is looked at again."""
        self.runner.seen.replace_jobs(namespace, jobs)
        for job in jobs:
            ref = owner_of(job)
            if ref is not None:
                self.queue.add((PIPELINEJOB, job["metadata"]["namespace"], ref["name"]))

    def register_job_event(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        name = (meta.get("annotations") or {}).get(ANNOTATION_REGISTERRESULTS)
        if name:
            self.queue.add((REGISTER_RESULTS, meta["namespace"], name))

    def registerresults_event(self, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        self.queue.add((REGISTER_RESULTS, meta["namespace"], meta["name"]))

    def pipeline_event(self, body: dict[str, Any], deleted: bool = False) -> None:
        meta = body.get("metadata") or {}
        self.runner.seen.pipeline(body, deleted=deleted)
        if not deleted:
            self.queue.add((PIPELINE, meta["namespace"], pipeline_id_of(body)))

    # ---- reconciles
    async def reconcile(self, key: tuple[str, str, str]) -> None:
        kind, namespace, name = key
        if kind == PIPELINEJOB:
            again = await self.runner.reconcile(namespace, name)
            if again is not None:
                self.queue.add(key, delay=again)
        elif kind == REGISTER_RESULTS:
            if await self.registrar.refresh(namespace, name):
                await self._requeue_waiting_for(namespace, lambda pj: name in _waiting_entries(pj))
        elif kind == PIPELINE:
            await self._pipeline_changed(namespace, name)

    async def _pipeline_changed(self, namespace: str, pipeline_id: str) -> None:
        """Start the PipelineJobs waiting for this pipeline; re-check its RegisterResults."""
        def waits(pj: dict[str, Any]) -> bool:
            status = pj.get("status") or {}
            if (pj.get("spec") or {}).get("pipeline") != pipeline_id:
                return False
            return (status.get("phase") not in ("Succeeded", "Failed") and not status.get("jobName")) \
                or bool(_waiting_entries(pj))

        await self._requeue_waiting_for(namespace, waits)
        for rr in await self.kube.list(REGISTERRESULTS, namespace):
            if (rr.get("spec") or {}).get("pipeline") == pipeline_id:
                self.queue.add((REGISTER_RESULTS, namespace, rr["metadata"]["name"]))

    async def _requeue_waiting_for(self, namespace: str, test: Any) -> None:
        for pj in await self.kube.list(PIPELINEJOBS, namespace):
            if test(pj):
                self.queue.add((PIPELINEJOB, namespace, pj["metadata"]["name"]))

    # ---- the resync
    async def resync(self) -> int:
        """Add every key whose stored state disagrees with the world; how many."""
        added = 0
        for ns in self.namespaces or [None]:
            watched = bool(self.job_watches) and all(w.listed.is_set() for w in self.job_watches)
            for pj_ns, name in await self.runner.out_of_step(ns, watched_jobs=watched):
                self.queue.add((PIPELINEJOB, pj_ns, name))
                added += 1
            for rr in await self.kube.list(REGISTERRESULTS, ns):
                self.queue.add((REGISTER_RESULTS, rr["metadata"]["namespace"], rr["metadata"]["name"]))
        self.resyncs += 1
        return added

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            try:
                added = await self.resync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next round
                log.warning("resync failed: %s", exc)
                continue
            if added:
                log.info("resync: %d PipelineJob(s) out of step", added)

    # ---- lifecycle
    def start(self) -> None:
        """Start the workers, the resync and the retention sweep (once; later calls do nothing)."""
        if self._tasks:
            return
        self.queue.start()
        self._tasks.append(asyncio.create_task(self.events.run(), name="events"))
        for ns in self.namespaces or [None]:
            pj_watch = PipelineJobWatch(self.kube, ns, self.pipelinejob_event, self.pipelinejobs_listed)
            self.pipelinejob_watches.append(pj_watch)
            self._tasks.append(asyncio.create_task(pj_watch.run(), name=f"pipelinejobwatch-{ns or 'all'}"))
            watch = JobWatch(self.kube, ns, f"{LABEL_COMPONENT}={COMPONENT_PIPELINE}", self.job_event, self.jobs_listed)
            self.job_watches.append(watch)
            self._tasks.append(asyncio.create_task(watch.run(), name=f"jobwatch-{ns or 'all'}"))
        self._tasks.append(asyncio.create_task(self._resync_forever(), name="resync"))
        if self.runner.settings.retention_hours > 0:
            self._tasks.append(asyncio.create_task(self.runner.sweep_forever(), name="pipelinejob-retention"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.job_watches = []
        self.pipelinejob_watches = []
        await self.queue.stop()

    def stats(self) -> dict[str, int]:
        return {"queued": len(self.queue.schedule), "reconciles": self.queue.reconciles,
                "retries": self.queue.retries, "resyncs": self.resyncs,
                "jobEvents": sum(w.events for w in self.job_watches),
                "pipelineJobEvents": sum(w.events for w in self.pipelinejob_watches),
                "eventsPosted": self.events.posted, "eventsDropped": self.events.dropped,
                "jobsCreated": self.runner.jobs_created, "registerJobsCreated": self.registrar.jobs_created}


def _waiting_entries(pj: dict[str, Any]) -> list[str]:
    record = (pj.get("status") or {}).get("registerResults")
    if not isinstance(record, dict):
        return []
    return [n for n, e in record.items() if isinstance(e, dict) and e.get("state") in OPEN_STATES]


__all__ = ["Controller", "is_settled"]
