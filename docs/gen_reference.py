#!/usr/bin/env python3
"""Generate docs/reference.md, the configuration reference, from crds/*.yaml and
the components' settings classes (the settings and environment-variable table).

    python docs/gen_reference.py            # rewrite docs/reference.md
    python docs/gen_reference.py --check    # exit 1 if docs/reference.md is stale

The CRDs are themselves generated from clara_dicom/models.py
(`python -m clara_operator.crdgen`), so the chain is models -> CRDs -> this page;
tests/test_docs.py checks the committed page equals this script's output.
The settings table comes from the settings classes themselves
(clara_dicom.settings and each component's), so it cannot drift from the code.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

REPO = Path(__file__).resolve().parents[1]
CRDS = REPO / "crds"
OUT = REPO / "docs" / "reference.md"

# Order of the page: configuration kinds first, then what the system creates.
ORDER = ["ClaraAETitle", "JobProcessor", "ClaraSource", "ClaraDestination", "ClaraPipeline", "RegisterResults",
         "PipelineJob"]


def load() -> list[dict[str, Any]]:
    crds = [yaml.safe_load(p.read_text()) for p in sorted(CRDS.glob("*.yaml"))]
    rank = {k: i for i, k in enumerate(ORDER)}
    return sorted(crds, key=lambda c: (rank.get(c["spec"]["names"]["kind"], len(ORDER)), c["spec"]["names"]["kind"]))


def anchor(kind: str) -> str:
    return kind.lower()


def cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def type_of(s: dict[str, Any]) -> str:
    if "type" not in s:
        if s.get("x-kubernetes-int-or-string"):
            return "integer or string"
        if s.get("x-kubernetes-preserve-unknown-fields"):
            return "any"
        if "anyOf" in s or "oneOf" in s:
            return " or ".join(sorted({type_of(x) for x in s.get("anyOf", s.get("oneOf", []))}))
        return "any"
    t = s["type"]
    if t == "array":
        return f"array of {type_of(s.get('items') or {})}"
    if t == "object" and isinstance(s.get("additionalProperties"), dict):
        return f"map of {type_of(s['additionalProperties'])}"
    return t


def constraints(s: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if "enum" in s:
        out.append("one of " + ", ".join(f"`{v}`" for v in s["enum"]))
    if "pattern" in s:
        out.append(f"pattern `{s['pattern']}`")
    if "format" in s:
        out.append(f"format {s['format']}")
    for key, label in (("minimum", "≥"), ("maximum", "≤")):
        if key in s:
            exclusive = s.get("exclusive" + key.capitalize())
            out.append(f"{'>' if key == 'minimum' else '<'} {s[key]}" if exclusive else f"{label} {s[key]}")
    for key, label in (("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥"),
                       ("maxItems", "items ≤"), ("minProperties", "entries ≥"), ("maxProperties", "entries ≤")):
        if key in s:
            out.append(f"{label} {s[key]}")
    items = s.get("items")
    if isinstance(items, dict) and items.get("type") != "object":
        out += [f"each: {c}" for c in constraints(items)]
    extra = s.get("additionalProperties")
    if isinstance(extra, dict) and extra.get("type") != "object":
        out += [f"each value: {c}" for c in constraints(extra)]
    if s.get("x-kubernetes-preserve-unknown-fields"):
        out.append("unknown keys kept")
    return out


def fields(s: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any], bool]]:
    """(path, schema, required) for every field below s, depth first."""
    required = set(s.get("required") or [])
    for name, sub in (s.get("properties") or {}).items():
        p = f"{path}.{name}" if path else name
        yield p, sub, name in required
        yield from fields(sub, p)
        if isinstance(sub.get("items"), dict):
            yield from fields(sub["items"], p + "[]")
        if isinstance(sub.get("additionalProperties"), dict):
            yield from fields(sub["additionalProperties"], p + ".<key>")


def rules(s: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    for rule in s.get("x-kubernetes-validations") or []:
        yield path or "(object)", rule
    for name, sub in (s.get("properties") or {}).items():
        p = f"{path}.{name}" if path else name
        yield from rules(sub, p)
        if isinstance(sub.get("items"), dict):
            yield from rules(sub["items"], p + "[]")


def section(crd: dict[str, Any]) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    version = next(v for v in spec["versions"] if v.get("storage"))
    schema = version["schema"]["openAPIV3Schema"]
    kind = names["kind"]
    lines = [f"## {kind}", ""]
    if schema.get("description"):
        lines += [cell(schema["description"]), ""]
    lines += [
        f"- API: `{spec['group']}/{version['name']}`, {spec['scope'].lower()}",
        f"- Names: `{names['plural']}`, `{names['singular']}`"
        + (", short " + ", ".join(f"`{n}`" for n in names.get("shortNames", [])) if names.get("shortNames") else "")
        + (", categories " + ", ".join(f"`{c}`" for c in names.get("categories", []))
           if names.get("categories") else ""),
        f"- `kubectl explain {names['singular']}.spec` shows the same descriptions.",
    ]
    if version.get("subresources", {}).get("status") is not None:
        lines.append("- Status subresource: yes (`kubectl get` reads conditions from `status`).")
    cols = version.get("additionalPrinterColumns") or []
    if cols:
        lines.append("- `kubectl get` columns: " + ", ".join(f"{c['name'].upper()} (`{c['jsonPath']}`)"
                                                            for c in cols)
                     + ("" if any(c["name"].upper() == "AGE" for c in cols) else ", AGE"))
    lines.append("")
    for part in ("spec", "status"):
        sub = (schema.get("properties") or {}).get(part)
        if not sub:
            continue
        lines += [f"### {kind} `{part}`", ""]
        if sub.get("description"):
            lines += [cell(sub["description"]), ""]
        rows = list(fields(sub, part))
        if not rows:
            lines += ["(free-form)", ""]
            continue
        lines += ["| Field | Type | Required | Default | Constraints | Description |",
                  "|---|---|---|---|---|---|"]
        for path, fs, req in rows:
            default = f"`{yaml.safe_dump(fs['default'], default_flow_style=True).strip().removesuffix('...').strip()}`" \
                if "default" in fs else ""
            lines.append(f"| `{path}` | {cell(type_of(fs))} | {'yes' if req else ''} | {cell(default)} | "
                         f"{cell('; '.join(constraints(fs)))} | {cell(fs.get('description', ''))} |")
        lines.append("")
        cel = list(rules(sub, part))
        if cel:
            lines += [f"Rules the API server checks on `{part}`:", ""]
            for where, rule in cel:
                lines.append(f"- `{where}`: {cell(rule.get('message') or rule['rule'])} (`{cell(rule['rule'])}`)")
            lines.append("")
    return lines


def settings_classes() -> list[Any]:
    """Every component's settings class, in the order of the table."""
    from clara_adapter.settings import AdapterSettings
    from clara_dicom.settings import LogSettings
    from clara_operator.settings import OperatorSettings
    from clara_results.settings import RegisterSettings, ResultsServiceSettings

    return [LogSettings, AdapterSettings, OperatorSettings, ResultsServiceSettings, RegisterSettings]


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("NoneType", "None").replace(" | None", "").replace("Literal", "one of ")


