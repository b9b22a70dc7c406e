"""Kubernetes Events of the operator (imported by every module, importing none of ours).

Events are informational: posting one never fails a reconcile. The namespace reconcile's
go through kopf, which queues them and posts them from its own task, as
``clara-dicom-operator`` (see ``handlers.configure``); the PipelineJob controller's through
an :class:`EventQueue` of its own, the same way.
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import socket
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


EVENT_POSTERS = 8  # Events posted at once: Events may wait, Job creates should not
EVENT_BACKLOG = 10_000  # Events waiting at most; more are dropped (counted), never block a reconcile
REPORTING_COMPONENT = "clara-dicom-operator"
EVENT_NAME_PREFIX = "clara-dicom-"


class EventQueue:
    """The controller's Events, posted by a few tasks of its own (``run``), as kopf would post them.

    Not through kopf.event(): kopf's queue is visible only inside kopf's handler tasks, and the
    controller's watches (jobwatch.py) and workers run outside them. ``post`` is an EventPoster:
    it never blocks nor raises; a full backlog drops the Event (``dropped`` counts them)."""

    def __init__(self, create: Callable[[str, dict[str, Any]], Any], posters: int = EVENT_POSTERS,
                 backlog: int = EVENT_BACKLOG, instance: str | None = None, retry_delay: float = 1.0,
                 busy: Callable[[], bool] | None = None, busy_poll: float = 0.25) -> None:
        self._create = create  # async (namespace, Event body)
        # While busy() (Job creates pending), one poster only: Events wait, creates should not
        # share the API server with them. The others look again every busy_poll seconds.
        self.busy = busy
        self._busy_poll = busy_poll
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(backlog)
        self._posters = posters
        self._retry_delay = retry_delay
        self.instance = instance or socket.gethostname()
        self.posted = 0
        self.dropped = 0
        self.failed = 0

    def post(self, body: dict[str, Any], event_type: str, reason: str, message: str) -> None:
        meta = body.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        now = datetime.datetime.now(datetime.timezone.utc).isoformat()
        event = {
            "metadata": {"namespace": namespace, "generateName": EVENT_NAME_PREFIX},
            "action": "Reconcile", "type": event_type, "reason": reason, "message": message[:1000],
            "reportingComponent": REPORTING_COMPONENT, "reportingInstance": self.instance,
            "source": {"component": REPORTING_COMPONENT},
            "involvedObject": {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                               "name": meta.get("name"), "namespace": namespace, "uid": meta.get("uid")},
            "firstTimestamp": now, "lastTimestamp": now, "eventTime": now,
        }
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.debug("event dropped (backlog full): %s %s", reason, meta.get("name"))

    async def run(self) -> None:
        await asyncio.gather(*(self._post_forever(i) for i in range(self._posters)))

    async def _post_forever(self, index: int) -> None:
        while True:
            while index and self.busy is not None and self.busy():
                await asyncio.sleep(self._busy_poll)
            event = await self._queue.get()
            for attempt in (1, 2):  # one retry, as kopf's backoffs=(1,)
                try:
                    await self._create(event["metadata"]["namespace"], event)
                    self.posted += 1
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - Events are best effort
                    if attempt == 2:
                        self.failed += 1
                        log.debug("event not posted: %s", exc)
                    else:
                        await asyncio.sleep(self._retry_delay)
