"""Kubernetes Events of the operator (imported by every module, importing none of ours).

Events are informational: posting one never fails a reconcile. kopf queues them and
posts them from its own task, as ``clara-dicom-operator`` (see ``handlers.configure``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import kopf

log = logging.getLogger("clara_operator.events")

EventPoster = Callable[[dict[str, Any], str, str, str], None]


def post_event(body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    """Post an Event about ``body``; raises what kopf raises."""
    ref = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: (body.get("metadata") or {}).get(k) for k in ("name", "namespace", "uid")},
    }
    # One retry (a namespace being deleted refuses new Events).
    kopf.event(ref, type=event_type, reason=reason, message=message[:1000], backoffs=(1,))  # type: ignore[arg-type]


def post_event_best_effort(body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
    """Post an Event; a failure is logged, never raised."""
    try:
        post_event(body, event_type, reason, message)
    except Exception as exc:  # noqa: BLE001 - Events are best effort
        log.debug("event not posted: %s", exc)
