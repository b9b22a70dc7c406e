"""RegisterResults: the pure decisions (no API calls), unit-tested in
tests/operator/test_registerjob.py; the I/O is in ``registerresults.py``.
See operator/REGISTER.md.

* :func:`fires` — does a RegisterResults fire for a PipelineJob that succeeded at
  a given time (it must have existed by then: never re-exports history);
* :func:`run_outputs` / :func:`definition_outputs` — the outputs of a run (read
  from the pipeline Job that ran it) or of a pipeline definition;
* :func:`select_inputs` — ``spec.inputs[]`` against those outputs;
* :func:`build_register_job` — the batch Job that runs ``register-results``;
* :func:`ready_condition` and :func:`count_runs` — the RegisterResults status.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import posixpath
from typing import Any

from clara_dicom.models import API_VERSION, GROUP, PipelineDefinition

from clara_operator.jobspec import (
    LABEL_COMPONENT,
    LABEL_MANAGED_BY,
    LABEL_PART_OF,
    LABEL_PIPELINE,
    POD_LABELS,
    MANAGED_BY,
    VOLUME,
    JobSpecError,
    RunnerSettings,
    _outputs,
    label_value,
    payload_sub_path,
    pod_spec,
    results_env,
    rfc3339,
)

COMPONENT_REGISTER = "register-results"
LABEL_REGISTERRESULTS = f"{GROUP}/registerresults"
LABEL_PIPELINEJOB = f"{GROUP}/pipelinejob"
# Full names (labels are cut to 63 characters; the annotations are what counts).
ANNOTATION_REGISTERRESULTS = f"{GROUP}/registerresults"
ANNOTATION_PIPELINEJOB = f"{GROUP}/pipelinejob"
CONTAINER = "register-results"
OPERATOR_PREFIX = "register-"  # CLARA_OPERATOR = register-<RegisterResults name>
JOB_NAME_MAX = 52
# On the register pod: the chart's NetworkPolicy lets pods with these labels reach the Results
# Service (values networkPolicy.pipelinePodLabels, together with part-of: clara-dicom).
BACKOFF_LIMIT = 2  # register-results is idempotent (jobId, operator, agent, element): a retry is harmless
# Finished Jobs older than this are folded into the stored totals (no new Job can share their second).
FOLD_AFTER = _dt.timedelta(seconds=5)

Output = tuple[str, str]  # (operator, output folder name)


def register_job_name(pipelinejob: str, registerresults: str) -> str:
    """Deterministic (a second create is AlreadyExists, never a second run), unambiguous
    (the hash is over both names), ≤ 52 characters."""
    digest = hashlib.sha256(f"{pipelinejob}\0{registerresults}".encode()).hexdigest()[:8]
    prefix = f"{pipelinejob}-{registerresults}"[:JOB_NAME_MAX - 9].rstrip("-.")
    return f"{prefix}-{digest}"


def _time(value: Any) -> _dt.datetime | None:
    text = rfc3339(value)
    if not text:
        return None
    try:
        return _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def succeeded_at(job: dict[str, Any] | None, pipelinejob: dict[str, Any] | None = None) -> str | None:
    """When the run succeeded: the Job's completionTime (else its Complete condition's time,
    else the PipelineJob's status.completionTime)."""
    status = (job or {}).get("status") or {}
    when = status.get("completionTime")
    if not when:
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Complete" and cond.get("status") == "True":
                when = cond.get("lastTransitionTime")
    if not when and pipelinejob is not None:
        when = (pipelinejob.get("status") or {}).get("completionTime")
    return rfc3339(when)


def fires(registerresults: dict[str, Any], pipelinejob: dict[str, Any], succeeded: str | None) -> bool:
    """Whether this RegisterResults fires for this succeeded PipelineJob: same namespace and
    pipeline ID, not being deleted, and created no later than the run's success (both times
    have one-second resolution; the same second counts as "existed")."""
    rmeta, pmeta = registerresults.get("metadata") or {}, pipelinejob.get("metadata") or {}
    if rmeta.get("deletionTimestamp") or rmeta.get("namespace") != pmeta.get("namespace"):
        return False
    if (registerresults.get("spec") or {}).get("pipeline") != (pipelinejob.get("spec") or {}).get("pipeline"):
        return False
    created, done = _time(rmeta.get("creationTimestamp")), _time(succeeded)
    return created is not None and done is not None and created <= done


# --------------------------------------------------------------------------- outputs and inputs


def run_outputs(job: dict[str, Any], sub: str) -> list[Output]:
    """The outputs of a run, from the pipeline Job's read-write mounts
    ``<sub>/operators/<op>/<output>`` (the definition as it was when the Job was made)."""
    pod = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    found: list[Output] = []
    prefix = posixpath.join(sub, "operators") + "/"
    for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        for mount in container.get("volumeMounts") or []:
            path = mount.get("subPath") or ""
            if mount.get("readOnly") or mount.get("name") != VOLUME or not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            if len(parts) == 2 and (parts[0], parts[1]) not in found:
                found.append((parts[0], parts[1]))
    return found


