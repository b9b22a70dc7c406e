"""PipelineJob + ClaraPipeline + runner settings → a batch/v1 Job manifest, and
batch Job → PipelineJob status. Pure functions over plain dicts (no API calls),
so the whole runner decision is unit-testable; the I/O is in ``pipelinejobs.py``.

The pod (see operator/PIPELINES.md):

* one volume ``payload``: the payload PVC (or a hostPath), always with
  ``subPath`` = the job's payload directory relative to the volume root;
* init container ``prepare-payload`` (our image) creates
  ``operators/<op>/<output>/`` for every output, so every mount source exists;
* the pipeline's operators in dependency order, as init containers, the last
  one as the main container; each gets
  - the whole payload directory read-only at ``CLARA_PAYLOAD_ROOT`` (``/payload``),
  - each input read-only at its declared path (payload inputs from ``input/``,
    the others from ``operators/<from>/<name>/``),
  - each output read-write at its declared path, from ``operators/<op>/<output>/``,
  - the SPEC §4 environment; ``CLARA_INPUT_PATHS`` names the inputs as seen
    under ``CLARA_PAYLOAD_ROOT`` (same directories as the declared paths), so
    register-results registers URIs relative to the payload directory.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from clara_dicom import DEFAULT_IMAGE
from clara_dicom.manifests import describe_validation_error
from clara_dicom.models import API_VERSION, GROUP, ClaraPipelineSpec, PipelineDefinition, PipelineOperator

MANAGED_BY = "clara-dicom-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
POD_LABELS = {"app.kubernetes.io/component": "pipeline"}  # pipeline and register pods
LABEL_COMPONENT = f"{GROUP}/component"
COMPONENT_PIPELINE = "pipeline-job"
LABEL_PIPELINE = f"{GROUP}/pipeline"
ANNOTATION_PIPELINEJOB = f"{GROUP}/pipelinejob"
ANNOTATION_CLARA_NAME = f"{GROUP}/clara-job-name"  # set by the adapter
LAST_VALID_ANNOTATION = f"{GROUP}/last-valid-spec"  # set by the reconciler (rendering.py)

JOB_NAME_MAX = 52  # leaves room for the Job controller's pod-name suffix and label limits
VOLUME = "payload"
PREPARE_CONTAINER = "prepare-payload"
DEFAULT_OUTPUT = "output"
GPU_RESOURCE = "nvidia.com/gpu"
TERMINAL_PHASES = ("Succeeded", "Failed")
PHASE_RANK = {"Pending": 0, "Running": 1, "Succeeded": 2, "Failed": 2}

# Creates the output folders (group-writable, setgid so fsGroup applies) before any operator starts.
PREPARE_SCRIPT = (
    "import os, sys\n"
    "for d in sys.argv[1:]:\n"
    "    new = not os.path.isdir(d)\n"
    "    os.makedirs(d, exist_ok=True)\n"
    "    if new:\n"
    "        try:\n"
    "            os.chmod(d, 0o2775)\n"
    "        except OSError:\n"
    "            pass\n"
)

_SAFE_DIR = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,252}$")


class JobSpecError(Exception):
    """The PipelineJob cannot be turned into a Job (a reason for status, and a message)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class RunnerSettings:
    """How pipeline pods are built (operator flags; see cli.py and PIPELINES.md)."""

    # Where the adapter sees the payload volume's root; spec.payload.path lies under it.
    payload_root: str = "/var/lib/clara-dicom"
    payload_pvc: str | None = "clara-dicom-payloads"
    payload_host_path: str | None = None  # instead of the PVC: this node directory is the volume root
    pod_payload_root: str = "/payload"  # CLARA_PAYLOAD_ROOT inside the pod
    prepare_image: str = DEFAULT_IMAGE
    register_image: str | None = None  # RegisterResults Jobs (registerjob.py); None: prepare_image
    results_url: str | None = None
    results_token_secret: str | None = None
    results_token_key: str = "token"
    image_pull_secrets: list[str] = field(default_factory=list)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    node_selector: dict[str, str] = field(default_factory=dict)
    pod_annotations: dict[str, str] = field(default_factory=dict)
    fs_group: int | None = None
    run_as_user: int | None = None
    run_as_non_root: bool = False
    service_account: str | None = None
    active_deadline_seconds: int = 600
    priority_class_prefix: str = "clara-dicom-"
    retention_hours: float = 24.0  # finished PipelineJobs (and their Jobs, by owner reference)


# --------------------------------------------------------------------------- names