def settings_section() -> list[str]:
    from clara_dicom.settings import ENV_ALIASES, env_name

    classes = settings_classes()
    lines = [
        "## Settings and environment variables",
        "",
        "Every setting of every component, generated from the settings classes (`clara_dicom/settings.py`,",
        "`adapter/clara_adapter/settings.py`, `operator/clara_operator/settings.py`,",
        "`results/clara_results/settings.py`).",
        "",
        "- **One convention:** the environment variable of a setting is `CLARA_` + the setting's name in",
        "  upper snake case (`dicomPort` → `CLARA_DICOM_PORT`). A name means the same in every component:",
        "  `CLARA_RESULTS_URL` is the Results Service for the adapter, the operator and register-results.",
        "- **Precedence:** command-line flag > environment variable > settings file (the adapter's",
        "  `--settings FILE`, keys are the setting names) > default.",
        "- **Bad values** stop the command with one line naming the setting, where the value came from and",
        "  its variable, and exit status 2.",
        "- Lists and mappings (operator `tolerations`, `nodeSelector` …) are JSON in the environment.",
        "",
        "| Environment variable | Setting | Component (flag) | Type | Default | Description |",
        "|---|---|---|---|---|---|",
    ]
    rows: dict[str, dict[str, Any]] = {}
    for cls in classes:
        for name, field in cls.model_fields.items():
            var = env_name(name)
            row = rows.setdefault(var, {"setting": name, "uses": [], "type": _type_name(field.annotation),
                                        "defaults": [], "description": field.description or ""})
            flag = cls.flags.get(name)
            row["uses"].append(cls.component + (f" (`{flag}`)" if flag else ""))
            default = "" if field.is_required() else cls.table_default(field)
            if default not in row["defaults"]:
                row["defaults"].append(default)
    for var, row in rows.items():
        default = "; ".join(f"`{d}`" if d else "" for d in row["defaults"])
        lines.append(f"| `{var}` | `{row['setting']}` | {cell('; '.join(row['uses']))} | {cell(row['type'])} | "
                     f"{cell(default)} | {cell(row['description'])} |")
    for setting, aliases in ENV_ALIASES.items():
        for alias, why in aliases:
            what = ("deprecated" if why == "deprecated" else f"the {why} name") + \
                f", still read: use `{env_name(setting)}`"
            lines.append(f"| `{alias}` | `{setting}` | {what} | | | |")
    lines.append("")
    return lines


def render() -> str:
    crds = load()
    kinds = [c["spec"]["names"]["kind"] for c in crds]
    lines = [
        "<!-- Generated by docs/gen_reference.py from crds/*.yaml and the settings classes. Do not edit: run"
        " `python docs/gen_reference.py`. -->",
        "# Configuration reference",
        "",
        "Every custom resource of clara-dicom, field by field, as the API server validates it.",
        "The CRDs (`crds/`, also `charts/clara-dicom/crds/`) are generated from",
        "`clara_dicom/models.py`; this page is generated from the CRDs. The operator checks",
        "more than the schema can express (cross-object rules): see",
        "[troubleshooting](troubleshooting.md) for the `Ready=False` reasons.",
        "",
        "Kinds: " + ", ".join(f"[{k}](#{anchor(k)})" for k in kinds) + ". Then the components'",
        "[settings and environment variables](#settings-and-environment-variables).",
        "",
    ]
    for crd in crds:
        lines += section(crd)
    lines += settings_section()
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reference.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(REPO)} is stale: python docs/gen_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