def definition_outputs(definition: PipelineDefinition) -> list[Output]:
    """Every (operator, output folder) of a pipeline definition, in execution order."""
    return [(op.name, out.rel.rsplit("/", 1)[-1]) for op in definition.execution_order() for out in _outputs(op)]


def select_inputs(inputs: list[str] | None, outputs: list[Output]) -> list[Output]:
    """``spec.inputs[]`` ('op' = every output of op, 'op/out' = that output; empty = every
    output) against the outputs of a run or pipeline. JobSpecError(InvalidInputs) when an
    entry names no operator/output there, or when there is nothing to scan."""
    if not inputs:
        if not outputs:
            raise JobSpecError("InvalidInputs", "the pipeline has no outputs to register")
        return list(outputs)
    chosen: list[Output] = []
    problems: list[str] = []
    operators = {op for op, _ in outputs}
    for entry in inputs:
        op, _, out = entry.partition("/")
        if out:
            match = [(o, n) for o, n in outputs if o == op and n == out]
            if not match:
                problems.append(f"{entry}: operator {op} has no output {out}" if op in operators
                                else f"{entry}: no operator {op}")
        else:
            match = [(o, n) for o, n in outputs if o == op]
            if not match:
                problems.append(f"{entry}: no operator {op} with outputs")
        chosen += [m for m in match if m not in chosen]
    if problems:
        known = ", ".join(f"{o}/{n}" for o, n in outputs) or "none"
        raise JobSpecError("InvalidInputs", f"inputs[] {'; '.join(problems)} (outputs: {known})"[:900])
    return chosen


# --------------------------------------------------------------------------- the Job


def build_register_job(registerresults: dict[str, Any], pipelinejob: dict[str, Any], outputs: list[Output],
                       settings: RunnerSettings) -> dict[str, Any]:
    """The batch/v1 Job that runs ``register-results`` over ``outputs`` of the PipelineJob's payload.

    Everything the pod needs is in its template: the command, the environment, the payload
    mounted read-only at /payload with subPath = the payload directory under the volume.
    """
    rmeta, pmeta = registerresults["metadata"], pipelinejob["metadata"]
    rr_name, pj_name = rmeta["name"], pmeta["name"]
    rspec, pspec = registerresults.get("spec") or {}, pipelinejob.get("spec") or {}
    payload = pspec.get("payload") or {}
    sub = payload_sub_path(payload.get("path") or "", settings)
    payload_id = posixpath.basename(posixpath.normpath(payload["path"]))
    root = posixpath.normpath(settings.pod_payload_root)
    pipeline = str(pspec.get("pipeline", ""))
    input_paths = [posixpath.join(root, "operators", op, out) for op, out in outputs]

    command = ["register-results", "--agent", str(rspec["agent"])]
    if rspec.get("data") is not None:
        command += ["--data", json.dumps(rspec["data"], separators=(",", ":"))]
    env = [
        {"name": "CLARA_JOB_ID", "value": pj_name},
        {"name": "CLARA_PIPELINE_ID", "value": pipeline},
        {"name": "CLARA_PAYLOAD_ID", "value": payload_id},
        {"name": "CLARA_PAYLOAD_ROOT", "value": root},
        {"name": "CLARA_OPERATOR", "value": f"{OPERATOR_PREFIX}{rr_name}"},
        {"name": "CLARA_INPUT_PATHS", "value": ":".join(input_paths)},
        *results_env(settings),
        {"name": "NVIDIA_CLARA_JOBID", "value": pj_name},
        {"name": "NVIDIA_CLARA_PIPELINEID", "value": pipeline},
        {"name": "NVIDIA_CLARA_PAYLOADID", "value": payload_id},
    ]
    container = {
        "name": CONTAINER,
        "image": settings.register_image or settings.prepare_image,
        "command": command,
        "env": env,
        "volumeMounts": [{"name": VOLUME, "mountPath": root, "subPath": sub, "readOnly": True}],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
    }
    pod = pod_spec(settings, pspec.get("priority"), [], [container])
    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: "clara-dicom",
        LABEL_COMPONENT: COMPONENT_REGISTER,
        LABEL_REGISTERRESULTS: label_value(rr_name),
        LABEL_PIPELINEJOB: label_value(pj_name),
        LABEL_PIPELINE: label_value(pipeline),
    }
    owner = {"apiVersion": API_VERSION, "kind": "PipelineJob", "name": pj_name, "uid": pmeta.get("uid"),
             "controller": True, "blockOwnerDeletion": True}
    template_meta: dict[str, Any] = {"labels": {**labels, **POD_LABELS}}
    if settings.pod_annotations:
        template_meta["annotations"] = dict(settings.pod_annotations)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": register_job_name(pj_name, rr_name),
            "namespace": pmeta.get("namespace"),
            "labels": labels,
            "annotations": {ANNOTATION_REGISTERRESULTS: rr_name, ANNOTATION_PIPELINEJOB: pj_name,
                            f"{GROUP}/registerresults-uid": str(rmeta.get("uid") or "")},
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": int(settings.active_deadline_seconds),
            "template": {"metadata": template_meta, "spec": pod},
        },
    }