def job_name(pipelinejob_name: str) -> str:
    """The Job's name: deterministic, so creating it again is AlreadyExists, never a duplicate."""
    if len(pipelinejob_name) <= JOB_NAME_MAX:
        return pipelinejob_name
    digest = hashlib.sha256(pipelinejob_name.encode()).hexdigest()[:10]
    return f"{pipelinejob_name[:JOB_NAME_MAX - 11].rstrip('-.')}-{digest}"


def label_value(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.") or "x"


def priority_class(priority: str | None, settings: RunnerSettings) -> str:
    return f"{settings.priority_class_prefix}{priority or 'normal'}"


# --------------------------------------------------------------------------- pipelines


def pipeline_id_of(body: dict[str, Any]) -> str:
    return ((body.get("spec") or {}).get("pipelineId") or (body.get("metadata") or {}).get("name") or "")


def select_pipeline(pipelines: list[dict[str, Any]], pipeline_id: str
                    ) -> tuple[PipelineDefinition | None, str, str]:
    """The definition a PipelineJob for ``pipeline_id`` runs, from the namespace's
    ClaraPipeline bodies: (definition, reason, message); definition None = wait.

    As in the adapter configuration: among ClaraPipelines claiming the same ID the
    earliest created holds it; an invalid edit falls back to the last valid version.
    """
    import json

    found = [b for b in pipelines if pipeline_id_of(b) == pipeline_id
             and not (b.get("metadata") or {}).get("deletionTimestamp")]
    if not found:
        return None, "PipelineNotFound", (f"no ClaraPipeline with pipelineId {pipeline_id}; "
                                          "the job starts when it is applied")
    found.sort(key=lambda b: (str(b["metadata"].get("creationTimestamp") or ""), b["metadata"].get("name", "")))
    problems = []
    for body in found:
        specs = [body.get("spec")]
        raw = ((body.get("metadata") or {}).get("annotations") or {}).get(LAST_VALID_ANNOTATION)
        if raw:
            try:
                specs.append(json.loads(raw)["spec"])
            except (ValueError, KeyError, TypeError):
                pass
        for i, spec in enumerate(specs):
            try:
                parsed = ClaraPipelineSpec.model_validate(spec)
            except ValidationError as exc:
                if i == 0:
                    problems.append(f"ClaraPipeline {body['metadata'].get('name')}: {describe_validation_error(exc)}")
                continue
            if (parsed.pipelineId or body["metadata"].get("name")) != pipeline_id:
                continue  # the last valid version had another ID
            return parsed.definition, "PipelineFound", f"ClaraPipeline {body['metadata'].get('name')}"
    return None, "PipelineInvalid", "; ".join(problems)[:900] + "; the job starts when it is fixed"


# --------------------------------------------------------------------------- the Job


@dataclass
class _Out:
    name: str
    path: str  # declared, in the container
    rel: str  # relative to the payload directory


def _outputs(op: PipelineOperator) -> list[_Out]:
    outs: list[_Out] = []
    unnamed = 0
    for out in op.output:
        name = out.name
        if not name:
            unnamed += 1
            name = DEFAULT_OUTPUT if unnamed == 1 else f"{DEFAULT_OUTPUT}-{unnamed}"
        if not _SAFE_DIR.match(name):
            raise JobSpecError("InvalidPipeline", f"operator {op.name}: output name {name!r} cannot be a folder name")
        outs.append(_Out(name, out.path, f"operators/{op.name}/{name}"))
    return outs


def _clean_path(op: str, path: str) -> str:
    norm = posixpath.normpath(path)
    if not norm.startswith("/") or norm == "/" or norm.startswith("//"):
        raise JobSpecError("InvalidPipeline", f"operator {op}: path {path!r} must be an absolute path other than /")
    return norm


def _nested(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _resources(op: PipelineOperator) -> dict[str, Any]:
    req = op.requests or {}
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}

    def number(key: str) -> float | None:
        value = req.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise JobSpecError("InvalidPipeline", f"operator {op.name}: requests.{key} must be a number ≥ 0")
        return value

    gpu = number("gpu")
    if gpu:
        if gpu != int(gpu):
            raise JobSpecError("InvalidPipeline", f"operator {op.name}: requests.gpu must be a whole number")
        limits[GPU_RESOURCE] = str(int(gpu))
    memory = req.get("memory")
    if isinstance(memory, str) and memory.strip():
        requests["memory"] = memory.strip()
    elif memory is not None:
        mb = number("memory")
        if mb:
            requests["memory"] = f"{int(mb)}Mi"  # Clara: megabytes
    cpu = req.get("cpu")
    if isinstance(cpu, str) and cpu.strip():
        requests["cpu"] = cpu.strip()
    elif cpu is not None:
        cores = number("cpu")
        if cores:
            requests["cpu"] = str(cores) if cores != int(cores) else str(int(cores))
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def payload_sub_path(payload_path: str, settings: RunnerSettings) -> str:
    root = posixpath.normpath(settings.payload_root)
    path = posixpath.normpath(payload_path or "")
    if not path.startswith("/"):
        raise JobSpecError("InvalidPayload", f"payload path {payload_path!r} is not absolute")
    rel = posixpath.relpath(path, root)
    if rel == "." or rel.startswith("../") or rel == "..":
        raise JobSpecError("InvalidPayload", f"payload path {payload_path} is not under the payload volume root "
                                             f"{settings.payload_root} (operator flag --payload-root)")
    return rel


def results_env(settings: RunnerSettings) -> list[dict[str, Any]]:
    """CLARA_RESULTS_URL and CLARA_RESULTS_TOKEN (a secretKeyRef, never a literal), as configured."""
    env: list[dict[str, Any]] = []
    if settings.results_url:
        env.append({"name": "CLARA_RESULTS_URL", "value": settings.results_url})
    if settings.results_token_secret:
        env.append({"name": "CLARA_RESULTS_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": settings.results_token_secret, "key": settings.results_token_key, "optional": True}}})
    return env


