"""PipelineJob → batch Job, and batch Job → PipelineJob status (SPEC §5).

:meth:`Runner.reconcile` is level-triggered: it reads the PipelineJob and its Job
and converges them from whatever state they are in — creates the Job (its name is
derived from the PipelineJob's, so a second create is AlreadyExists: a restarted
operator never duplicates a Job), writes a status that follows the Job, and, once
the run succeeded, has every RegisterResults that fires for it create its Job
(``results``, see registerresults.py). It raises when it has not converged (a
refused or failed request: the work queue retries it with backoff) after
writing *why* into the status (reason + the API's message) and an Event.

Which RegisterResults fire for a run is decided once, when its success is
written, and recorded in the same status write (``status.registerResults``:
name → uid, state Pending/Created/Waiting/Skipped, jobName); each entry turns
Created only after its Job exists. A restart or a failure resumes from that
record, so each RegisterResults runs exactly once per PipelineJob, even if its
Job is later deleted. Condition ``ResultsRegistered`` says how far it got.

Everything is recomputed from the API on every call, never from memory, and a
phase never goes backwards. Nothing here holds a PipelineJob's deletion.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from typing import Any, Protocol

from clara_operator.conditions import Cond, merge, now_rfc3339, transitions
from clara_operator.events import EventPoster, post_event_best_effort
from clara_operator.jobspec import (
    PHASE_RANK,
    TERMINAL_PHASES,
    JobSpecError,
    RunnerSettings,
    build_job,
    conditions_for,
    job_name,
    job_status,
    owner_of,
    select_pipeline,
)
from clara_operator.kube import CLARAPIPELINES, PIPELINEJOBS, Kube, refusal
from clara_operator.seen import Seen, brief_pipelinejob, trim_job
from clara_operator.workqueue import Retry

log = logging.getLogger("clara_operator.pipelines")
STATUS_KEYS = ("phase", "reason", "message", "jobName", "startTime", "completionTime", "failedOperator")
RESULTS_CONDITION = "ResultsRegistered"
# Entry states of status.registerResults that still have work to do.
OPEN_STATES = ("Pending", "Waiting")


class ResultsHook(Protocol):
    """What the runner asks of RegisterResults (registerresults.Registrar)."""

    async def plan(self, pipelinejob: dict[str, Any], job: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """The RegisterResults that fire for this success: name → {"uid", "state": "Pending"}."""

    async def fire(self, pipelinejob: dict[str, Any], job: dict[str, Any] | None, name: str,
                   entry: dict[str, Any]) -> dict[str, Any]:
        """Create the run's Job; the entry's next state. Raises if the API refused it."""


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for cond in status.get("conditions") or []:
        if isinstance(cond, dict) and cond.get("type") == ctype:
            return cond
    return None


def results_condition(record: dict[str, dict[str, Any]], errors: list[tuple[str, str, str]]) -> Cond:
    """ResultsRegistered from the record and this round's refused creates (name, reason, message)."""
    if errors:
        name, reason, message = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return Cond(RESULTS_CONDITION, False, reason, f"cannot create the Job of RegisterResults {name}{more}: "
                                                      f"{message}")
    waiting = sorted(n for n, e in record.items() if e.get("state") in OPEN_STATES)
    if waiting:
        entry = record[waiting[0]]
        return Cond(RESULTS_CONDITION, False, entry.get("reason") or "Pending",
                    f"RegisterResults {waiting[0]}: {entry.get('message') or 'its Job is not created yet'}")
    created = sorted(n for n, e in record.items() if e.get("state") == "Created")
    if not record:
        return Cond(RESULTS_CONDITION, True, "NoRegisterResults", "no RegisterResults fires for this run")
    return Cond(RESULTS_CONDITION, True, "Registered",
                f"{len(created)} register Job(s) created" + (f": {', '.join(created)}" if created else ""))


