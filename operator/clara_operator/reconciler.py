"""The namespace reconcile: read every object of the configuration kinds, decide
(``rendering.plan``), then write the adapter ConfigMap, statuses, last-valid
annotations and Events.

Any event on any of our kinds (or on the adapter's status ConfigMap) marks the
namespace dirty; one worker per namespace serialises the reconciles and
coalesces bursts (a short debounce), so the objects always see a consistent
picture of their namespace and the ConfigMap is rendered once per burst.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from clara_dicom.models import GROUP, VERSION
from clara_dicom.retrying import NAMESPACE_RECONCILE, Policy

from clara_operator.rendering import (
    APPLIED_VERSION_KEY,
    CONFIG_KEY,
    CONFIG_KINDS,
    CONFIG_VERSION_ANNOTATION,
    DOMAIN,
    LAST_VALID_ANNOTATION,
    Plan,
    destination_problems,
    plan,
)

log = logging.getLogger("clara_operator")

DEFAULT_CONFIG_MAP = "clara-dicom-adapter-config"
DEFAULT_STATUS_CONFIG_MAP = "clara-dicom-adapter-status"
MANAGED_BY = {"app.kubernetes.io/managed-by": "clara-dicom-operator", "app.kubernetes.io/part-of": "clara-dicom"}
MERGE = "application/merge-patch+json"

EventPoster = Callable[[dict[str, Any], str, str, str], None]


@dataclass
class Options:
    config_map: str = DEFAULT_CONFIG_MAP
    status_config_map: str = DEFAULT_STATUS_CONFIG_MAP
    feedback: bool = True
    debounce: float = 0.05


class Api:
    """The few API calls the reconcile needs (kubernetes_asyncio)."""

    def __init__(self, api_client: Any) -> None:
        from kubernetes_asyncio import client

        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ApiException = client.ApiException

    async def list_objects(self, namespace: str) -> list[dict[str, Any]]:
        bodies: list[dict[str, Any]] = []
        results = await asyncio.gather(*(
            self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, cls.PLURAL)
            for cls in CONFIG_KINDS))
        for cls, result in zip(CONFIG_KINDS, results):
            for item in result.get("items", []):
                item.setdefault("kind", cls.KIND)
                item.setdefault("apiVersion", f"{GROUP}/{VERSION}")
                bodies.append(item)
        return bodies

    async def read_config_map(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            cm = await self.core.read_namespaced_config_map(name, namespace)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return {"data": dict(cm.data or {}), "annotations": dict(cm.metadata.annotations or {})}

    async def write_config_map(self, namespace: str, name: str, data: dict[str, str],
                               annotations: dict[str, str]) -> None:
        body = {"metadata": {"name": name, "namespace": namespace, "labels": dict(MANAGED_BY),
                             "annotations": annotations}, "data": data}
        try:
            await self.core.patch_namespaced_config_map(name, namespace, body, _content_type=MERGE)
        except self.ApiException as exc:
            if exc.status != 404:
                raise
            await self.core.create_namespaced_config_map(namespace, body)

    async def patch_status(self, namespace: str, plural: str, name: str, status: dict[str, Any]) -> None:
        await self.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, plural, name, {"status": status}, _content_type=MERGE)

    async def patch_annotation(self, namespace: str, plural: str, name: str, key: str, value: str) -> None:
        await self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, plural, name, {"metadata": {"annotations": {key: value}}},
            _content_type=MERGE)


PLURALS = {cls.KIND: cls.PLURAL for cls in CONFIG_KINDS}


async def reconcile_once(api: Api, namespace: str, options: Options, post_event: EventPoster | None) -> Plan:
    async def adapter_status() -> dict[str, str]:
        if not options.feedback:
            return {}
        status_cm = await api.read_config_map(namespace, options.status_config_map)
        return (status_cm or {}).get("data") or {}

    bodies, adapter, existing = await asyncio.gather(
        api.list_objects(namespace), adapter_status(), api.read_config_map(namespace, options.config_map))
    result = plan(bodies, namespace, applied_version=adapter.get(APPLIED_VERSION_KEY), feedback=options.feedback,
                  destination_problems=destination_problems(adapter))

    writes = 0
    # 1. The rendered configuration (only written when its content changed).
    config_json = result.config_json
    if existing is None or existing["data"].get(CONFIG_KEY) != config_json:
        try:
            await api.write_config_map(namespace, options.config_map, {CONFIG_KEY: config_json},
                                       {CONFIG_VERSION_ANNOTATION: result.config.version})
        except api.ApiException as exc:
            # A namespace being deleted refuses new objects; its objects' finalizers must
            # still be released, so this is not an error.
            if exc.status == 403 and "terminat" in str(exc.body):
                log.info("namespace %s is being deleted; not rendering its configuration", namespace)
                result.writes = 0  # type: ignore[attr-defined]
                return result
            raise
        writes += 1
        log.info("namespace %s: rendered adapter configuration %s (%d AE titles)", namespace,
                 result.config.version, len(result.config.aeTitles))

    # 2. Objects: last valid version, status, Events on transitions (objects in parallel).
    async def update(obj: Any) -> int:
        plural = PLURALS[obj.kind]
        done = 0
        try:
            if obj.last_valid is not None:
                await api.patch_annotation(namespace, plural, obj.name, LAST_VALID_ANNOTATION, obj.last_valid)
                done += 1
            if obj.status_changed:
                await api.patch_status(namespace, plural, obj.name, obj.status)
                done += 1
        except api.ApiException as exc:
            if exc.status == 404:  # deleted meanwhile; the deletion event re-runs us
                return done
            raise
        if post_event is not None:
            for event_type, reason, message in obj.events:
                post_event(obj.body, event_type, reason, message)
        return done

    pending = [o for o in result.objects if o.last_valid is not None or o.status_changed]
    writes += sum(await asyncio.gather(*(update(o) for o in pending)))
    result.writes = writes  # type: ignore[attr-defined]
    return result


class NamespaceReconciler:
    """Serialises and coalesces the reconciles of one namespace."""

    def __init__(self, namespace: str, run: Callable[[], Awaitable[Any]], debounce: float = 0.05,
                 retry: Policy = NAMESPACE_RECONCILE) -> None:
        self.namespace = namespace
        self._run = run
        self._debounce = debounce
        self._retry = retry
        self._dirty = asyncio.Event()
        self._requested = 0  # incremented by every request
        self._completed = 0  # the request counter value covered by the last successful run
        self._done = asyncio.Condition()
        self._task: asyncio.Task | None = None
        self.runs = 0

    def request(self) -> int:
        self._requested += 1
        self._dirty.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop(), name=f"reconcile:{self.namespace}")
        return self._requested

    async def request_and_wait(self, timeout: float = 30) -> None:
        ticket = self.request()
        async with self._done:
            await asyncio.wait_for(self._done.wait_for(lambda: self._completed >= ticket), timeout)

    async def _loop(self) -> None:
        backoff = self._retry.backoff()
        while True:
            await self._dirty.wait()
            await asyncio.sleep(self._debounce)
            self._dirty.clear()
            ticket = self._requested
            started = time.monotonic()
            try:
                outcome = await self._run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried; the API may be briefly unavailable
                delay = backoff.next()
                log.warning("namespace %s: reconcile failed (%s: %s); retrying in %.1fs", self.namespace,
                            type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                self._dirty.set()
                continue
            backoff.reset()
            self.runs += 1
            writes = getattr(outcome, "writes", None)
            level = logging.INFO if self.runs == 1 or writes else logging.DEBUG
            log.log(level, "namespace %s: reconciled in %.0f ms (run %d, %s writes)", self.namespace,
                    (time.monotonic() - started) * 1000, self.runs, "?" if writes is None else writes)
            async with self._done:
                self._completed = max(self._completed, ticket)
                self._done.notify_all()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass


def dump_plan(p: Plan) -> str:  # debugging aid
    return json.dumps({"version": p.config.version, "objects": [
        {"kind": o.kind, "name": o.name, "valid": o.valid, "status": o.status} for o in p.objects]}, indent=1)


__all__ = ["Api", "NamespaceReconciler", "Options", "reconcile_once", "DOMAIN"]
