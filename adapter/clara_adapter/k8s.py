"""Kubernetes mode: configuration from the operator's ConfigMap (watched through
the API), the applied version published back, and PipelineJobs as the job sink.

All API traffic runs on one asyncio loop in a background thread; the adapter's
threads (job submitter) call into it synchronously.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from clara_dicom.config import RenderedConfig
from clara_dicom.errors import UserError
from clara_dicom.models import GROUP, VERSION

log = logging.getLogger(__name__)

CONFIG_KEY = "config.json"  # same keys as the operator's rendering
APPLIED_VERSION_KEY = "appliedVersion"
DESTINATION_PROBLEMS_KEY = "destinationProblems"  # JSON {ClaraDestination name: why the agent cannot serve it}
API_TIMEOUT = 10.0


class KubeBridge:
    def __init__(self, namespace: str, config_map: str, status_config_map: str, cache_file: Path,
                 kubeconfig: str | None = None):
        self.namespace = namespace
        self.config_map = config_map
        self.status_config_map = status_config_map
        self.cache_file = Path(cache_file)
        self.kubeconfig = kubeconfig
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="clara-kube", daemon=True)
        self._stopping = False
        self._on_config: Callable[[RenderedConfig], None] | None = None
        self.api_client: Any = None
        self.published = ""
        self.identity = os.environ.get("POD_NAME") or socket.gethostname()

    # -- plumbing -----------------------------------------------------------
    def _run(self, coro: Any, timeout: float = API_TIMEOUT + 5) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _connect(self) -> None:
        from kubernetes_asyncio import client, config

        try:
            if self.kubeconfig or os.environ.get("KUBECONFIG") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
                await config.load_kube_config(config_file=self.kubeconfig)
            else:
                config.load_incluster_config()
        except Exception as exc:  # bad/missing kubeconfig: the user must fix it
            raise UserError(f"cannot load Kubernetes credentials: {exc}") from None
        self.api_client = client.ApiClient()
        self.core = client.CoreV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def start(self, on_config: Callable[[RenderedConfig], None]) -> RenderedConfig | None:
        """Connect; return the current configuration (from the API, else the last
        one applied before a restart, else None) and watch for changes."""
        self._on_config = on_config
        self._thread.start()
        self._run(self._connect())
        config = None
        try:
            config = self._run(self._read_config())
        except Exception as exc:
            log.warning("configuration ConfigMap %s/%s not readable yet (%s); %s", self.namespace, self.config_map,
                        _brief(exc), "using the last applied one" if self.cache_file.exists() else "waiting")
        if config is None and self.cache_file.exists():
            try:
                config = RenderedConfig.from_json(self.cache_file.read_text())
            except Exception:
                config = None
        self._watch_future = asyncio.run_coroutine_threadsafe(self._watch(), self.loop)
        return config

    def stop(self) -> None:
        self._stopping = True
        future = getattr(self, "_watch_future", None)
        if future is not None:
            future.cancel()  # ends the watch task before the loop stops (no "Task was destroyed")
            try:
                future.result(timeout=5)
            except BaseException:
                pass
        if self.api_client is not None:
            try:
                self._run(self.api_client.close(), timeout=5)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)

    # -- configuration ------------------------------------------------------
    async def _read_config(self) -> RenderedConfig | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            cm = await self.core.read_namespaced_config_map(self.config_map, self.namespace,
                                                            _request_timeout=API_TIMEOUT)
        except ApiException as exc:
            if exc.status == 404:
                return RenderedConfig(namespace=self.namespace).with_version()  # nothing configured yet
            raise
        return self._parse(cm.data or {})

    def _parse(self, data: dict[str, str]) -> RenderedConfig | None:
        text = data.get(CONFIG_KEY)
        if not text:
            return RenderedConfig(namespace=self.namespace).with_version()
        try:
            return RenderedConfig.from_json(text)
        except Exception as exc:
            log.error("ConfigMap %s has an unusable %s (%s): keeping the configuration in use", self.config_map,
                      CONFIG_KEY, _brief(exc))
            return None

    async def _watch(self) -> None:
        from kubernetes_asyncio import watch

        backoff = 0.5
        while not self._stopping:
            try:
                config = await self._read_config()
                if config is not None:
                    self._deliver(config)
                cm_list = await self.core.list_namespaced_config_map(
                    self.namespace, field_selector=f"metadata.name={self.config_map}", _request_timeout=API_TIMEOUT)
                version = cm_list.metadata.resource_version
                w = watch.Watch()
                async with w.stream(self.core.list_namespaced_config_map, self.namespace,
                                    field_selector=f"metadata.name={self.config_map}", resource_version=version,
                                    timeout_seconds=300, _request_timeout=330) as stream:
                    backoff = 0.5
                    async for event in stream:
                        obj = event["object"]
                        if event["type"] == "DELETED":
                            config = RenderedConfig(namespace=self.namespace).with_version()
                        else:
                            config = self._parse(obj.data or {})
                        if config is not None:
                            self._deliver(config)
            except asyncio.CancelledError:
                return
            except Exception as exc:
                if self._stopping:
                    return
                log.warning("watching ConfigMap %s failed (%s); retrying in %.1fs", self.config_map, _brief(exc),
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10)

    def _deliver(self, config: RenderedConfig) -> None:
        if self._on_config is not None:
            self._on_config(config)
        try:
            tmp = self.cache_file.with_name(".tmp-" + self.cache_file.name)
            tmp.write_text(config.to_json())
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            log.warning("cannot cache the applied configuration: %s", exc)
        if config.version != self.published:
            asyncio.ensure_future(self._publish(config.version))

    def publish_destination_problems(self, problems: dict[str, str]) -> None:
        """Tell the operator which destinations the export agent cannot serve (any thread)."""
        import json

        data = {DESTINATION_PROBLEMS_KEY: json.dumps(problems, sort_keys=True)}
        self.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._patch_status(data, "destination problems")))

    async def _publish(self, version: str) -> None:
        """Tell the operator which configuration version this adapter runs."""
        data = {APPLIED_VERSION_KEY: version, "adapter": self.identity,
                "appliedAt": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
        if await self._patch_status(data, "applied version"):
            self.published = version
            log.info("published applied configuration version %s", version)

    async def _patch_status(self, data: dict[str, str], what: str) -> bool:
        """Merge ``data`` into the status ConfigMap (created when missing), retrying; False if stopped."""
        from kubernetes_asyncio.client.exceptions import ApiException

        for attempt in range(100):
            try:
                try:
                    await self.core.patch_namespaced_config_map(self.status_config_map, self.namespace,
                                                                {"data": data}, _request_timeout=API_TIMEOUT)
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    body = {"metadata": {"name": self.status_config_map, "namespace": self.namespace,
                                         "labels": {"app.kubernetes.io/part-of": "clara-dicom"}}, "data": data}
                    await self.core.create_namespaced_config_map(self.namespace, body, _request_timeout=API_TIMEOUT)
                return True
            except Exception as exc:
                if self._stopping:
                    return False
                log.warning("publishing %s failed (%s); retrying", what, _brief(exc))
                await asyncio.sleep(min(0.5 * 2**attempt, 10))
        return False

    # -- job sink -----------------------------------------------------------
    def create(self, manifest: dict[str, Any]) -> bool:
        """JobSink: create a PipelineJob; False if it already exists; raise to retry."""
        return self._run(self._create(manifest))

    async def _create(self, manifest: dict[str, Any]) -> bool:
        from kubernetes_asyncio.client.exceptions import ApiException

        body = dict(manifest)
        body["metadata"] = {**manifest["metadata"], "namespace": self.namespace}
        try:
            await self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "pipelinejobs", body,
                                                              _request_timeout=API_TIMEOUT)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise RuntimeError(f"creating PipelineJob {manifest['metadata']['name']}: HTTP {exc.status} "
                               f"{exc.reason}") from None


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200]