def needs_reconcile(pipelinejob: dict[str, Any], job: dict[str, Any] | None,
                    pipelines: list[dict[str, Any]] | None) -> bool:
    """Whether the stored state disagrees with the world (the resync's test; cheap, no API calls).

    ``job`` is the PipelineJob's Job if it exists; ``pipelines`` the namespace's ClaraPipelines."""
    meta = pipelinejob.get("metadata") or {}
    status = pipelinejob.get("status") or {}
    phase = status.get("phase")
    if meta.get("deletionTimestamp") or phase == "Failed":
        return False
    if phase == "Succeeded":
        cond = condition(status, RESULTS_CONDITION)
        return cond is None or cond.get("status") != "True"
    if job is None:
        if status.get("jobName"):
            return True  # deleted before it finished
        definition, reason, _ = select_pipeline(pipelines or [], str((pipelinejob.get("spec") or {}).get("pipeline")))
        return definition is not None or status.get("reason") != reason
    implied = job_status(job)
    return implied.get("phase") != phase or status.get("jobName") != implied.get("jobName")


class Runner:
    """Reconciles one PipelineJob at a time (see the module docstring)."""

    def __init__(self, kube: Kube, settings: RunnerSettings, results: ResultsHook | None = None,
                 post_event: EventPoster = post_event_best_effort, namespaces: list[str] | None = None) -> None:
        self.kube = kube
        self.settings = settings
        self.results = results
        self.post_event = post_event
        self.namespaces = namespaces  # None: every namespace (the retention sweep's scope)
        self.jobs_created = 0
        # Seconds after a create until the reconcile that writes the status (jobName, phase);
        # None: in the same reconcile (the controller sets it: it owns the queue that brings the key back).
        self.follow_delay: float | None = None
        self.seen = Seen()  # the latest watched PipelineJobs and Jobs (fed by the controller's triggers)
        # (namespace, name) → resourceVersion of our last status write: its watch event is no news.
        self.own_writes: dict[tuple[str, str], str] = {}
        # (namespace, name) → when a PipelineJob still without a Job was first seen (monotonic): the
        # "created Job" log line says how long it waited here, and where (queue, POST).
        self.seen_at: dict[tuple[str, str], float] = {}

    def noticed(self, namespace: str, name: str) -> None:
        """A watch event of this PipelineJob, which has no Job yet."""
        self.seen_at.setdefault((namespace, name), time.monotonic())

    # ---- the reconcile
    async def reconcile(self, namespace: str, name: str) -> float | None:
        """Converge one PipelineJob; returns after how many seconds it wants another reconcile
        (None: when something changes). A Job created now is followed by that next reconcile,
        not in this one: during a burst the worker goes on to the next create at once, and a
        Job that starts meanwhile costs one status write (Running) instead of two."""
        started = time.monotonic()
        body = self.seen.pipelinejobs.get((namespace, name)) or await self.kube.get(PIPELINEJOBS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        status = body.get("status") or {}
        if status.get("phase") == "Failed":
            self.forget(namespace, name)
            return None
        if status.get("phase") == "Succeeded":
            await self._register(body, None)
            return None
        job = self.seen.jobs.get((namespace, job_name(name)))
        if job is None and status.get("jobName"):
            job = await self.kube.get_job(namespace, job_name(name))  # not seen yet, or really gone?
        if job is None:
            if status.get("jobName"):
                await self._write(body, {"phase": "Failed", "reason": "JobDeleted",
                                         "message": f"Job {status['jobName']} was deleted before it finished",
                                         "completionTime": now_rfc3339()})
                return None
            job, created = await self._create(body, started)
            if job is None:
                return None
            if created and self.follow_delay is not None:
                return self.follow_delay
        fresh = await self._follow(body, job)
        if fresh is not None and (fresh.get("status") or {}).get("phase") == "Succeeded":
            await self._register(fresh, job)
        return None

    async def _create(self, body: dict[str, Any], started: float | None = None) -> tuple[dict[str, Any] | None, bool]:
        """The Job of this PipelineJob (None: it waits or failed; the status says why), and
        whether this call created it (False: it existed, AlreadyExists)."""
        meta, spec = body["metadata"], body.get("spec") or {}
        ns, name = meta["namespace"], meta["name"]
        definition, reason, message = select_pipeline(self.seen.pipelines_of(ns), str(spec.get("pipeline")))
        if definition is None:  # not seen (yet?): ask the API before saying so
            definition, reason, message = select_pipeline(await self.kube.list(CLARAPIPELINES, ns),
                                                          str(spec.get("pipeline")))
        if definition is None:  # waits: a ClaraPipeline event (or the resync) brings it back
            await self._write(body, {"phase": "Pending", "reason": reason, "message": message})
            return None, False
        try:
            manifest = build_job(body, definition, self.settings)
        except JobSpecError as exc:
            await self._write(body, {"phase": "Failed", "reason": exc.reason, "message": exc.message,
                                     "completionTime": now_rfc3339()})
            return None, False
        posted = time.monotonic()
        try:
            job = await self.kube.create_job(manifest)
        except Exception as exc:  # noqa: BLE001 - refused or unreachable: say why, then retry
            reason, message = refusal(exc)
            text = f"cannot create Job {manifest['metadata']['name']}: {message}"
            try:
                await self._write(body, {"phase": "Pending", "reason": reason, "message": text})
            except Exception as write_exc:  # noqa: BLE001 - the API may be down altogether
                log.debug("PipelineJob %s/%s: status not written: %s", ns, name, write_exc)
            raise Retry(f"{reason}: {message}") from None
        created = job is not None
        seen = self.seen_at.pop((ns, name), None)
        if job is None:  # AlreadyExists: ours from before a restart (or a name conflict, see _follow)
            job = await self.kube.get_job(ns, manifest["metadata"]["name"])
            if job is None:
                raise Retry(f"Job {manifest['metadata']['name']} exists and vanished", delay=1)
        else:
            self.jobs_created += 1
            self.seen.job(job)  # until its watch event arrives: no GET when the key comes back first
            now = time.monotonic()
            started = posted if started is None else started
            seen = started if seen is None else seen
            log.info("PipelineJob %s/%s: created Job %s (pipeline %s, priority %s) %.0f ms after the PipelineJob "
                     "was seen: %.0f ms queued, %.0f ms reconciling, %.0f ms POST", ns, name, job["metadata"]["name"],
                     spec.get("pipeline"), spec.get("priority"), 1000 * (now - seen), 1000 * max(0.0, started - seen),
                     1000 * (posted - started), 1000 * (now - posted))
        return job, created

    async def _follow(self, body: dict[str, Any], job: dict[str, Any]) -> dict[str, Any] | None:
        """Write the status the Job implies; the PipelineJob as stored afterwards."""
        ref = owner_of(job)
        if ref is None or ref.get("uid") != body["metadata"].get("uid"):
            return await self._write(body, {"phase": "Failed", "reason": "JobNameConflict",
                                            "message": f"a Job named {job['metadata']['name']} exists that this "
                                                       "PipelineJob does not own", "completionTime": now_rfc3339()})
        pods: list[dict[str, Any]] = []
        if any(c.get("type") == "Failed" and c.get("status") == "True"
               for c in (job.get("status") or {}).get("conditions") or []):
            try:
                pods = await self.kube.job_pods(job["metadata"]["namespace"], job["metadata"]["name"])
            except self.kube.ApiException as exc:
                log.warning("cannot list the pods of Job %s: %s", job["metadata"]["name"], exc.reason)
        desired = job_status(job, pods)
        stored_phase = (body.get("status") or {}).get("phase")
        record = None
        if desired.get("phase") == "Succeeded" and stored_phase != "Succeeded" and self.results is not None:
            record = await self.results.plan(body, job)  # decided once, written with the success
        return await self._write(body, desired, record=record)

    async def _write(self, body: dict[str, Any], desired: dict[str, Any],
                     record: dict[str, dict[str, Any]] | None = None) -> dict[str, Any] | None:
        """Write the status fields of ``desired`` (and a new results record) if they change anything;
        the PipelineJob as stored afterwards (None: it is gone)."""
        stored = body.get("status") or {}
        old_phase, new_phase = stored.get("phase"), desired.get("phase")
        if old_phase in TERMINAL_PHASES:
            return body
        if old_phase and PHASE_RANK.get(new_phase, 0) < PHASE_RANK.get(old_phase, 0):
            return body  # a stale view of the Job; phases never go backwards
        want = {k: desired.get(k) for k in STATUS_KEYS}
        if want.get("jobName") is None and stored.get("jobName"):
            want["jobName"] = stored["jobName"]
        have = {k: stored.get(k) for k in STATUS_KEYS}
        if want == have and record is None:
            return body
        generation = body["metadata"].get("generation")
        conds = [Cond(t, s, r, m) for t, s, r, m in conditions_for(want)]
        patch: dict[str, Any] = dict(want)  # None values delete stale keys
        if record is not None:
            patch["registerResults"] = record
            conds.append(results_condition(record, []))
        patch["conditions"] = merge(conds, stored.get("conditions"), generation)
        patch["observedGeneration"] = generation
        meta = body["metadata"]
        fresh = await self._patch(meta["namespace"], meta["name"], patch)
        if new_phase != old_phase or want.get("reason") != stored.get("reason"):
            event_type = "Warning" if new_phase == "Failed" or (
                new_phase == "Pending" and want.get("reason") != "JobCreated") else "Normal"
            event_reason = {"Succeeded": "Succeeded", "Failed": want.get("reason") or "Failed",
                            "Running": "Running"}.get(new_phase or "", want.get("reason") or "Pending")
            self.post_event(body, event_type, event_reason, want.get("message") or "")
            log.info("PipelineJob %s/%s: %s (%s)", meta["namespace"], meta["name"], new_phase, want.get("reason"))
        return fresh

    # ---- RegisterResults of a succeeded run
    async def _register(self, body: dict[str, Any], job: dict[str, Any] | None) -> None:
        """Every RegisterResults recorded as firing for this run gets its Job, exactly once."""
        if self.results is None:
            return
        meta, status = body["metadata"], body.get("status") or {}
        ns = meta["namespace"]
        cond = condition(status, RESULTS_CONDITION)
        record = status.get("registerResults")
        if cond is not None and cond.get("status") == "True" and isinstance(record, dict):
            self.forget(ns, meta["name"])
            return
        if (job is None or "spec" not in job) and status.get("jobName"):
            job = await self.kube.get_job(ns, status["jobName"])  # the whole Job: its outputs
        if not isinstance(record, dict):
            # Succeeded before this record existed (or its status was lost): decide now, from the
            # run's success time; Jobs that exist already are found by their deterministic names.
            record = await self.results.plan(body, job)
            fresh = await self._write_results(body, record, results_condition(record, []))
            if fresh is None:
                return
            body = fresh
        updates: dict[str, dict[str, Any]] = {}
        errors: list[tuple[str, str, str]] = []
        for rr_name, entry in sorted(record.items()):
            if entry.get("state") not in OPEN_STATES:
                continue
            try:
                new = await self.results.fire(body, job, rr_name, entry)
            except Retry:
                raise
            except Exception as exc:  # noqa: BLE001 - refused: recorded, retried
                errors.append((rr_name, *refusal(exc)))
                continue
            if new != entry:
                updates[rr_name] = {k: new.get(k) for k in set(entry) | set(new)}  # None deletes a key
        merged = {n: {k: v for k, v in {**e, **updates.get(n, {})}.items() if v is not None}
                  for n, e in record.items()}
        cond_now = results_condition(merged, errors)
        if updates or cond is None or (cond.get("status"), cond.get("reason"), cond.get("message")) != (
                "True" if cond_now.status else "False", cond_now.reason, cond_now.message):
            await self._write_results(body, updates, cond_now)
        if errors:
            raise Retry(f"{errors[0][1]}: {errors[0][2]}")

    async def _write_results(self, body: dict[str, Any], record_patch: dict[str, Any], cond: Cond
                             ) -> dict[str, Any] | None:
        meta, stored = body["metadata"], body.get("status") or {}
        generation = meta.get("generation")
        others = [Cond(c["type"], c.get("status") == "True", c.get("reason", ""), c.get("message", ""))
                  for c in stored.get("conditions") or [] if isinstance(c, dict) and c.get("type") != cond.type]
        patch = {"registerResults": record_patch, "conditions": merge(others + [cond], stored.get("conditions"),
                                                                       generation)}
        fresh = await self._patch(meta["namespace"], meta["name"], patch)
        for event_type, reason, message in transitions([cond], stored.get("conditions")):
            self.post_event(body, event_type, reason, message)
        return fresh

    async def _patch(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        fresh = await self.kube.patch_status(PIPELINEJOBS, namespace, name, patch)
        version = ((fresh or {}).get("metadata") or {}).get("resourceVersion")
        if version:
            self.own_writes[(namespace, name)] = version
            self.seen.pipelinejob(fresh)  # type: ignore[arg-type]
        else:
            self.forget(namespace, name)
        return fresh

    def is_own_write(self, body: dict[str, Any]) -> bool:
        """Is this PipelineJob exactly as our last status write left it (its watch event brings nothing new)?"""
        meta = body.get("metadata") or {}
        version = meta.get("resourceVersion")
        return version is not None and self.own_writes.get((meta.get("namespace"), meta.get("name"))) == version

    def forget(self, namespace: str, name: str) -> None:
        """Nothing more to do for this PipelineJob: drop what we keep of it and its Job."""
        self.own_writes.pop((namespace, name), None)
        self.seen_at.pop((namespace, name), None)
        self.seen.forget_pipelinejob(namespace, name)
        self.seen.forget_job(namespace, job_name(name))

    # ---- the resync
    async def out_of_step(self, namespace: str | None, watched_jobs: bool = False) -> list[tuple[str, str]]:
        """(namespace, name) of the PipelineJobs whose stored state disagrees with the world.

        ``watched_jobs``: the Jobs kept from the Job watch are complete (it has listed), so they
        are compared instead of listing every Job again (an informer's resync: at 5,000 Jobs a
        list is ~50 MB of JSON every round). PipelineJobs are listed, trimmed page by page."""
        from clara_operator.jobspec import COMPONENT_PIPELINE, LABEL_COMPONENT

        pjs, jobs, pipelines = await asyncio.gather(
            self.kube.list(PIPELINEJOBS, namespace, keep=brief_pipelinejob),
            _returns(list(self.seen.jobs.values())) if watched_jobs else
            self.kube.list_jobs(namespace, f"{LABEL_COMPONENT}={COMPONENT_PIPELINE}", keep=trim_job),
            self.kube.list(CLARAPIPELINES, namespace))
        by_job = {(j["metadata"]["namespace"], j["metadata"]["name"]): j for j in jobs}
        by_ns: dict[str, list[dict[str, Any]]] = {}
        for p in pipelines:
            by_ns.setdefault(p["metadata"]["namespace"], []).append(p)
        out = []
        for pj in pjs:
            meta = pj["metadata"]
            ns = meta["namespace"]
            if needs_reconcile(pj, by_job.get((ns, job_name(meta["name"]))), by_ns.get(ns, [])):
                out.append((ns, meta["name"]))
        return out

    # ---- retention
    async def sweep(self, now: _dt.datetime | None = None) -> int:
        """Delete finished PipelineJobs older than the retention period; how many."""
        keep = _dt.timedelta(hours=self.settings.retention_hours)
        now = now or _dt.datetime.now(_dt.timezone.utc)
        deleted = 0
        for ns in (self.namespaces or [None]):
            for body in await self.kube.list(PIPELINEJOBS, ns):
                status = body.get("status") or {}
                done = status.get("completionTime")
                if status.get("phase") not in TERMINAL_PHASES or not done:
                    continue
                cond = condition(status, RESULTS_CONDITION)
                if status.get("phase") == "Succeeded" and self.results is not None and \
                        (cond is None or cond.get("status") != "True"):
                    continue  # its results are not registered yet: keep it (its payload too)
                try:
                    finished = _dt.datetime.fromisoformat(str(done).replace("Z", "+00:00"))
                except ValueError:
                    continue
                if now - finished < keep:
                    continue
                meta = body["metadata"]
                await self.kube.delete(PIPELINEJOBS, meta["namespace"], meta["name"])
                deleted += 1
                log.info("PipelineJob %s/%s: deleted after the retention period (%s)", meta["namespace"],
                         meta["name"], status.get("phase"))
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


async def _returns(value: Any) -> Any:
    return value


__all__ = ["Runner", "ResultsHook", "needs_reconcile", "results_condition", "RESULTS_CONDITION"]
