"""The adapter's rendered configuration, and the cross-object rules that decide
what goes into it.

Both the operator (to set conditions and render the ConfigMap) and the adapter
in local mode (to load a folder of manifests) call :func:`resolve`, so the two
modes can never disagree about which AE titles are served.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

from pydantic import BaseModel, Field

from clara_dicom.models import (
    ClaraAETitle,
    ClaraAETitleSpec,
    ClaraDestination,
    ClaraDestinationSpec,
    ClaraPipeline,
    ClaraSource,
    ClaraSourceSpec,
    JobProcessor,
    JobProcessorSpec,
    Resource,
)


class RenderedConfig(BaseModel):
    """What the adapter runs: valid, resolved objects of one namespace, by object name."""

    version: str = ""
    namespace: str = "default"
    aeTitles: dict[str, ClaraAETitleSpec] = Field(default_factory=dict)
    processors: dict[str, JobProcessorSpec] = Field(default_factory=dict)
    sources: dict[str, ClaraSourceSpec] = Field(default_factory=dict)
    destinations: dict[str, ClaraDestinationSpec] = Field(default_factory=dict)
    # pipelineId -> ClaraPipeline object name (pipelines that exist)
    pipelines: dict[str, str] = Field(default_factory=dict)

    def content_hash(self) -> str:
        body = self.model_dump(mode="json", exclude={"version"})
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def with_version(self) -> "RenderedConfig":
        return self.model_copy(update={"version": self.content_hash()})

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "RenderedConfig":
        return cls.model_validate_json(text)

    # -- lookups the adapter needs on the hot path are precomputed by callers;
    #    these are for the export agent and tests.
    def destination(self, name: str) -> ClaraDestinationSpec | None:
        """Destinations are looked up by name, case-insensitively (SPEC §2)."""
        wanted = name.strip().lower()
        for key, spec in self.destinations.items():
            if key.lower() == wanted:
                return spec
        return None


@dataclass
class Condition:
    type: str
    status: bool
    reason: str
    message: str

    def as_k8s(self) -> dict[str, str]:
        return {"type": self.type, "status": "True" if self.status else "False", "reason": self.reason,
                "message": self.message}


@dataclass
class Resolution:
    config: RenderedConfig
    # (kind, namespace, name) -> conditions for that object
    conditions: dict[tuple[str, str, str], list[Condition]] = field(default_factory=dict)

    def ready(self, key: tuple[str, str, str]) -> Condition | None:
        for cond in self.conditions.get(key, []):
            if cond.type == "Ready":
                return cond
        return None


# Returns None when the processor's type and settings are usable, else a reason
# ("UnknownProcessorType" / "InvalidSettings") and a message.
ProcessorValidator = Callable[[JobProcessorSpec], "tuple[str, str] | None"]


def _creation_order(res: Resource, index: int) -> tuple[str, int]:
    stamp = (res.metadata.model_extra or {}).get("creationTimestamp") or ""
    return (str(stamp), index)


def resolve(
    resources: list[Resource], namespace: str = "default", validate_processor: ProcessorValidator | None = None
) -> Resolution:
    """Apply the cross-object rules of SPEC §2 to already schema-valid objects."""
    if validate_processor is None:
        from clara_dicom.plugins import validate_processor_spec as validate_processor

    objs = [r for r in resources if r.metadata.namespace == namespace]
    cfg = RenderedConfig(namespace=namespace)
    res = Resolution(config=cfg)

    pipes = [(r, i) for i, r in enumerate(objs) if isinstance(r, ClaraPipeline)]
    pipes.sort(key=lambda pair: _creation_order(*pair))
    for pipe, _ in pipes:
        if pipe.pipeline_id in cfg.pipelines:  # the earlier one keeps the ID, as for AE titles
            res.conditions[pipe.key] = [Condition("Ready", False, "Conflict",
                                                  f"pipelineId {pipe.pipeline_id} is already provided by "
                                                  f"ClaraPipeline {cfg.pipelines[pipe.pipeline_id]}")]
            continue
        cfg.pipelines[pipe.pipeline_id] = pipe.metadata.name
        res.conditions[pipe.key] = [Condition("Ready", True, "Valid", f"pipeline {pipe.pipeline_id} is available")]

    for src in (r for r in objs if isinstance(r, ClaraSource)):
        cfg.sources[src.metadata.name] = src.spec
        res.conditions[src.key] = [Condition("Ready", True, "Valid", "source is known to the adapter")]
    for dst in (r for r in objs if isinstance(r, ClaraDestination)):
        cfg.destinations[dst.metadata.name] = dst.spec
        res.conditions[dst.key] = [Condition("Ready", True, "Valid", "destination is known to the adapter")]

    processor_problem: dict[str, tuple[str, str]] = {}
    for proc in (r for r in objs if isinstance(r, JobProcessor)):
        problem = validate_processor(proc.spec)
        conds = []
        if problem is None:
            cfg.processors[proc.metadata.name] = proc.spec
            conds.append(Condition("Ready", True, "Valid", "processor is valid"))
        else:
            processor_problem[proc.metadata.name] = problem
            conds.append(Condition("Ready", False, problem[0], problem[1]))
        missing = sorted({pid for pid in proc.spec.pipelines.values() if pid not in cfg.pipelines})
        if missing:
            conds.append(Condition("PipelinesResolved", False, "PipelineNotFound",
                                   f"no ClaraPipeline with pipelineId {', '.join(missing)}; "
                                   "jobs wait (Pending) until it is applied"))
        else:
            conds.append(Condition("PipelinesResolved", True, "Resolved", "every pipeline exists"))
        res.conditions[proc.key] = conds

    aets = [(r, i) for i, r in enumerate(objs) if isinstance(r, ClaraAETitle)]
    aets.sort(key=lambda pair: _creation_order(*pair))
    holder: dict[str, str] = {}  # AE title value -> object name that holds it
    for aet, _ in aets:
        spec = aet.spec
        if spec.processor in processor_problem:
            reason, message = processor_problem[spec.processor]
            cond = Condition("Ready", False, "ProcessorInvalid",
                             f"JobProcessor {spec.processor} is not valid ({reason}: {message})")
        elif spec.processor not in cfg.processors:
            cond = Condition("Ready", False, "ProcessorNotFound",
                             f"JobProcessor {spec.processor} does not exist in namespace {namespace}; create it")
        elif spec.aeTitle in holder:
            cond = Condition("Ready", False, "Conflict",
                             f"AE title {spec.aeTitle} is already served by ClaraAETitle {holder[spec.aeTitle]}")
        else:
            holder[spec.aeTitle] = aet.metadata.name
            cfg.aeTitles[aet.metadata.name] = spec
            cond = Condition("Ready", True, "Valid", f"AE title {spec.aeTitle} is served")
        conds = [cond]
        unknown = sorted(s for s in spec.allowedSources if s not in cfg.sources)
        if unknown:
            conds.append(Condition("SourcesResolved", False, "SourceNotFound",
                                   f"allowedSources names no ClaraSource: {', '.join(unknown)}"))
        else:
            conds.append(Condition("SourcesResolved", True, "Resolved", "every allowed source exists"))
        res.conditions[aet.key] = conds

    res.config = cfg.with_version()
    return res
