"""RegisterResults (SPEC §2, §5): a succeeded PipelineJob of its pipeline → one batch Job
running ``register-results`` over the run's chosen outputs. See operator/REGISTER.md.

The PipelineJob runner (pipelinejobs.py) drives the runs through this module's
:class:`Registrar`, its ``results`` hook:

* :meth:`Registrar.plan` — when a run's success is written, which RegisterResults of
  its namespace and pipeline fire for it (created no later than the success); the
  runner records them on the PipelineJob (``status.registerResults``);
* :meth:`Registrar.fire` — creates the Job of one recorded (PipelineJob,
  RegisterResults) pair. The name is derived from both, so a repeat is AlreadyExists;
  together with the record, exactly one Job per pair, across restarts. A RegisterResults
  whose spec or inputs do not resolve leaves its entry ``Waiting`` (fixing it resumes it);
  one deleted (or replaced) before its run is ``Skipped``.

:meth:`Registrar.refresh` recomputes a RegisterResults' status (Ready, counters from the
register Jobs that exist, never incremented). Deleting a RegisterResults stops future
runs only: its Jobs are owned by their PipelineJob, not by it.
"""
from __future__ import annotations

import datetime as _dt
import logging
from typing import Any

from pydantic import ValidationError

from clara_dicom.manifests import describe_validation_error
from clara_dicom.models import GROUP, RegisterResultsSpec