def payload_volume(settings: RunnerSettings) -> dict[str, Any]:
    if settings.payload_host_path:
        return {"name": VOLUME, "hostPath": {"path": settings.payload_host_path, "type": "Directory"}}
    if settings.payload_pvc:
        return {"name": VOLUME, "persistentVolumeClaim": {"claimName": settings.payload_pvc}}
    raise JobSpecError("NoPayloadVolume", "the operator has neither --payload-pvc nor --payload-host-path")


def pod_spec(settings: RunnerSettings, priority: str | None, init_containers: list[dict[str, Any]],
             containers: list[dict[str, Any]]) -> dict[str, Any]:
    """A pod spec with the payload volume and the operator's pod settings (security context,
    pull secrets, tolerations, node selector, service account, priority class)."""
    security: dict[str, Any] = {}
    if settings.fs_group is not None:
        security["fsGroup"] = settings.fs_group
        security["fsGroupChangePolicy"] = "OnRootMismatch"
    if settings.run_as_user is not None:
        security["runAsUser"] = settings.run_as_user
    if settings.run_as_non_root:
        security["runAsNonRoot"] = True
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "priorityClassName": priority_class(priority, settings),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
    }
    if init_containers:
        pod["initContainers"] = init_containers
    pod["containers"] = containers
    pod["volumes"] = [payload_volume(settings)]
    if security:
        pod["securityContext"] = security
    if settings.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    if settings.tolerations:
        pod["tolerations"] = [dict(t) for t in settings.tolerations]
    if settings.node_selector:
        pod["nodeSelector"] = dict(settings.node_selector)
    if settings.service_account:
        pod["serviceAccountName"] = settings.service_account
    return pod


