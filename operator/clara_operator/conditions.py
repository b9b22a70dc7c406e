"""Kubernetes-style conditions: merging desired conditions into the stored ones
(lastTransitionTime moves only when the status changes) and deciding which
changes deserve an Event."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from typing import Any, Iterable

# Reasons that are progress, not problems: their Events are Normal.
NORMAL_FALSE_REASONS = {"Pending"}


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Cond:
    type: str
    status: bool
    reason: str
    message: str


def merge(desired: Iterable[Cond], stored: list[dict[str, Any]] | None, generation: int | None,
          now: str | None = None) -> list[dict[str, Any]]:
    """The stored form of ``desired``, keeping each condition's lastTransitionTime
    when its status did not change."""
    previous = {c.get("type"): c for c in (stored or []) if isinstance(c, dict)}
    stamp = now or now_rfc3339()
    out = []
    for cond in desired:
        status = "True" if cond.status else "False"
        old = previous.get(cond.type)
        ltt = old.get("lastTransitionTime") if old and old.get("status") == status else None
        entry = {
            "type": cond.type,
            "status": status,
            "reason": cond.reason,
            "message": cond.message,
            "lastTransitionTime": ltt or stamp,
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        out.append(entry)
    return out


def transitions(desired: Iterable[Cond], stored: list[dict[str, Any]] | None) -> list[tuple[str, str, str]]:
    """(event type, reason, message) for every condition whose status or reason changed."""
    previous = {c.get("type"): c for c in (stored or []) if isinstance(c, dict)}
    events = []
    for cond in desired:
        status = "True" if cond.status else "False"
        old = previous.get(cond.type)
        if old and old.get("status") == status and old.get("reason") == cond.reason:
            continue
        if cond.type != "Ready" and cond.status and old is None:
            continue  # a secondary condition that starts out fine is no news
        if cond.status or cond.reason in NORMAL_FALSE_REASONS:
            kind = "Normal"
        else:
            kind = "Warning"
        if cond.type == "Ready":
            reason = "Ready" if cond.status else cond.reason
        else:
            reason = f"{cond.type}" if cond.status else cond.reason
        events.append((kind, reason, f"{cond.type}={status}: {cond.message}"))
    return events


def comparable(status: dict[str, Any] | None) -> dict[str, Any]:
    """A status without volatile fields, to decide whether a write is needed."""
    status = dict(status or {})
    conds = []
    for c in status.get("conditions") or []:
        c = dict(c)
        c.pop("lastTransitionTime", None)
        conds.append(c)
    status["conditions"] = conds
    return status
