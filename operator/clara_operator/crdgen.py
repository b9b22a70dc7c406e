"""CustomResourceDefinitions generated from the resource models (SPEC §2).

``clara_dicom.models`` is the single source of truth: each model's pydantic JSON
schema is converted into a *structural* ``openAPIV3Schema`` (no ``$ref``, no
``anyOf``/``null``, every field typed and described), with the models' CEL
rules as ``x-kubernetes-validations``. ``python -m clara_operator.crdgen``
writes ``crds/<plural>.yaml``; a test checks the committed files equal this
output so they cannot drift.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from clara_dicom.models import GROUP, RESOURCE_TYPES, VERSION, Resource

CATEGORIES = ["clara"]

# Fields whose model has no description yet (nested pipeline-definition keys
# and a few sub-objects). Keyed by the field's path under ``spec``; a model
# description always wins over this table.
FALLBACK_DESCRIPTIONS: dict[str, str] = {
    "ClaraDestination.tls.secretRef.name": "Name of a Secret in the same namespace.",
    "ClaraPipeline.definition.api-version": "Clara pipeline API version (e.g. 0.4.0).",
    "ClaraPipeline.definition.name": "Name of the pipeline definition.",
    "ClaraPipeline.definition.operators": "The pipeline's operators; they run in dependency order.",
    "ClaraPipeline.definition.operators[].name": "Operator name, unique in the pipeline (DNS label).",
    "ClaraPipeline.definition.operators[].description": "Free text describing the operator.",
    "ClaraPipeline.definition.operators[].container": "The operator's container.",
    "ClaraPipeline.definition.operators[].container.image": "Container image (without the tag).",
    "ClaraPipeline.definition.operators[].container.tag": "Image tag.",
    "ClaraPipeline.definition.operators[].container.command": "Command (entry point and arguments) to run.",
    "ClaraPipeline.definition.operators[].input": "Inputs: the job's payload (no 'from') or outputs of other "
    "operators.",
    "ClaraPipeline.definition.operators[].input[].from": "Operator whose output this is; absent (or a ${{...}} "
    "placeholder): the pipeline's input payload.",
    "ClaraPipeline.definition.operators[].input[].name": "Name of the output of the 'from' operator (default: "
    "its only output).",
    "ClaraPipeline.definition.operators[].input[].path": "Absolute path where the input is mounted (read-only).",
    "ClaraPipeline.definition.operators[].output": "Outputs the operator writes.",
    "ClaraPipeline.definition.operators[].output[].name": "Output name, referenced by other operators' inputs.",
    "ClaraPipeline.definition.operators[].output[].path": "Absolute path the operator writes this output to.",
    "ClaraPipeline.definition.operators[].requests": "Resources: gpu (count), memory and cpu.",
    "PipelineJob.source": "Where the instances came from.",
    "PipelineJob.group": "The group of instances this job covers.",
    "PipelineJob.payload": "The job's payload.",
    "RegisterResults.data[]": "One task's parameters (any JSON value).",
    "JobProcessor.pipelines.*": "Pipeline ID (a ClaraPipeline's pipelineId).",
}

# Maps whose values are free-form: unknown fields preserved (SPEC §2).
PRESERVE_UNKNOWN = {"JobProcessor.settings", "ClaraPipeline.definition", "RegisterResults.data[]"}

STATUS_DESCRIPTIONS = {
    "observedGeneration": "The metadata.generation the operator last reconciled.",
    "conditions": "Current state: Ready and, depending on the kind, PipelinesResolved or SourcesResolved.",
    "configVersion": "Version (content hash) of the adapter configuration that serves this object.",
    "servedHash": "Hash of the version of this object that the adapter configuration serves.",
}

KIND_STATUS: dict[str, dict[str, dict[str, Any]]] = {
    "JobProcessor": {
        "pipelines": {"type": "string", "description": "Pipeline keys of this processor, comma-separated."},
    },
    "ClaraPipeline": {
        "pipelineId": {"type": "string", "description": "The effective pipeline ID (spec.pipelineId or metadata.name)."},
    },
    "PipelineJob": {
        "phase": {"type": "string", "description": "Pending, Running, Succeeded or Failed."},
    },
    "RegisterResults": {
        "runs": {"type": "integer", "description": "Number of registration Jobs created."},
    },
}

CONDITION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "One aspect of the object's state (Kubernetes condition).",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string", "description": "Condition type, e.g. Ready."},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"],
                   "description": "True, False or Unknown."},
        "reason": {"type": "string", "description": "Machine-readable reason (CamelCase); see the operator README."},
        "message": {"type": "string", "description": "What is wrong and how to fix it."},
        "lastTransitionTime": {"type": "string", "format": "date-time",
                               "description": "When the status last changed."},
        "observedGeneration": {"type": "integer", "format": "int64",
                               "description": "The metadata.generation this condition was computed for."},
    },
}

_KEEP = ("type", "description", "default", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum",
         "exclusiveMinimum", "exclusiveMaximum", "minItems", "maxItems", "minProperties", "maxProperties",
         "required", "format")


class SchemaError(ValueError):
    pass


def _deref(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref (siblings such as description override the target's)."""
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        target.update(siblings)
        return target
    return node