def is_register_job_of(job: dict[str, Any], registerresults: str, pipelinejob: str | None = None) -> bool:
    meta = job.get("metadata") or {}
    ann = meta.get("annotations") or {}
    labels = meta.get("labels") or {}
    return (labels.get(LABEL_COMPONENT) == COMPONENT_REGISTER and ann.get(ANNOTATION_REGISTERRESULTS) == registerresults
            and (pipelinejob is None or ann.get(ANNOTATION_PIPELINEJOB) == pipelinejob))


# --------------------------------------------------------------------------- status


def ready_condition(spec_error: str | None, pipeline_id: str, definition: PipelineDefinition | None,
                    pipeline_reason: str, pipeline_message: str, inputs: list[str] | None
                    ) -> tuple[bool, str, str]:
    """(status, reason, message) of Ready."""
    if spec_error:
        return False, "InvalidSpec", spec_error
    if definition is None:
        if pipeline_reason == "PipelineNotFound":
            return False, "PipelineNotFound", (f"no ClaraPipeline with pipelineId {pipeline_id}; it fires for "
                                               "this pipeline's jobs that succeed once it exists")
        return False, pipeline_reason or "PipelineInvalid", pipeline_message
    try:
        chosen = select_inputs(inputs, definition_outputs(definition))
    except JobSpecError as exc:
        return False, exc.reason, exc.message + "; no Jobs are created until fixed"
    return True, "Ready", (f"registers {', '.join(f'{o}/{n}' for o, n in chosen)} of each succeeded "
                           f"{pipeline_id} job")[:900]


def _finished(job: dict[str, Any]) -> str | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in ("Complete", "Failed"):
            return "succeeded" if cond["type"] == "Complete" else "failed"
    return None


def _key(job: dict[str, Any]) -> str:
    meta = job.get("metadata") or {}
    return f"{rfc3339(meta.get('creationTimestamp')) or ''}|{meta.get('name', '')}"


def count_runs(stored: dict[str, Any] | None, jobs: list[dict[str, Any]], now: _dt.datetime
               ) -> dict[str, Any]:
    """The counters of a RegisterResults status from its register Jobs, recomputed (never
    incremented) so a restart or a repeated event cannot count twice, and monotonic although
    Jobs vanish with their PipelineJob (retention): finished Jobs older than FOLD_AFTER are
    folded into ``status.folded`` (totals + the (creationTimestamp|name) key of the last one
    folded), in creation order, up to the first unfinished Job; the counters are the folded
    totals plus the Jobs after that key."""
    stored = stored or {}
    folded = dict(stored.get("folded") or {})
    totals = {k: int(folded.get(k) or 0) for k in ("runs", "succeeded", "failed")}
    until = str(folded.get("until") or "")
    live = sorted((j for j in jobs if _key(j) > until), key=_key)
    for job in live:
        outcome = _finished(job)
        created = _time((job.get("metadata") or {}).get("creationTimestamp"))
        if outcome is None or created is None or now - created < FOLD_AFTER:
            break
        totals["runs"] += 1
        totals[outcome] += 1
        until = _key(job)
    rest = [j for j in live if _key(j) > until]
    out: dict[str, Any] = {
        "runs": totals["runs"] + len(rest),
        "succeeded": totals["succeeded"] + sum(1 for j in rest if _finished(j) == "succeeded"),
        "failed": totals["failed"] + sum(1 for j in rest if _finished(j) == "failed"),
        "active": sum(1 for j in rest if _finished(j) is None),
        "folded": {**totals, "until": until},
    }
    last = max(jobs, key=_key, default=None)
    if last is not None and (not stored.get("lastRun") or _key(last) >= "|".join(
            [str(stored["lastRun"].get("time") or ""), str(stored["lastRun"].get("jobName") or "")])):
        meta = last["metadata"]
        out["lastRun"] = {"jobName": meta["name"],
                          "pipelineJob": (meta.get("annotations") or {}).get(ANNOTATION_PIPELINEJOB),
                          "time": rfc3339(meta.get("creationTimestamp")),
                          "outcome": {"succeeded": "Succeeded", "failed": "Failed"}.get(_finished(last) or "",
                                                                                      "Running")}
    elif stored.get("lastRun"):
        out["lastRun"] = stored["lastRun"]
    return out
