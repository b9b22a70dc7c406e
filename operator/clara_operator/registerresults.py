"""RegisterResults (SPEC §2, §5): a succeeded PipelineJob of its pipeline → one batch Job
running ``register-results`` over the run's chosen outputs. See operator/REGISTER.md.

* ``pipelinejobs.on_succeeded`` hook: when a PipelineJob is seen turning Succeeded
  (before its status is written; again after a crash), every RegisterResults of its
  namespace and pipeline created no later than the run's success gets its Job. The
  Job's name is derived from (PipelineJob, RegisterResults), so a repeat is
  AlreadyExists: exactly one Job per pair, across restarts.
* every event of a RegisterResults: on its first sight (ADDED, the initial listing
  after a restart) or a spec change, catch up — PipelineJobs that succeeded after it
  was created and have no Job of it yet (the hook failed, or the inputs did not
  resolve then) get theirs; then its status (Ready, counters) is recomputed.
* every event of a register Job: its RegisterResults' counters are recomputed from
  the Jobs that exist (``registerjob.count_runs``), never incremented.
* every event of a ClaraPipeline: the Ready condition of the namespace's
  RegisterResults for that pipeline ID is recomputed.

Deleting a RegisterResults stops future runs only: its Jobs are owned by their
PipelineJob, not by it.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import weakref
from typing import Any

import kopf
from pydantic import ValidationError

from clara_dicom.manifests import describe_validation_error
from clara_dicom.models import GROUP, VERSION, RegisterResultsSpec

from clara_operator import pipelinejobs
from clara_operator.pipelinejobs import post_event_best_effort
from clara_operator.conditions import Cond, comparable, merge, transitions
from clara_operator.jobspec import (
    LABEL_COMPONENT,
    JobSpecError,
    label_value,
    payload_sub_path,
    pipeline_id_of,
    select_pipeline,
)
from clara_operator.registerjob import (
    ANNOTATION_REGISTERRESULTS,
    COMPONENT_REGISTER,
    LABEL_REGISTERRESULTS,
    build_register_job,
    count_runs,
    definition_outputs,
    fires,
    is_register_job_of,
    ready_condition,
    register_job_name,
    run_outputs,
    select_inputs,
    succeeded_at,
)

log = logging.getLogger("clara_operator.registerresults")
MERGE = "application/merge-patch+json"
REGISTERRESULTS = "registerresults"
UID_ANNOTATION = f"{GROUP}/registerresults-uid"
CREATE_ATTEMPTS = 4  # API errors while creating a Job: retried (1, 2, 4 s) before giving up to the catch-up


class Registrar:
    """The API calls of RegisterResults, on the PipelineJob runner's clients and settings."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self._locks: "weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock]" = weakref.WeakValueDictionary()
        self.jobs_created = 0

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        found = self._locks.get((namespace, name))
        if found is None:
            found = self._locks[(namespace, name)] = asyncio.Lock()
        return found

    # ---- reads
    async def list_registerresults(self, namespace: str) -> list[dict[str, Any]]:
        result = await self.runner.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, REGISTERRESULTS)
        return result.get("items", [])

    async def get_registerresults(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self.runner.custom.get_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                         REGISTERRESULTS, name)
        except self.runner.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    async def register_jobs(self, namespace: str, rr: dict[str, Any]) -> list[dict[str, Any]]:
        """The register Jobs of this RegisterResults (this very object: same uid)."""
        name, uid = rr["metadata"]["name"], rr["metadata"].get("uid")
        selector = f"{LABEL_COMPONENT}={COMPONENT_REGISTER},{LABEL_REGISTERRESULTS}={label_value(name)}"
        resp = await self.runner.batch.list_namespaced_job(namespace, label_selector=selector)
        jobs = self.runner._plain(resp).get("items", [])
        return [j for j in jobs if is_register_job_of(j, name)
                and ((j["metadata"].get("annotations") or {}).get(UID_ANNOTATION) or uid) == uid]

    # ---- runs
    async def on_pipelinejob_succeeded(self, pipelinejob: dict[str, Any], job: dict[str, Any]) -> None:
        ns = pipelinejob["metadata"]["namespace"]
        when = succeeded_at(job, pipelinejob)
        for rr in await self.list_registerresults(ns):
            if fires(rr, pipelinejob, when):
                try:
                    await self.ensure_run(rr, pipelinejob, job)
                except Exception:  # noqa: BLE001 - one RegisterResults never blocks another; catch-up retries
                    log.exception("RegisterResults %s/%s: no Job for PipelineJob %s", ns, rr["metadata"]["name"],
                                  pipelinejob["metadata"]["name"])

    async def ensure_run(self, rr: dict[str, Any], pipelinejob: dict[str, Any], job: dict[str, Any] | None
                         ) -> bool:
        """Create the register Job of (PipelineJob, RegisterResults) unless it exists; True if created."""
        ns, rr_name = rr["metadata"]["namespace"], rr["metadata"]["name"]
        pj_name = pipelinejob["metadata"]["name"]
        try:
            spec = RegisterResultsSpec.model_validate(rr.get("spec") or {})
        except ValidationError as exc:
            log.warning("RegisterResults %s/%s is invalid, no Job for %s: %s", ns, rr_name, pj_name,
                        describe_validation_error(exc))
            return False
        try:
            sub = payload_sub_path(((pipelinejob.get("spec") or {}).get("payload") or {}).get("path") or "",
                                   self.runner.settings)
            outputs = run_outputs(job, sub) if job else []
            if not outputs:  # the pipeline Job is gone (or made no outputs): the pipeline as it is now
                definition, _, _ = select_pipeline(await self.runner.list_pipelines(ns), spec.pipeline)
                outputs = definition_outputs(definition) if definition else []
            chosen = select_inputs(spec.inputs, outputs)
            manifest = build_register_job(rr, pipelinejob, chosen, self.runner.settings)
        except JobSpecError as exc:
            log.warning("RegisterResults %s/%s: no Job for PipelineJob %s: %s", ns, rr_name, pj_name, exc.message)
            post_event_best_effort(rr, "Warning", exc.reason, f"PipelineJob {pj_name}: {exc.message}")
            return False
        manifest["metadata"]["annotations"][UID_ANNOTATION] = str(rr["metadata"].get("uid") or "")
        name = manifest["metadata"]["name"]
        delay = 1.0
        for attempt in range(CREATE_ATTEMPTS):
            try:
                await self.runner.batch.create_namespaced_job(ns, manifest)
                break
            except self.runner.ApiException as exc:
                if exc.status == 409:
                    existing = await self.runner.get_job(ns, name)
                    if existing is not None and not is_register_job_of(existing, rr_name, pj_name):
                        log.warning("RegisterResults %s/%s: a Job named %s exists that is not its run for %s",
                                    ns, rr_name, name, pj_name)
                    return False
                if exc.status in (400, 403, 404, 422) or attempt == CREATE_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(delay)
                delay *= 2
        self.jobs_created += 1
        log.info("RegisterResults %s/%s: created Job %s for PipelineJob %s (agent %s, %d input(s))", ns, rr_name,
                 name, pj_name, spec.agent, len(chosen))
        post_event_best_effort(rr, "Normal", "RunCreated", f"Job {name} registers the results of PipelineJob {pj_name}")
        return True

    async def catch_up(self, rr: dict[str, Any]) -> int:
        """Jobs for PipelineJobs of its pipeline that succeeded since it exists and have none; how many."""
        meta = rr["metadata"]
        ns = meta["namespace"]
        if meta.get("deletionTimestamp"):
            return 0
        done = {(j["metadata"].get("annotations") or {}).get(f"{GROUP}/pipelinejob")
                for j in await self.register_jobs(ns, rr)}
        created = 0
        for pj in await self.runner.list_pipelinejobs(ns):
            status = pj.get("status") or {}
            if status.get("phase") != "Succeeded" or pj["metadata"]["name"] in done \
                    or pj["metadata"].get("deletionTimestamp"):
                continue
            if not fires(rr, pj, status.get("completionTime")):
                continue
            job = await self.runner.get_job(ns, status["jobName"]) if status.get("jobName") else None
            if await self.ensure_run(rr, pj, job):
                created += 1
        return created

    # ---- status
    async def refresh(self, namespace: str, name: str) -> None:
        """Recompute Ready and the run counters of one RegisterResults and write them if changed."""
        async with self.lock(namespace, name):
            rr = await self.get_registerresults(namespace, name)
            if rr is None or rr["metadata"].get("deletionTimestamp"):
                return
            spec = rr.get("spec") or {}
            stored = rr.get("status") or {}
            generation = rr["metadata"].get("generation")
            spec_error = None
            inputs: list[str] | None = spec.get("inputs")
            try:
                RegisterResultsSpec.model_validate(spec)
            except ValidationError as exc:
                spec_error = describe_validation_error(exc)
            pipeline_id = str(spec.get("pipeline") or "")
            definition, reason, message = select_pipeline(await self.runner.list_pipelines(namespace), pipeline_id)
            ready = Cond("Ready", *ready_condition(spec_error, pipeline_id, definition, reason, message, inputs))
            counts = count_runs(stored, await self.register_jobs(namespace, rr),
                                _dt.datetime.now(_dt.timezone.utc))
            desired = {**counts, "conditions": merge([ready], stored.get("conditions"), generation),
                       "observedGeneration": generation}
            if comparable({**stored, **desired}) == comparable(stored):
                return
            patch: dict[str, Any] = dict(desired)
            if "lastRun" not in counts and stored.get("lastRun"):
                patch["lastRun"] = stored["lastRun"]
            try:
                await self.runner.custom.patch_namespaced_custom_object_status(
                    GROUP, VERSION, namespace, REGISTERRESULTS, name, {"status": patch}, _content_type=MERGE)
            except self.runner.ApiException as exc:
                if exc.status != 404:
                    raise
                return
            for event_type, event_reason, text in transitions([ready], stored.get("conditions")):
                post_event_best_effort(rr, event_type, event_reason, text)

    async def refresh_for_pipeline(self, namespace: str, pipeline_id: str) -> None:
        for rr in await self.list_registerresults(namespace):
            if (rr.get("spec") or {}).get("pipeline") == pipeline_id:
                try:
                    await self.refresh(namespace, rr["metadata"]["name"])
                except Exception as exc:  # noqa: BLE001 - its own events retry it
                    log.warning("RegisterResults %s/%s: %s", namespace, rr["metadata"]["name"], exc)


