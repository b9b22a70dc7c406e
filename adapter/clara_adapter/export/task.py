"""What an export task asks for: its destination and its files.

Parameters (Clara's register-results sends each ``--data`` element's JSON
serialisation): a JSON string (``"\\"Orthanc\\""``) names the destination; so
does an object with a ``destination`` (or ``name``) string. Anything else — not
JSON, a number, a list, an object without a destination, null — is a permanent
failure, as are an unknown destination and any URI or payload ID that would
leave ``<payloads root>/<payloadId>/``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clara_dicom.config import RenderedConfig
from clara_dicom.models import ClaraDestinationSpec

try:  # the Results Service's own rule for payload IDs (one safe path segment)
    from clara_results.models import PAYLOAD_ID_RE
except ImportError:  # pragma: no cover - results package not installed
    import re

    PAYLOAD_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")


class PermanentTaskError(Exception):
    """The task can never succeed as it is (reported with retryLater=false)."""


@dataclass(frozen=True)
class ResolvedTask:
    destination_name: str
    destination: ClaraDestinationSpec
    payload_dir: Path
    files: list[tuple[str, Path]]  # (uri, absolute path inside payload_dir)


def destination_name(parameters: Any) -> str:
    """The destination a task's ``parameters`` names, or PermanentTaskError."""
    if parameters is None:
        raise PermanentTaskError("task has no parameters: expected the destination name, e.g. \"Orthanc\"")
    if not isinstance(parameters, str):
        raise PermanentTaskError(f"task parameters are a {type(parameters).__name__}, not a JSON string")

    def no_constants(name: str) -> Any:
        raise ValueError(name)

    try:
        value = json.loads(parameters, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise PermanentTaskError(f"task parameters are not JSON: {_clip(parameters)}") from None
    if isinstance(value, dict):
        for key in ("destination", "name"):
            found = next((v for k, v in value.items() if k.lower() == key), None)
            if found is not None:
                value = found
                break
        else:
            raise PermanentTaskError("task parameters are an object without a 'destination' (or 'name') key")
    if not isinstance(value, str):
        raise PermanentTaskError(f"task parameters name no destination: expected a JSON string, got "
                                 f"{_json_type(value)}")
    name = value.strip()
    if not name:
        raise PermanentTaskError("task parameters name an empty destination")
    return name


def payload_dir(payloads_root: Path, payload_id: Any) -> Path:
    if not isinstance(payload_id, str) or not PAYLOAD_ID_RE.match(payload_id) or payload_id in (".", ".."):
        raise PermanentTaskError(f"payload ID {_clip(str(payload_id))} is not a single safe folder name")
    root = Path(os.path.realpath(payloads_root))
    folder = Path(os.path.realpath(root / payload_id))
    if folder.parent != root:
        raise PermanentTaskError(f"payload ID {_clip(payload_id)} escapes the payloads root")
    return folder


def resolve_uris(folder: Path, uris: Any) -> list[tuple[str, Path]]:
    """Each URI as (uri, real path inside ``folder``); any escape is a PermanentTaskError.

    Symbolic links are followed before the check, so a link pointing outside the
    payload is an escape too. Missing files are returned as they are (the sender
    counts them as failed DICOM files).
    """
    if not isinstance(uris, (list, tuple)):
        raise PermanentTaskError("task URIs are not a list")
    out = []
    for uri in uris:
        if not isinstance(uri, str) or not uri or "\x00" in uri:
            raise PermanentTaskError(f"task URI {_clip(repr(uri))} is not a relative path")
        rel = uri.replace("\\", "/")
        if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
            raise PermanentTaskError(f"task URI {_clip(uri)} is absolute; URIs are relative to the payload folder")
        real = Path(os.path.realpath(folder / rel))
        if real != folder and folder not in real.parents:
            raise PermanentTaskError(f"task URI {_clip(uri)} escapes its payload folder")
        out.append((uri, real))
    return out


def resolve_task(task: Any, config: RenderedConfig, payloads_root: Path) -> ResolvedTask:
    """Destination and files of a leased task (``clara_results.models.Task``)."""
    name = destination_name(task.parameters)
    spec = config.destination(name)
    if spec is None:
        known = ", ".join(sorted(config.destinations)) or "none"
        raise PermanentTaskError(f"unknown destination {_clip(name)} (ClaraDestinations: {known})")
    folder = payload_dir(payloads_root, task.payload_id)
    files = resolve_uris(folder, task.uris)
    return ResolvedTask(name, spec, folder, files)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object"}.get(
        type(value), type(value).__name__)


def _clip(text: str, n: int = 80) -> str:
    text = text.replace("\n", "\\n")
    return repr(text if len(text) <= n else text[:n] + "…")