def build_job(pipelinejob: dict[str, Any], definition: PipelineDefinition, settings: RunnerSettings
              ) -> dict[str, Any]:
    """The batch/v1 Job that runs ``definition`` over ``pipelinejob``'s payload."""
    meta = pipelinejob["metadata"]
    spec = pipelinejob.get("spec") or {}
    pj_name = meta["name"]
    payload = spec.get("payload") or {}
    sub = payload_sub_path(payload.get("path") or "", settings)
    payload_id = posixpath.basename(posixpath.normpath(payload["path"]))
    root = posixpath.normpath(settings.pod_payload_root)
    order = definition.execution_order()
    by_name = {op.name: op for op in order}
    outputs = {op.name: _outputs(op) for op in order}

    def mount(path: str, rel: str, read_only: bool) -> dict[str, Any]:
        return {"name": VOLUME, "mountPath": path, "subPath": posixpath.join(sub, rel) if rel else sub,
                "readOnly": read_only}

    containers: list[dict[str, Any]] = []
    for op in order:
        mounts = [mount(root, "", True)]
        input_paths: list[str] = []  # as seen under CLARA_PAYLOAD_ROOT
        clara_inputs: list[str] = []  # name:declared path
        for inp in op.input:
            if inp.is_payload:
                rel = "input"
            else:
                source = by_name[inp.from_]  # type: ignore[index]
                outs = outputs[source.name]
                named = inp.name is not None and not inp.name.startswith("${{")
                if named:
                    rel = next(o.rel for o in outs if o.name == inp.name)
                elif any(not o.name for o in source.output):
                    rel = next(o.rel for o, d in zip(outs, source.output) if not d.name)
                elif len(outs) == 1:
                    rel = outs[0].rel
                else:
                    rel = f"operators/{source.name}"  # every output, as sub-folders
            mounts.append(mount(_clean_path(op.name, inp.path), rel, True))
            input_paths.append(posixpath.join(root, rel))
            label = inp.name if inp.name and not inp.name.startswith("${{") else ""
            clara_inputs.append(f"{label}:{inp.path}")
        for out in outputs[op.name]:
            mounts.append(mount(_clean_path(op.name, out.path), out.rel, False))
        seen: set[str] = set()
        for m in mounts[1:]:
            if _nested(m["mountPath"], root):
                raise JobSpecError("InvalidPipeline", f"operator {op.name}: path {m['mountPath']} overlaps "
                                                      f"{root}, where the payload is mounted (CLARA_PAYLOAD_ROOT)")
            if m["mountPath"] in seen:
                raise JobSpecError("InvalidPipeline", f"operator {op.name}: path {m['mountPath']} is used twice")
            seen.add(m["mountPath"])
        mounts.sort(key=lambda m: m["mountPath"].count("/"))  # a parent before what is mounted inside it

        env = [
            {"name": "CLARA_JOB_ID", "value": pj_name},
            {"name": "CLARA_PIPELINE_ID", "value": str(spec.get("pipeline", ""))},
            {"name": "CLARA_PAYLOAD_ID", "value": payload_id},
            {"name": "CLARA_PAYLOAD_ROOT", "value": root},
            {"name": "CLARA_OPERATOR", "value": op.name},
            {"name": "CLARA_INPUT_PATHS", "value": ":".join(input_paths)},
        ]
        env += results_env(settings)
        env += [
            {"name": "NVIDIA_CLARA_JOBID", "value": pj_name},
            {"name": "NVIDIA_CLARA_JOBNAME", "value": (meta.get("annotations") or {}).get(ANNOTATION_CLARA_NAME)
             or pj_name},
            {"name": "NVIDIA_CLARA_PIPELINEID", "value": str(spec.get("pipeline", ""))},
            {"name": "NVIDIA_CLARA_PAYLOADID", "value": payload_id},
            {"name": "NVIDIA_CLARA_INPUTPATHS", "value": ";".join(clara_inputs)},
            {"name": "NVIDIA_CLARA_OUTPUTPATHS", "value": ";".join(f"{o.name}:{o.path}" for o in outputs[op.name])},
        ]
        image = op.container.image if not op.container.tag else f"{op.container.image}:{op.container.tag}"
        container: dict[str, Any] = {"name": op.name, "image": image, "env": env, "volumeMounts": mounts}
        if op.container.command:
            container["command"] = [str(c) for c in op.container.command]
        resources = _resources(op)
        if resources:
            container["resources"] = resources
        containers.append(container)

    prepare_name = PREPARE_CONTAINER
    while prepare_name in by_name:
        prepare_name = f"clara-{prepare_name}"
    out_dirs = [posixpath.join(root, o.rel) for op in order for o in outputs[op.name]]
    prepare = {
        "name": prepare_name,
        "image": settings.prepare_image,
        "command": ["python", "-c", PREPARE_SCRIPT, *out_dirs],
        "volumeMounts": [{"name": VOLUME, "mountPath": root, "subPath": sub}],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
    }

    labels = {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_PART_OF: "clara-dicom",
        LABEL_COMPONENT: COMPONENT_PIPELINE,
        LABEL_PIPELINE: label_value(str(spec.get("pipeline", ""))),
    }
    pod = pod_spec(settings, spec.get("priority"), [prepare, *containers[:-1]], containers[-1:])

    owner = {"apiVersion": API_VERSION, "kind": "PipelineJob", "name": pj_name, "uid": meta.get("uid"),
             "controller": True, "blockOwnerDeletion": True}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(pj_name),
            "namespace": meta.get("namespace"),
            "labels": labels,
            "annotations": {ANNOTATION_PIPELINEJOB: pj_name},
            "ownerReferences": [owner],
        },
        "spec": {
            "backoffLimit": 0,  # a pipeline run is not blindly retried
            # ...but a pod preempted, evicted or lost with its node did not fail: it runs again
            # (without this, a higher-priority burst fails the lower-priority runs it preempts).
            "podFailurePolicy": {"rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}]},
            "completions": 1,
            "parallelism": 1,
            "activeDeadlineSeconds": int(settings.active_deadline_seconds),
            # Pods also carry POD_LABELS: the chart's NetworkPolicy lets them reach the Results Service.
            "template": {"metadata": {"labels": {**labels, **POD_LABELS}, **(
                {"annotations": dict(settings.pod_annotations)} if settings.pod_annotations else {})},
                "spec": pod},
        },
    }