def registrar(runner: Any) -> Registrar:
    found = getattr(runner, "registrar", None)
    if found is None:
        found = runner.registrar = Registrar(runner)
    return found


# --------------------------------------------------------------------------- handlers


async def on_succeeded(pipelinejob: dict[str, Any], job: dict[str, Any], runner: Any) -> None:
    await registrar(runner).on_pipelinejob_succeeded(pipelinejob, job)


async def on_registerresults_event(event: dict[str, Any], body: Any, memo: Any, **_: Any) -> None:
    runner = getattr(memo, "runner", None)
    if event.get("type") == "DELETED" or runner is None:
        return
    rr = dict(body)
    meta = rr["metadata"]
    reg = registrar(runner)
    first_sight = event.get("type") in (None, "ADDED")
    if first_sight or (rr.get("status") or {}).get("observedGeneration") != meta.get("generation"):
        created = await reg.catch_up(rr)
        if created:
            log.info("RegisterResults %s/%s: caught up %d run(s)", meta["namespace"], meta["name"], created)
    await reg.refresh(meta["namespace"], meta["name"])


async def on_register_job_event(body: Any, memo: Any, **_: Any) -> None:
    runner = getattr(memo, "runner", None)
    meta = body.get("metadata") or {}
    name = (meta.get("annotations") or {}).get(ANNOTATION_REGISTERRESULTS)
    if runner is None or not name:
        return
    await registrar(runner).refresh(meta["namespace"], name)


async def on_pipeline_event(body: Any, namespace: str, memo: Any, **_: Any) -> None:
    runner = getattr(memo, "runner", None)
    if runner is None or not namespace:
        return
    await registrar(runner).refresh_for_pipeline(namespace, pipeline_id_of(dict(body)))


def register(registry: kopf.OperatorRegistry) -> None:
    pipelinejobs.on_succeeded(on_succeeded)
    kopf.on.event(GROUP, VERSION, REGISTERRESULTS, id="registerresults", registry=registry)(
        on_registerresults_event)
    kopf.on.event("batch", "v1", "jobs", id="registerresults-status", labels={LABEL_COMPONENT: COMPONENT_REGISTER},
                  registry=registry)(on_register_job_event)
    kopf.on.event(GROUP, VERSION, "clarapipelines", id="registerresults-ready", registry=registry)(
        on_pipeline_event)


__all__ = ["Registrar", "register", "register_job_name"]
