"""Job payload folders (hard links to the received files), and the quarantine
for groups whose payload cannot be built."""
from __future__ import annotations

import logging
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path

from clara_dicom.logs import short_hash

from clara_adapter.job_requests import JobRequest
from clara_adapter.storage import link_or_copy

log = logging.getLogger(__name__)


def build_payload(payloads_root: Path, request: JobRequest) -> Path:
    """`<root>/<payloadId>/input/<Study>/<Series>/<SOP>.dcm` (hard links) and `operators/`."""
    root = payloads_root / request.name
    made: set[Path] = set()
    for inst in request.instances:
        folder = root / "input" / _safe(inst.study_uid) / _safe(inst.series_uid)
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        link_or_copy(inst.path, folder / f"{_safe(inst.sop_instance_uid)}.dcm")
    (root / "operators").mkdir(parents=True, exist_ok=True)
    return root


def _safe(uid: str) -> str:
    """UIDs are digits and dots; anything else (a broken sender) must not escape the folder."""
    cleaned = re.sub(r"[^0-9A-Za-z._-]", "_", uid).lstrip(".") or "unknown"
    return cleaned[:128]


def discard_payload(payloads_root: Path, request: JobRequest) -> None:
    shutil.rmtree(payloads_root / request.name, ignore_errors=True)


def quarantine(folder: Path, requests: list[JobRequest], reason: str) -> tuple[int, int]:
    """Move the group's received files into ``folder`` with a ``reason.txt`` for a
    person to look at. Returns (files kept, files missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: dict[Path, str] = {}
    for req in requests:
        for inst in req.instances:
            seen.setdefault(Path(inst.path), inst.sop_instance_uid)
    kept, missing = [], []
    for path, sop in seen.items():
        try:
            os.replace(path, folder / path.name)
            kept.append(f"{path.name}  {sop}")
        except FileNotFoundError:
            missing.append(f"{path.name}  {sop}")
    first = requests[0]
    lines = [
        f"quarantined {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%SZ}: the job payload cannot be built",
        f"reason: {reason}",
        f"AE title: {first.ae_title}  processor: {first.processor}  group: {first.group_by} "
        f"(hash {short_hash(first.group_value)})",
        f"pipeline jobs not created: {', '.join(r.name for r in requests)}",
        f"files kept here ({len(kept)}):", *kept,
        f"files missing ({len(missing)}):", *missing,
    ]
    (folder / "reason.txt").write_text("\n".join(lines) + "\n")
    return len(kept), len(missing)