# --------------------------------------------------------------------------- status


def owner_of(job: dict[str, Any]) -> dict[str, Any] | None:
    """The PipelineJob owner reference of a Job we created."""
    for ref in (job.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("kind") == "PipelineJob" and ref.get("apiVersion", "").startswith(f"{GROUP}/"):
            return ref
    return None


def _condition(job: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    for cond in (job.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype and cond.get("status") == "True":
            return cond
    return None


def failed_container(pods: list[dict[str, Any]]) -> tuple[str, int, str] | None:
    """(container, exit code, reason/message) of the first operator that failed in the Job's pods."""
    for pod in pods:
        status = pod.get("status") or {}
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            term = (cs.get("state") or {}).get("terminated") or {}
            code = term.get("exitCode")
            if code:
                detail = term.get("reason") or ""
                if term.get("message"):
                    detail = f"{detail}: {term['message']}" if detail else term["message"]
                return cs.get("name", "?"), int(code), detail
    return None


def rfc3339(value: Any) -> str | None:
    """A time as the API writes it (2024-01-02T03:04:05Z), whatever form a client gave it in."""
    import datetime as _dt

    if not value:
        return None
    try:
        parsed = _dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=_dt.timezone.utc)
    return parsed.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def job_status(job: dict[str, Any], pods: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The PipelineJob status fields a Job implies: phase, reason, message, times, jobName."""
    out = _job_status(job, pods)
    for key in ("startTime", "completionTime"):
        out[key] = rfc3339(out.get(key))
    return out


def _job_status(job: dict[str, Any], pods: list[dict[str, Any]] | None) -> dict[str, Any]:
    name = job["metadata"]["name"]
    st = job.get("status") or {}
    out: dict[str, Any] = {"jobName": name, "startTime": st.get("startTime")}
    complete, failed = _condition(job, "Complete"), _condition(job, "Failed")
    if complete:
        out.update(phase="Succeeded", reason="Completed", message=f"Job {name} completed",
                   completionTime=st.get("completionTime") or complete.get("lastTransitionTime"))
    elif failed:
        reason = failed.get("reason") or "Failed"
        message = failed.get("message") or f"Job {name} failed"
        culprit = failed_container(pods or [])
        if culprit and reason != "DeadlineExceeded":
            reason = "OperatorFailed"
            message = f"operator {culprit[0]} exited with code {culprit[1]}" + (
                f" ({culprit[2]})" if culprit[2] else "") + f"; Job {name}: {failed.get('message') or 'failed'}"
            out["failedOperator"] = culprit[0]
        out.update(phase="Failed", reason=reason, message=message[:1000],
                   completionTime=failed.get("lastTransitionTime"))
    elif st.get("active") or st.get("ready") or st.get("succeeded") or st.get("failed"):
        out.update(phase="Running", reason="Running", message=f"Job {name} is running")
    else:
        out.update(phase="Pending", reason="JobCreated", message=f"Job {name} created; waiting for its pod")
    return out


def conditions_for(status: dict[str, Any]) -> list[tuple[str, bool, str, str]]:
    """(type, status, reason, message) conditions of a PipelineJob status."""
    phase, reason, message = status.get("phase"), status.get("reason", ""), status.get("message", "")
    has_job = bool(status.get("jobName"))
    conds = [("JobCreated", has_job, "JobCreated" if has_job else reason,
              f"Job {status['jobName']}" if has_job else message)]
    if phase == "Succeeded":
        conds.append(("Succeeded", True, reason, message))
    elif phase == "Failed":
        conds.append(("Succeeded", False, reason, message))
    return conds


__all__ = ["RunnerSettings", "JobSpecError", "build_job", "job_name", "job_status", "select_pipeline",
           "priority_class", "owner_of", "conditions_for", "TERMINAL_PHASES", "PHASE_RANK"]
