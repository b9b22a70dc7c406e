"""PipelineJob → batch Job, and batch Job → PipelineJob status (SPEC §5).

Handlers (registered on ``handlers.registry`` by :func:`register`):

* every event of a PipelineJob (including the initial listing after a restart):
  ``Runner.ensure`` — find its ClaraPipeline, create the Job (its name is
  derived from the PipelineJob's, so a second create is AlreadyExists: a
  restarted operator never duplicates a Job), write the status;
* every event of a batch Job labelled ``dicom.clara.io/component=pipeline-job``:
  the owning PipelineJob's status follows the Job (phase, reason, times);
* every event of a ClaraPipeline: PipelineJobs of the namespace waiting for its
  pipeline ID (no Job yet) are ensured again, so they start when it appears;
* a background sweep deletes finished PipelineJobs after the retention period
  (their Jobs and pods go with them, by owner reference).

Everything here is stateless and idempotent: a status is recomputed from the Job
on every event, never from memory, and a phase never goes backwards.

Hooks: :func:`on_succeeded` registers ``async fn(pipelinejob, job, runner)``,
called when a PipelineJob is seen to turn Succeeded, *before* that status is
written — so a crash in between calls it again after the restart (at least
once; hooks must be idempotent, e.g. create objects with deterministic names).
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import weakref
from typing import Any, Awaitable, Callable

import kopf

from clara_dicom.models import GROUP, VERSION

from clara_operator.conditions import Cond, merge, now_rfc3339
from clara_operator.jobspec import (
    COMPONENT_PIPELINE,
    LABEL_COMPONENT,
    PHASE_RANK,
    TERMINAL_PHASES,
    JobSpecError,
    RunnerSettings,
    build_job,
    conditions_for,
    job_name,
    job_status,
    owner_of,
    pipeline_id_of,
    select_pipeline,
)

log = logging.getLogger("clara_operator.pipelines")
MERGE = "application/merge-patch+json"
PIPELINEJOBS = "pipelinejobs"
CLARAPIPELINES = "clarapipelines"
STATUS_KEYS = ("phase", "reason", "message", "jobName", "startTime", "completionTime", "failedOperator")

SucceededHook = Callable[[dict[str, Any], dict[str, Any], "Runner"], Awaitable[None]]
_SUCCEEDED_HOOKS: list[SucceededHook] = []


def on_succeeded(fn: SucceededHook) -> SucceededHook:
    """Register ``async fn(pipelinejob_body, job_body, runner)`` for PipelineJobs turning Succeeded."""
    _SUCCEEDED_HOOKS.append(fn)
    return fn


def post_event_best_effort(body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    """Post an Event; a failure is logged, never raised (Events are informational)."""
    from clara_operator.handlers import post_event

    try:
        post_event(body, event_type, reason, message)
    except Exception as exc:  # noqa: BLE001 - Events are best effort
        log.debug("event not posted: %s", exc)


class Runner:
    """The API calls of the PipelineJob runner (kubernetes_asyncio)."""

    def __init__(self, api_client: Any, settings: RunnerSettings, namespaces: list[str] | None = None) -> None:
        from kubernetes_asyncio import client

        self.settings = settings
        self.namespaces = namespaces  # None: every namespace (the retention sweep's scope)
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ApiException = client.ApiException
        self._api_client = api_client
        self._locks: "weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock]" = weakref.WeakValueDictionary()
        self.jobs_created = 0

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        key = (namespace, name)
        found = self._locks.get(key)
        if found is None:
            found = asyncio.Lock()
            self._locks[key] = found
        return found

    # ---- reads
    async def get_pipelinejob(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PIPELINEJOBS, name)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            job = await self.batch.read_namespaced_job(name, namespace)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return self._plain(job)

    def _plain(self, obj: Any) -> dict[str, Any]:
        """A client model as the API's JSON (camelCase keys, RFC 3339 times)."""
        return self._api_client.sanitize_for_serialization(obj)

    async def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        resp = await self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}")
        return self._plain(resp).get("items", [])

    async def list_pipelines(self, namespace: str) -> list[dict[str, Any]]:
        result = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, CLARAPIPELINES)
        return result.get("items", [])

    async def list_pipelinejobs(self, namespace: str | None) -> list[dict[str, Any]]:
        if namespace is None:
            result = await self.custom.list_cluster_custom_object(GROUP, VERSION, PIPELINEJOBS)
        else:
            result = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PIPELINEJOBS)
        return result.get("items", [])

    # ---- writes
    async def create_job(self, manifest: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create the Job; (job, created now). AlreadyExists returns the existing Job."""
        ns, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
        try:
            resp = await self.batch.create_namespaced_job(ns, manifest)
            self.jobs_created += 1
            return self._plain(resp), True
        except self.ApiException as exc:
            if exc.status != 409:
                raise
        existing = await self.get_job(ns, name)
        if existing is None:  # deleted in between: the next event creates it
            raise kopf.TemporaryError(f"Job {name} exists and vanished", delay=1)
        return existing, False

    async def patch_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            await self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, meta["namespace"], PIPELINEJOBS, meta["name"], {"status": status},
                _content_type=MERGE)
        except self.ApiException as exc:
            if exc.status != 404:  # deleted meanwhile
                raise

    # ---- the runner
    async def ensure(self, body: dict[str, Any], resume: bool = False) -> None:
        """Make sure this PipelineJob has its Job (or says why not), and a status that follows it."""
        meta = body["metadata"]
        ns, name = meta["namespace"], meta["name"]
        status = body.get("status") or {}
        if meta.get("deletionTimestamp") or status.get("phase") in TERMINAL_PHASES:
            return
        if status.get("jobName") and not resume:
            return  # the Job watch keeps the status in step
        async with self.lock(ns, name):
            fresh = await self.get_pipelinejob(ns, name)
            if fresh is None or fresh["metadata"].get("uid") != meta.get("uid"):
                return
            body = fresh
            status = body.get("status") or {}
            if status.get("phase") in TERMINAL_PHASES:
                return
            job = await self.get_job(ns, job_name(name))
            if job is not None:
                await self._sync(body, job)
                return
            if status.get("jobName"):
                await self._write(body, {"phase": "Failed", "reason": "JobDeleted",
                                         "message": f"Job {status['jobName']} was deleted before it finished",
                                         "completionTime": now_rfc3339()})
                return
            spec = body.get("spec") or {}
            definition, reason, message = select_pipeline(await self.list_pipelines(ns), str(spec.get("pipeline")))
            if definition is None:
                await self._write(body, {"phase": "Pending", "reason": reason, "message": message})
                return
            try:
                manifest = build_job(body, definition, self.settings)
            except JobSpecError as exc:
                await self._write(body, {"phase": "Failed", "reason": exc.reason, "message": exc.message,
                                         "completionTime": now_rfc3339()})
                return
            job, created = await self.create_job(manifest)
            if created:
                log.info("PipelineJob %s/%s: created Job %s (pipeline %s, priority %s)", ns, name,
                         job["metadata"]["name"], spec.get("pipeline"), spec.get("priority"))
            await self._sync(body, job)

    async def on_job_event(self, job: dict[str, Any], deleted: bool) -> None:
        ref = owner_of(job)
        if ref is None:
            return
        ns = job["metadata"]["namespace"]
        async with self.lock(ns, ref["name"]):
            body = await self.get_pipelinejob(ns, ref["name"])
            if body is None or body["metadata"].get("uid") != ref.get("uid") or \
                    body["metadata"].get("deletionTimestamp"):
                return
            if deleted:
                if (body.get("status") or {}).get("phase") not in TERMINAL_PHASES:
                    await self._write(body, {"phase": "Failed", "reason": "JobDeleted",
                                             "message": f"Job {job['metadata']['name']} was deleted before it "
                                                        "finished", "completionTime": now_rfc3339()})
                return
            await self._sync(body, job)

    async def _sync(self, body: dict[str, Any], job: dict[str, Any]) -> None:
        ref = owner_of(job)
        if ref is None or ref.get("uid") != body["metadata"].get("uid"):
            await self._write(body, {"phase": "Failed", "reason": "JobNameConflict",
                                     "message": f"a Job named {job['metadata']['name']} exists that this "
                                                "PipelineJob does not own", "completionTime": now_rfc3339()})
            return
        pods: list[dict[str, Any]] = []
        if any(c.get("type") == "Failed" and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or []):
            try:
                pods = await self.job_pods(job["metadata"]["namespace"], job["metadata"]["name"])
            except self.ApiException as exc:
                log.warning("cannot list the pods of Job %s: %s", job["metadata"]["name"], exc.reason)
        await self._write(body, job_status(job, pods), job)

    async def _write(self, body: dict[str, Any], desired: dict[str, Any], job: dict[str, Any] | None = None
                     ) -> None:
        stored = body.get("status") or {}
        old_phase = stored.get("phase")
        new_phase = desired.get("phase")
        if old_phase in TERMINAL_PHASES:
            return
        if old_phase and PHASE_RANK.get(new_phase, 0) < PHASE_RANK.get(old_phase, 0):
            return  # a stale view of the Job; phases never go backwards
        want = {k: desired.get(k) for k in STATUS_KEYS}
        if want.get("jobName") is None and stored.get("jobName"):
            want["jobName"] = stored["jobName"]
        have = {k: stored.get(k) for k in STATUS_KEYS}
        if want == have:
            return
        if new_phase == "Succeeded" and old_phase != "Succeeded" and job is not None:
            for hook in list(_SUCCEEDED_HOOKS):
                try:
                    await hook(body, job, self)
                except Exception:  # noqa: BLE001 - a hook never blocks the status
                    log.exception("PipelineJob %s: a succeeded hook failed", body["metadata"]["name"])
        generation = body["metadata"].get("generation")
        conds = [Cond(t, s, r, m) for t, s, r, m in conditions_for(want)]
        patch = dict(want)  # None values delete stale keys
        patch["conditions"] = merge(conds, stored.get("conditions"), generation)
        patch["observedGeneration"] = generation
        await self.patch_status(body, patch)
        if new_phase != old_phase or want.get("reason") != stored.get("reason"):
            event_type = "Warning" if new_phase == "Failed" or (
                new_phase == "Pending" and want.get("reason") != "JobCreated") else "Normal"
            event_reason = {"Succeeded": "Succeeded", "Failed": want.get("reason") or "Failed",
                            "Running": "Running"}.get(new_phase or "", want.get("reason") or "Pending")
            post_event_best_effort(body, event_type, event_reason, want.get("message") or "")
            log.info("PipelineJob %s/%s: %s (%s)", body["metadata"]["namespace"], body["metadata"]["name"],
                     new_phase, want.get("reason"))

    async def start_waiting(self, namespace: str, pipeline_id: str) -> None:
        """A ClaraPipeline appeared or changed: start the PipelineJobs waiting for it."""
        for body in await self.list_pipelinejobs(namespace):
            status = body.get("status") or {}
            if (body.get("spec") or {}).get("pipeline") != pipeline_id or status.get("jobName") \
                    or status.get("phase") in TERMINAL_PHASES:
                continue
            try:
                await self.ensure(body)
            except Exception as exc:  # noqa: BLE001 - its own events retry it
                log.warning("PipelineJob %s/%s: %s", namespace, body["metadata"]["name"], exc)

    # ---- retention
    async def sweep(self, now: _dt.datetime | None = None) -> int:
        """Delete finished PipelineJobs older than the retention period; how many."""
        keep = _dt.timedelta(hours=self.settings.retention_hours)
        now = now or _dt.datetime.now(_dt.timezone.utc)
        deleted = 0
        for ns in (self.namespaces or [None]):
            for body in await self.list_pipelinejobs(ns):
                status = body.get("status") or {}
                done = status.get("completionTime")
                if status.get("phase") not in TERMINAL_PHASES or not done:
                    continue
                try:
                    finished = _dt.datetime.fromisoformat(str(done).replace("Z", "+00:00"))
                except ValueError:
                    continue
                if now - finished < keep:
                    continue
                meta = body["metadata"]
                try:
                    await self.custom.delete_namespaced_custom_object(
                        GROUP, VERSION, meta["namespace"], PIPELINEJOBS, meta["name"],
                        propagation_policy="Background")
                    deleted += 1
                    log.info("PipelineJob %s/%s: deleted after the retention period (%s)", meta["namespace"],
                             meta["name"], status.get("phase"))
                except self.ApiException as exc:
                    if exc.status != 404:
                        raise
        return deleted

    async def sweep_forever(self) -> None:
        interval = max(1.0, min(300.0, self.settings.retention_hours * 3600 / 4))
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - next round
                log.warning("retention sweep failed: %s", exc)
            await asyncio.sleep(interval)


# --------------------------------------------------------------------------- handlers


async def on_pipelinejob_event(event: dict[str, Any], body: Any, memo: Any, **_: Any) -> None:
    if event.get("type") == "DELETED" or getattr(memo, "runner", None) is None:
        return
    # type None: the initial listing (a restart) — re-check Jobs created before it.
    await memo.runner.ensure(dict(body), resume=event.get("type") is None)


async def on_job_event(event: dict[str, Any], body: Any, memo: Any, **_: Any) -> None:
    if getattr(memo, "runner", None) is None:
        return
    await memo.runner.on_job_event(dict(body), deleted=event.get("type") == "DELETED")


async def on_pipeline_event(event: dict[str, Any], body: Any, namespace: str, memo: Any, **_: Any) -> None:
    if event.get("type") == "DELETED" or getattr(memo, "runner", None) is None or not namespace:
        return
    await memo.runner.start_waiting(namespace, pipeline_id_of(dict(body)))


async def start_sweep(memo: Any, **_: Any) -> None:
    runner = getattr(memo, "runner", None)
    if runner is not None and runner.settings.retention_hours > 0:
        memo.sweep_task = asyncio.create_task(runner.sweep_forever(), name="pipelinejob-retention")


async def stop_sweep(memo: Any, **_: Any) -> None:
    task = getattr(memo, "sweep_task", None)
    if task is not None:
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001
            pass


def register(registry: kopf.OperatorRegistry) -> None:
    kopf.on.event(GROUP, VERSION, PIPELINEJOBS, id="run-pipelinejob", registry=registry)(on_pipelinejob_event)
    kopf.on.event("batch", "v1", "jobs", id="pipelinejob-status", labels={LABEL_COMPONENT: COMPONENT_PIPELINE},
                  registry=registry)(on_job_event)
    kopf.on.event(GROUP, VERSION, CLARAPIPELINES, id="start-waiting-jobs", registry=registry)(on_pipeline_event)
    kopf.on.startup(id="pipelinejob-retention", registry=registry)(start_sweep)
    kopf.on.cleanup(id="pipelinejob-retention-stop", registry=registry)(stop_sweep)
