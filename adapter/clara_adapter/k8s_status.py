"""Publishing what the operator reads from the adapter's status ConfigMap: the
configuration version it runs, and the destinations its export agent cannot serve.

One writer task at a time, always writing the newest version handed in: a
slow or failing write of an older version can never land after a newer one
(``appliedVersion`` never goes backwards)."""
from __future__ import annotations

import asyncio
import logging
import threading
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from clara_dicom.retrying import KUBE_WRITE

from clara_adapter.k8s_client import API_TIMEOUT, KubeClient, brief

log = logging.getLogger(__name__)

APPLIED_VERSION_KEY = "appliedVersion"
DESTINATION_PROBLEMS_KEY = "destinationProblems"  # JSON {ClaraDestination name: why the agent cannot serve it}


class VersionPublisher:
    def __init__(self, loop: asyncio.AbstractEventLoop, write: Callable[[str], Awaitable[None]],
                 max_backoff: float = 10.0, what: str = "applied configuration version"):
        """``write(version)`` stores one version (raises to be retried)."""
        self.what = what
        self.loop = loop
        self._write = write
        self.policy = KUBE_WRITE.with_(initial=min(KUBE_WRITE.initial, max_backoff), cap=max_backoff)
        self._lock = threading.Lock()
        self._wanted: tuple[int, str] = (0, "")  # (order applied, version)
        self._written = 0
        self._task: asyncio.Future | None = None
        self.published = ""
        self.stopping = False

    def publish(self, version: str) -> None:
        """Called (from any thread) each time a configuration is applied, in order."""
        with self._lock:
            self._wanted = (self._wanted[0] + 1, version)
        self.loop.call_soon_threadsafe(self._ensure_writer)

    def _ensure_writer(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._writer())

    async def _writer(self) -> None:
        backoff = self.policy.backoff()
        while not self.stopping:
            with self._lock:
                order, version = self._wanted
            if order <= self._written:
                return
            try:
                if version != self.published:
                    await self._write(version)
                    self.published = version
                    log.info("published %s %s", self.what, version)
                self._written = order
                backoff.reset()
            except Exception as exc:
                log.warning("publishing %s failed (%s); retrying", self.what, brief(exc))
                await asyncio.sleep(backoff.next())


def config_map_writer(client: KubeClient, namespace: str, name: str, identity: str
                      ) -> Callable[[str], Awaitable[None]]:
    """``write(version)`` into the status ConfigMap (created if missing)."""

    async def write(version: str) -> None:
        await patch_status(client, namespace, name, {
            APPLIED_VERSION_KEY: version, "adapter": identity,
            "appliedAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")})

    return write


def destination_problems_writer(client: KubeClient, namespace: str, name: str
                                ) -> Callable[[str], Awaitable[None]]:
    """``write(problems_json)`` into the status ConfigMap (created if missing)."""

    async def write(problems_json: str) -> None:
        await patch_status(client, namespace, name, {DESTINATION_PROBLEMS_KEY: problems_json})

    return write


async def patch_status(client: KubeClient, namespace: str, name: str, data: dict[str, str]) -> None:
    """Merge ``data`` into the status ConfigMap, creating it when missing."""
    from kubernetes_asyncio.client.exceptions import ApiException

    try:
        await client.core.patch_namespaced_config_map(name, namespace, {"data": data},
                                                      _request_timeout=API_TIMEOUT)
    except ApiException as exc:
        if exc.status != 404:
            raise
        body: dict[str, Any] = {"metadata": {"name": name, "namespace": namespace,
                                             "labels": {"app.kubernetes.io/part-of": "clara-dicom"}},
                                "data": data}
        await client.core.create_namespaced_config_map(namespace, body, _request_timeout=API_TIMEOUT)
