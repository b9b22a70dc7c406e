"""One namespace's objects → the adapter configuration and each object's status.

Pure functions over plain dicts (the bodies the API returns), so the whole
reconcile decision is unit-testable without a cluster. The I/O lives in
``reconciler.py``.

Rules (SPEC §2):

* the cross-object verdicts come from :func:`clara_dicom.config.resolve`, the
  same function the adapter uses in local mode;
* an object whose current spec is invalid (schema or cross-object) but which
  has a *last valid version* (annotation ``dicom.clara.io/last-valid-spec``)
  keeps that version in the configuration until fixed; its Ready condition
  says so;
* a valid object is ``Ready=True`` only once the adapter has applied a
  configuration that contains its current version (``Pending`` until then);
  an object already Ready whose served version did not change stays Ready
  while unrelated changes roll out.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from clara_dicom.config import RenderedConfig, resolve
from clara_dicom.manifests import describe_validation_error
from clara_dicom.models import (
    API_VERSION,
    ClaraAETitle,
    ClaraDestination,
    ClaraPipeline,
    ClaraSource,
    JobProcessor,
    Resource,
)

from clara_operator.conditions import Cond, comparable, merge, transitions

DOMAIN = "dicom.clara.io"
LAST_VALID_ANNOTATION = f"{DOMAIN}/last-valid-spec"
CONFIG_VERSION_ANNOTATION = f"{DOMAIN}/config-version"
CONFIG_KEY = "config.json"
APPLIED_VERSION_KEY = "appliedVersion"
DESTINATION_PROBLEMS_KEY = "destinationProblems"  # written by the adapter's export agent (clara_adapter.k8s)

# Kinds rendered into the adapter configuration (PipelineJob/RegisterResults are not).
CONFIG_KINDS: tuple[type[Resource], ...] = (ClaraPipeline, ClaraSource, ClaraDestination, JobProcessor, ClaraAETitle)
KIND_BY_NAME = {cls.KIND: cls for cls in CONFIG_KINDS}


@dataclass
class ObjectPlan:
    kind: str
    name: str
    body: dict[str, Any]
    status: dict[str, Any]  # the desired status (complete, merge-patchable)
    status_changed: bool
    events: list[tuple[str, str, str]] = field(default_factory=list)
    # New value for the last-valid annotation, or None to leave it alone.
    last_valid: str | None = None
    valid: bool = False


@dataclass
class Plan:
    namespace: str
    config: RenderedConfig
    objects: list[ObjectPlan]

    @property
    def config_json(self) -> str:
        return self.config.to_json()

    def by_key(self) -> dict[tuple[str, str], ObjectPlan]:
        return {(o.kind, o.name): o for o in self.objects}


def spec_hash(spec: Any) -> str:
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _model_input(body: dict[str, Any], spec: Any) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    keep = {k: meta[k] for k in ("name", "namespace", "generation", "uid", "creationTimestamp") if k in meta}
    return {"apiVersion": API_VERSION, "kind": body.get("kind"), "metadata": keep, "spec": spec}


def parse(body: dict[str, Any], spec: Any = None) -> tuple[Resource | None, str | None]:
    """The model of ``body`` (or of ``body`` with another spec), or an error message."""
    cls = KIND_BY_NAME[body["kind"]]
    try:
        return cls.model_validate(_model_input(body, body.get("spec") if spec is None else spec)), None
    except ValidationError as exc:
        return None, describe_validation_error(exc)


def read_last_valid(body: dict[str, Any]) -> tuple[dict[str, Any] | None, int | None]:
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(LAST_VALID_ANNOTATION)
    if not raw:
        return None, None
    try:
        data = json.loads(raw)
        return data["spec"], data.get("generation")
    except (ValueError, KeyError, TypeError):
        return None, None


def encode_last_valid(spec: Any, generation: int | None) -> str:
    return json.dumps({"generation": generation, "spec": spec}, sort_keys=True, separators=(",", ":"))


def _served_spec(cfg: RenderedConfig, kind: str, name: str, model: Resource | None) -> Any | None:
    """The spec the configuration serves for this object, or None if it is not in it."""
    if kind == "ClaraAETitle":
        spec = cfg.aeTitles.get(name)
    elif kind == "JobProcessor":
        spec = cfg.processors.get(name)
    elif kind == "ClaraSource":
        spec = cfg.sources.get(name)
    elif kind == "ClaraDestination":
        spec = cfg.destinations.get(name)
    elif kind == "ClaraPipeline":
        if model is None or cfg.pipelines.get(model.pipeline_id) != name:  # type: ignore[attr-defined]
            return None
        spec = model.spec
    else:
        return None
    return None if spec is None else spec.model_dump(mode="json", by_alias=True)


def destination_problems(adapter_status: dict[str, str]) -> dict[str, str]:
    """{ClaraDestination name: why the export agent cannot serve it} from the adapter's
    status ConfigMap data; nothing when absent or unreadable."""
    try:
        problems = json.loads(adapter_status.get(DESTINATION_PROBLEMS_KEY) or "{}")
    except ValueError:
        return {}
    if not isinstance(problems, dict):
        return {}
    return {str(k): str(v) for k, v in problems.items()}


def _destination_served(conds: list[Cond], name: str, problems: Mapping[str, str] | None) -> list[Cond]:
    """A valid destination the export agent cannot serve is not Ready, and says why."""
    problem = next((m for n, m in (problems or {}).items() if n.lower() == name.lower()), None)
    if problem is None:
        return conds
    not_ready = Cond("Ready", False, "CannotServe", f"the export agent cannot serve this destination: {problem}")
    return [not_ready if c.type == "Ready" else c for c in conds]


def _ready_of(conds: list[Cond]) -> Cond | None:
    return next((c for c in conds if c.type == "Ready"), None)


def _from_config(conds) -> list[Cond]:
    return [Cond(c.type, c.status, c.reason, c.message) for c in conds]


def safe_validate_processor(spec: Any) -> tuple[str, str] | None:
    """:func:`clara_dicom.plugins.validate_processor_spec`, but a plug-in that fails
    to import is reported on the JobProcessor instead of breaking the reconcile.
    The built-in ``aetitle`` type has no settings of its own, so it stays valid
    even where the adapter package is not installed (e.g. an operator-only image)."""
    from clara_dicom.plugins import validate_processor_spec

    try:
        return validate_processor_spec(spec)
    except Exception as exc:  # noqa: BLE001 - any plug-in failure is the plug-in's
        if spec.type == "aetitle":
            return None
        return ("UnknownProcessorType", f"processor type {spec.type!r} could not be loaded: {exc}")


def plan(
    bodies: list[dict[str, Any]],
    namespace: str,
    applied_version: str | None = None,
    feedback: bool = True,
    validate_processor: Callable | None = None,
    now: str | None = None,
    destination_problems: Mapping[str, str] | None = None,
) -> Plan:
    """Decide the configuration and every object's status for one namespace.

    ``destination_problems``: ClaraDestination name -> why the adapter's export agent
    cannot serve it (e.g. a referenced Secret missing), as the adapter reports it; such
    a destination stays in the configuration but is not Ready (reason CannotServe)."""
    validate_processor = validate_processor or safe_validate_processor
    live = [b for b in bodies if b.get("kind") in KIND_BY_NAME and not (b.get("metadata") or {}).get(
        "deletionTimestamp")]
    live.sort(key=lambda b: (b["kind"], b["metadata"]["name"]))

    # Pass A: the current specs.
    current: dict[tuple[str, str], Resource] = {}
    schema_error: dict[tuple[str, str], str] = {}
    for body in live:
        key = (body["kind"], body["metadata"]["name"])
        model, error = parse(body)
        if model is None:
            schema_error[key] = error or "invalid spec"
        else:
            current[key] = model
    res_a = resolve(list(current.values()), namespace, validate_processor)

    def verdict_a(key: tuple[str, str]) -> Cond | None:
        if key in schema_error:
            return Cond("Ready", False, "InvalidSpec", f"spec is invalid: {schema_error[key]}")
        ready = res_a.ready((key[0], namespace, key[1]))
        return None if ready is None else Cond("Ready", ready.status, ready.reason, ready.message)

    # Pass B: invalid objects fall back to their last valid version.
    substituted: dict[tuple[str, str], int | None] = {}
    serving: dict[tuple[str, str], Resource] = dict(current)
    for body in live:
        key = (body["kind"], body["metadata"]["name"])
        verdict = verdict_a(key)
        if verdict is None or verdict.status:
            continue
        last_spec, last_gen = read_last_valid(body)
        if last_spec is None or last_spec == body.get("spec"):
            continue
        model, _ = parse(body, last_spec)
        if model is not None:
            serving[key] = model
            substituted[key] = last_gen
    res_b = resolve(list(serving.values()), namespace, validate_processor) if substituted else res_a
    cfg = res_b.config

    objects: list[ObjectPlan] = []
    for body in live:
        kind, name = key = (body["kind"], body["metadata"]["name"])
        meta = body.get("metadata") or {}
        generation = meta.get("generation")
        stored = body.get("status") or {}
        served = _served_spec(cfg, kind, name, serving.get(key))
        conds_b = _from_config(res_b.conditions.get((kind, namespace, name), []))
        conds_a = _from_config(res_a.conditions.get((kind, namespace, name), []))
        valid = False
        if key in schema_error and key not in substituted:
            conds = [verdict_a(key)]  # type: ignore[list-item]
        elif key in substituted:
            failure = verdict_a(key)
            assert failure is not None
            others = [c for c in conds_a if c.type != "Ready"]
            if served is not None:
                gen = substituted[key]
                where = f"generation {gen}" if gen is not None else "an earlier version"
                failure = Cond("Ready", False, failure.reason,
                               f"{failure.message}; the last valid version ({where}) is still served until this "
                               "is fixed")
            conds = [failure] + others
        else:
            conds = conds_b
            ready = _ready_of(conds)
            valid = bool(ready and ready.status)
            if valid and kind == "ClaraDestination":
                conds = _destination_served(conds, name, destination_problems)

        served_hash = spec_hash(served) if served is not None else None
        ready = _ready_of(conds)
        if valid and feedback and ready is not None:
            stored_ready = next((c for c in stored.get("conditions") or [] if c.get("type") == "Ready"), None)
            already = (stored_ready is not None and stored_ready.get("status") == "True"
                       and stored.get("servedHash") == served_hash)
            if not already and applied_version != cfg.version:
                pending = Cond("Ready", False, "Pending",
                               f"waiting for the adapter to apply configuration {cfg.version}")
                conds = [pending if c.type == "Ready" else c for c in conds]

        status: dict[str, Any] = {
            "observedGeneration": generation,
            "conditions": merge(conds, stored.get("conditions"), generation, now),
            "servedHash": served_hash,
            # The first configuration version that served this version of the object.
            "configVersion": ((stored.get("configVersion") if stored.get("servedHash") == served_hash else None)
                              or cfg.version) if served is not None else None,
        }
        spec = body.get("spec") or {}
        if kind == "JobProcessor":
            pipelines = spec.get("pipelines") if isinstance(spec.get("pipelines"), dict) else {}
            status["pipelines"] = ",".join(sorted(pipelines)) or None
        elif kind == "ClaraPipeline":
            status["pipelineId"] = spec.get("pipelineId") or meta.get("name")
        # Keys we manage; others in the stored status are left alone.
        want = {k: v for k, v in status.items() if v is not None}
        have = {k: stored.get(k) for k in status if stored.get(k) is not None}
        changed = comparable(want) != comparable(have)
        patch_status = dict(status)  # None values delete stale keys in a merge patch

        last_valid = None
        if valid:
            encoded = encode_last_valid(spec, generation)
            existing = (meta.get("annotations") or {}).get(LAST_VALID_ANNOTATION)
            if existing != encoded:
                last_valid = encoded
        objects.append(ObjectPlan(
            kind=kind, name=name, body=body, status=patch_status, status_changed=changed,
            events=transitions(conds, stored.get("conditions")) if changed else [],
            last_valid=last_valid, valid=valid,
        ))
    return Plan(namespace=namespace, config=cfg, objects=objects)
