"""A lean list-and-watch of the pipeline Jobs (label component=pipeline) and of the
PipelineJobs, feeding the controller's triggers (``Controller.job_event``,
``Controller.pipelinejob_event``).

Own code rather than kopf's watch because a pipeline Job brings about six watch events
(created, pod active, ready, succeeded, Complete…), each carrying the whole pod
template, and a PipelineJob about four (created, and each of our status writes), and
kopf runs every event through its full handling cycle (a per-object worker, deep
copies, progress storage, the diff base) for a handler that only adds a key: at 1,000
PipelineJobs that was as much CPU as the reconciles themselves (py-spy during a burst:
kopf's processing of PipelineJob events 29 % of the operator's samples). Here an event
costs one json.loads and a trimmed copy (seen.trim_job / trim_pipelinejob).
kubernetes_asyncio's ``watch.Watch`` would deserialise every object into typed models,
which is the cost we avoid.

Level-triggered like the rest: a broken stream resumes from the last resourceVersion
(bookmarks keep it fresh); 410 Gone relists, and the relist replaces what is kept, so a
Job deleted during the gap is noticed; any other error retries after a short backoff.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Callable

from clara_dicom.models import GROUP, VERSION
from clara_dicom.retrying import JOB_WATCH

from clara_operator.kube import PIPELINEJOBS
from clara_operator.seen import trim_job, trim_pipelinejob

log = logging.getLogger("clara_operator.jobwatch")

WATCH_SECONDS = 270  # server-side timeout of one watch request (as kopf's settings.watching)


class Gone(Exception):
    """The resourceVersion is too old (410): list again."""


class ListWatch:
    """Lists, then watches, one collection in ``namespace`` (None: all); subclasses say which."""

    what = "objects"

    def __init__(self, kube: Any, namespace: str | None, selector: str | None,
                 on_event: Callable[[dict[str, Any], bool], None],
                 on_list: Callable[[str | None, list[dict[str, Any]]], None]) -> None:
        self.kube = kube
        self.namespace = namespace
        self.selector = selector
        self.on_event = on_event  # (object, deleted)
        self.on_list = on_list  # (namespace, every object listed): replaces what is kept
        self.version: str | None = None
        self.events = 0
        self.listed = asyncio.Event()

    def _call(self) -> tuple[Any, tuple[Any, ...]]:
        """The list call (with watch=True, the watch) and its positional arguments."""
        raise NotImplementedError

    async def _list_versioned(self) -> tuple[list[dict[str, Any]], str | None]:
        raise NotImplementedError

    async def run(self) -> None:
        backoff = JOB_WATCH.backoff()
        while True:
            try:
                if self.version is None:
                    await self._list()
                await self._watch()
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except Gone:
                log.info("%s%s: resourceVersion expired; listing again", self.what, _where(self.namespace))
                self.version = None
            except Exception as exc:  # noqa: BLE001 - the API may be away: resume when it is back
                delay = backoff.next()
                level = logging.WARNING if backoff.failures in (1, 10) else logging.DEBUG
                log.log(level, "%s%s: watch failed (%s); again in %.1fs", self.what, _where(self.namespace),
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__, delay)
                await asyncio.sleep(delay)

    async def _list(self) -> None:
        # trimmed page by page: a relist of thousands stays small
        items, version = await self._list_versioned()
        self.on_list(self.namespace, items)
        self.version = version
        self.listed.set()

    async def _watch(self) -> None:
        call, args = self._call()
        selector = {"label_selector": self.selector} if self.selector else {}
        resp = await call(*args, **selector, watch=True, allow_watch_bookmarks=True,
                          resource_version=self.version, timeout_seconds=WATCH_SECONDS,
                          _preload_content=False, _request_timeout=WATCH_SECONDS + 30)
        try:
            if resp.status == 410:
                raise Gone()
            if resp.status != 200:
                raise RuntimeError(f"{resp.status} {resp.reason}")
            buffer = b""
            async for chunk in resp.content.iter_any():  # lines may exceed aiohttp's readline limit
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._event(json.loads(line))
        finally:
            resp.release()

    def _event(self, event: dict[str, Any]) -> None:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error: {obj.get('message') or obj}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.version = version
        if kind == "BOOKMARK":
            return
        self.events += 1
        self.on_event(obj, kind == "DELETED")


class JobWatch(ListWatch):
    """The Jobs matching ``selector``, kept trimmed (seen.trim_job)."""

    what = "Jobs"

    def _call(self) -> tuple[Any, tuple[Any, ...]]:
        batch = self.kube.batch
        if self.namespace is None:
            return batch.list_job_for_all_namespaces, ()
        return batch.list_namespaced_job, (self.namespace,)

    async def _list_versioned(self) -> tuple[list[dict[str, Any]], str | None]:
        return await self.kube.list_jobs_versioned(self.namespace, self.selector, keep=trim_job)


class PipelineJobWatch(ListWatch):
    """Every PipelineJob, without its managedFields (seen.trim_pipelinejob)."""

    what = "PipelineJobs"

    def __init__(self, kube: Any, namespace: str | None, on_event: Callable[[dict[str, Any], bool], None],
                 on_list: Callable[[str | None, list[dict[str, Any]]], None]) -> None:
        super().__init__(kube, namespace, None, on_event, on_list)

    def _call(self) -> tuple[Any, tuple[Any, ...]]:
        custom = self.kube.custom
        if self.namespace is None:
            return custom.list_cluster_custom_object, (GROUP, VERSION, PIPELINEJOBS)
        return custom.list_namespaced_custom_object, (GROUP, VERSION, self.namespace, PIPELINEJOBS)

    async def _list_versioned(self) -> tuple[list[dict[str, Any]], str | None]:
        return await self.kube.list_versioned(PIPELINEJOBS, self.namespace, keep=trim_pipelinejob)


def _where(namespace: str | None) -> str:
    return f" in {namespace}" if namespace else ""


__all__ = ["ListWatch", "JobWatch", "PipelineJobWatch", "Gone"]
