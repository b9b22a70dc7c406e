"""Loading custom-resource manifests from YAML files or folders, with errors that
name the file, the object and the field."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml
from pydantic import ValidationError

from clara_dicom.errors import UserError
from clara_dicom.models import API_VERSION, RESOURCE_TYPES, Resource

YAML_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(UserError):
    """A manifest that cannot be used; the message names file, object and field."""


def describe_validation_error(exc: ValidationError, limit: int = 3) -> str:
    """One line: 'spec.aeTitle: String should have at most 16 characters; ...'."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "string_pattern_mismatch":
            msg = f"{err.get('input')!r} has an invalid format"
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling)"
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(exc.errors()) - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def parse_resource(obj: Any, origin: str = "<input>") -> Resource:
    """Validate one decoded manifest into its model."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{origin}: expected a mapping with apiVersion, kind, metadata and spec")
    kind = obj.get("kind")
    name = (obj.get("metadata") or {}).get("name", "?") if isinstance(obj.get("metadata"), dict) else "?"
    where = f"{origin}: {kind or '?'}/{name}"
    if obj.get("apiVersion") != API_VERSION:
        raise ManifestError(f"{where}: apiVersion must be {API_VERSION} (got {obj.get('apiVersion')!r})")
    cls = RESOURCE_TYPES.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise ManifestError(f"{where}: unknown kind; expected one of {', '.join(RESOURCE_TYPES)}")
    try:
        return cls.model_validate(obj)
    except ValidationError as exc:
        raise ManifestError(f"{where}: {describe_validation_error(exc)}") from None


def iter_manifest_files(path: Path) -> list[Path]:
    if path.is_dir():
        # Hidden entries are skipped: a mounted ConfigMap keeps copies under ..data/.
        return sorted(
            p for p in path.rglob("*")
            if p.suffix in YAML_SUFFIXES and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if path.is_file():
        return [path]
    raise ManifestError(f"{path}: no such file or folder")


def load_documents(path: Path) -> Iterable[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read: {exc}") from None
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ManifestError(f"{path}:{line}: invalid YAML: {problem}") from None
    for index, doc in enumerate(docs):
        if doc is None:
            continue
        yield f"{path} (document {index + 1})" if len(docs) > 1 else str(path), doc


def load_manifests(path: str | Path, namespace: str | None = None) -> list[Resource]:
    """Every resource in a file or folder (multi-document YAML, `kind: List` accepted)."""
    resources: list[Resource] = []
    seen: dict[tuple[str, str, str], str] = {}
    for file in iter_manifest_files(Path(path)):
        for origin, doc in load_documents(file):
            items = (doc.get("items") or []) if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            if not isinstance(items, list):
                raise ManifestError(f"{origin}: kind List: items must be a list of manifests")
            for item in items:
                if namespace and isinstance(item, dict) and isinstance(item.get("metadata"), dict):
                    item["metadata"].setdefault("namespace", namespace)
                res = parse_resource(item, origin)
                if res.key in seen:
                    raise ManifestError(
                        f"{origin}: {res.KIND}/{res.metadata.name} is defined twice (also in {seen[res.key]})"
                    )
                seen[res.key] = origin
                resources.append(res)
    return resources