from clara_operator.conditions import Cond, comparable, merge, transitions
from clara_operator.events import EventPoster, post_event_best_effort
from clara_operator.jobspec import (
    LABEL_COMPONENT,
    JobSpecError,
    RunnerSettings,
    label_value,
    payload_sub_path,
    select_pipeline,
)
from clara_operator.kube import CLARAPIPELINES, REGISTERRESULTS, Kube
from clara_operator.registerjob import (
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
from clara_operator.workqueue import Retry

log = logging.getLogger("clara_operator.registerresults")
UID_ANNOTATION = f"{GROUP}/registerresults-uid"


class Registrar:
    def __init__(self, kube: Kube, settings: RunnerSettings, post_event: EventPoster = post_event_best_effort
                 ) -> None:
        self.kube = kube
        self.settings = settings
        self.post_event = post_event
        self.jobs_created = 0

    async def register_jobs(self, namespace: str, rr: dict[str, Any]) -> list[dict[str, Any]]:
        """The register Jobs of this RegisterResults (this very object: same uid)."""
        name, uid = rr["metadata"]["name"], rr["metadata"].get("uid")
        selector = f"{LABEL_COMPONENT}={COMPONENT_REGISTER},{LABEL_REGISTERRESULTS}={label_value(name)}"
        jobs = await self.kube.list_jobs(namespace, selector)
        return [j for j in jobs if is_register_job_of(j, name)
                and ((j["metadata"].get("annotations") or {}).get(UID_ANNOTATION) or uid) == uid]

    # ---- runs (the runner's results hook)
    async def plan(self, pipelinejob: dict[str, Any], job: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        ns = pipelinejob["metadata"]["namespace"]
        when = succeeded_at(job, pipelinejob)
        return {rr["metadata"]["name"]: {"uid": rr["metadata"].get("uid"), "state": "Pending"}
                for rr in await self.kube.list(REGISTERRESULTS, ns) if fires(rr, pipelinejob, when)}

    async def fire(self, pipelinejob: dict[str, Any], job: dict[str, Any] | None, name: str,
                   entry: dict[str, Any]) -> dict[str, Any]:
        ns, pj_name = pipelinejob["metadata"]["namespace"], pipelinejob["metadata"]["name"]
        uid = entry.get("uid")
        rr = await self.kube.get(REGISTERRESULTS, ns, name)
        if rr is None or (uid and rr["metadata"].get("uid") != uid) or rr["metadata"].get("deletionTimestamp"):
            log.info("RegisterResults %s/%s was deleted before its run for PipelineJob %s", ns, name, pj_name)
            return {"uid": uid, "state": "Skipped", "message": "deleted before its run"}
        try:
            spec = RegisterResultsSpec.model_validate(rr.get("spec") or {})
        except ValidationError as exc:
            return self._waiting(rr, pj_name, entry, "InvalidSpec", describe_validation_error(exc))
        try:
            sub = payload_sub_path(((pipelinejob.get("spec") or {}).get("payload") or {}).get("path") or "",
                                   self.settings)
            outputs = run_outputs(job, sub) if job else []
            if not outputs:  # the pipeline Job is gone (or made no outputs): the pipeline as it is now
                definition, _, _ = select_pipeline(await self.kube.list(CLARAPIPELINES, ns), spec.pipeline)
                outputs = definition_outputs(definition) if definition else []
            chosen = select_inputs(spec.inputs, outputs)
            manifest = build_register_job(rr, pipelinejob, chosen, self.settings)
        except JobSpecError as exc:
            return self._waiting(rr, pj_name, entry, exc.reason, exc.message)
        manifest["metadata"]["annotations"][UID_ANNOTATION] = str(rr["metadata"].get("uid") or "")
        job_name = manifest["metadata"]["name"]
        created = await self.kube.create_job(manifest)  # a refusal raises: the runner records and retries it
        if created is None:  # AlreadyExists: created before a restart
            existing = await self.kube.get_job(ns, job_name)
            if existing is None:
                raise Retry(f"Job {job_name} exists and vanished", delay=1)
            if not is_register_job_of(existing, name, pj_name):
                log.warning("RegisterResults %s/%s: a Job named %s exists that is not its run for %s",
                            ns, name, job_name, pj_name)
                return {"uid": uid, "state": "Skipped", "message": f"a Job named {job_name} exists that is not "
                                                                   "its run"}
        else:
            self.jobs_created += 1
            log.info("RegisterResults %s/%s: created Job %s for PipelineJob %s (agent %s, %d input(s))", ns, name,
                     job_name, pj_name, spec.agent, len(chosen))
            self.post_event(rr, "Normal", "RunCreated", f"Job {job_name} registers the results of PipelineJob "
                                                        f"{pj_name}")
        return {"uid": uid, "state": "Created", "jobName": job_name}

    def _waiting(self, rr: dict[str, Any], pj_name: str, entry: dict[str, Any], reason: str, message: str
                 ) -> dict[str, Any]:
        """Not runnable as it is: waits for its spec (or the pipeline) to be fixed."""
        if (entry.get("state"), entry.get("reason")) != ("Waiting", reason):
            log.warning("RegisterResults %s/%s: no Job for PipelineJob %s: %s", rr["metadata"]["namespace"],
                        rr["metadata"]["name"], pj_name, message)
            self.post_event(rr, "Warning", reason, f"PipelineJob {pj_name}: {message}")
        return {"uid": entry.get("uid"), "state": "Waiting", "reason": reason, "message": message[:500]}

    # ---- status
    async def refresh(self, namespace: str, name: str) -> bool:
        """Recompute Ready and the run counters of one RegisterResults and write them if changed;
        True if its spec changed since the last write (runs waiting for it may now resolve)."""
        rr = await self.kube.get(REGISTERRESULTS, namespace, name)
        if rr is None or rr["metadata"].get("deletionTimestamp"):
            return False
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
        definition, reason, message = select_pipeline(await self.kube.list(CLARAPIPELINES, namespace), pipeline_id)
        ready = Cond("Ready", *ready_condition(spec_error, pipeline_id, definition, reason, message, inputs))
        counts = count_runs(stored, await self.register_jobs(namespace, rr), _dt.datetime.now(_dt.timezone.utc))
        desired = {**counts, "conditions": merge([ready], stored.get("conditions"), generation),
                   "observedGeneration": generation}
        spec_changed = stored.get("observedGeneration") != generation
        if comparable({**stored, **desired}) == comparable(stored):
            return spec_changed
        patch: dict[str, Any] = dict(desired)
        if "lastRun" not in counts and stored.get("lastRun"):
            patch["lastRun"] = stored["lastRun"]
        if await self.kube.patch_status(REGISTERRESULTS, namespace, name, patch) is None:
            return False
        for event_type, event_reason, text in transitions([ready], stored.get("conditions")):
            self.post_event(rr, event_type, event_reason, text)
        return spec_changed


__all__ = ["Registrar", "register_job_name", "UID_ANNOTATION"]