def _drop_null(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [X, {type: null}]` (an Optional field) becomes X."""
    if "anyOf" in node:
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise SchemaError(f"cannot express a union in a structural schema: {node['anyOf']}")
        merged = dict(_deref(options[0], defs))
        merged.update({k: v for k, v in node.items() if k != "anyOf"})
        return merged
    return node


def convert(node: dict[str, Any], defs: dict[str, Any], path: str) -> dict[str, Any]:
    """One JSON-schema node → one structural schema node; ``path`` is 'Kind.field.sub[]...'."""
    node = _drop_null(_deref(node, defs), defs)
    out: dict[str, Any] = {}
    for key in _KEEP:
        if key in node and not (key == "default" and node[key] is None):
            out[key] = copy.deepcopy(node[key])
    if "description" not in out and path in FALLBACK_DESCRIPTIONS:
        out["description"] = FALLBACK_DESCRIPTIONS[path]
    kind = node.get("type")
    if kind == "object" or "properties" in node or "additionalProperties" in node or "patternProperties" in node:
        out["type"] = "object"
        props = node.get("properties") or {}
        if props:
            out["properties"] = {name: convert(sub, defs, f"{path}.{name}") for name, sub in props.items()}
        extra = node.get("additionalProperties")
        if "patternProperties" in node:
            ((key_pattern, value_schema),) = node["patternProperties"].items()
            out["additionalProperties"] = convert(value_schema, defs, f"{path}.*")
            out.setdefault("maxProperties", 64)
            out["x-kubernetes-validations"] = [{
                "rule": f"self.all(k, k.matches(r'{key_pattern}'))",
                "message": f"every key must match {key_pattern}",
            }]
        elif isinstance(extra, dict):
            out["additionalProperties"] = convert(extra, defs, f"{path}.*")
        elif extra is True or path in PRESERVE_UNKNOWN:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = convert(node.get("items") or {}, defs, f"{path}[]")
    elif kind is None:
        if path not in PRESERVE_UNKNOWN:
            raise SchemaError(f"{path}: field without a type")
        out["x-kubernetes-preserve-unknown-fields"] = True
    if path in PRESERVE_UNKNOWN:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def spec_schema(cls: type[Resource]) -> dict[str, Any]:
    spec_model = cls.model_fields["spec"].annotation
    raw = spec_model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.get("$defs", {})
    out = convert(raw, defs, cls.KIND)
    rules = getattr(spec_model, "cel_rules", None)
    if rules:
        out.setdefault("x-kubernetes-validations", []).extend(dict(r) for r in rules)
    return out


def status_schema(cls: type[Resource]) -> dict[str, Any]:
    props: dict[str, Any] = {
        "observedGeneration": {"type": "integer", "format": "int64",
                               "description": STATUS_DESCRIPTIONS["observedGeneration"]},
        "conditions": {"type": "array", "description": STATUS_DESCRIPTIONS["conditions"],
                       "items": CONDITION_SCHEMA,
                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        "configVersion": {"type": "string", "description": STATUS_DESCRIPTIONS["configVersion"]},
        "servedHash": {"type": "string", "description": STATUS_DESCRIPTIONS["servedHash"]},
    }
    props.update(copy.deepcopy(KIND_STATUS.get(cls.KIND, {})))
    return {
        "type": "object",
        "description": "Observed state, written by the operator (other fields are preserved).",
        "properties": props,
        "x-kubernetes-preserve-unknown-fields": True,
    }


def crd(cls: type[Resource]) -> dict[str, Any]:
    singular = cls.KIND.lower()
    spec = spec_schema(cls)
    spec["description"] = spec.get("description") or cls.DESCRIPTION
    schema = {
        "type": "object",
        "description": cls.DESCRIPTION,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{GROUP}/{VERSION}"},
            "kind": {"type": "string", "description": cls.KIND},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status_schema(cls),
        },
    }
    columns = [
        {"name": c["name"], "type": c["type"], "jsonPath": c["jsonPath"],
         **({"description": c["description"]} if "description" in c else {})}
        for c in cls.PRINTER_COLUMNS
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{cls.PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "clara-dicom"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": cls.KIND,
                "listKind": f"{cls.KIND}List",
                "plural": cls.PLURAL,
                "singular": singular,
                "shortNames": list(cls.SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    }


HEADER = "# Generated by `python -m clara_operator.crdgen` from clara_dicom/models.py. Do not edit.\n"


def render_all() -> dict[str, str]:
    """File name → YAML text, for every kind."""
    return {
        f"{cls.PLURAL}.yaml": HEADER + yaml.safe_dump(crd(cls), sort_keys=False, width=120, allow_unicode=True)
        for cls in RESOURCE_TYPES.values()
    }


def default_crds_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "crds"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_crds_dir(), help="folder to write (default: crds/)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the folder differs from the models")
    args = parser.parse_args(argv)
    files = render_all()
    if args.check:
        stale = [n for n, text in files.items()
                 if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python -m clara_operator.crdgen", file=sys.stderr)
            return 1
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
