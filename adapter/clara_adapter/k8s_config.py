"""The adapter's configuration from the operator's ConfigMap: read at start,
then watched; each version delivered in the order the API served it."""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Callable

from clara_dicom.config import RenderedConfig
from clara_dicom.retrying import KUBE_WATCH

from clara_adapter.k8s_client import API_TIMEOUT, KubeClient, brief

log = logging.getLogger(__name__)

CONFIG_KEY = "config.json"  # same keys as the operator's rendering


class ConfigWatcher:
    def __init__(self, client: KubeClient, namespace: str, config_map: str, cache_file: Path):
        self.client = client
        self.namespace = namespace
        self.config_map = config_map
        self.cache_file = Path(cache_file)
        self._on_config: Callable[[RenderedConfig], None] | None = None
        self._future: "asyncio.Future | None" = None
        self.stopping = False

    def start(self, on_config: Callable[[RenderedConfig], None]) -> RenderedConfig | None:
        """Return the current configuration (from the API, else the last one
        cached before a restart, else None); then deliver every later one."""
        self._on_config = on_config
        config = None
        try:
            config = self.client.run(self._read())
        except Exception as exc:
            log.warning("configuration ConfigMap %s/%s not readable yet (%s); %s", self.namespace, self.config_map,
                        brief(exc), "using the last applied one" if self.cache_file.exists() else "waiting")
        if config is None and self.cache_file.exists():
            try:
                config = RenderedConfig.from_json(self.cache_file.read_text())
            except Exception:
                config = None
        self._future = self.client.spawn(self._watch())
        return config

    def stop(self) -> None:
        self.stopping = True
        if self._future is not None:
            self._future.cancel()  # ends the watch task before the loop stops (no "Task was destroyed")
            try:
                self._future.result(timeout=5)
            except BaseException:
                pass

    async def _read(self) -> RenderedConfig | None:
        from kubernetes_asyncio.client.exceptions import ApiException

        try:
            cm = await self.client.core.read_namespaced_config_map(self.config_map, self.namespace,
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
                      CONFIG_KEY, brief(exc))
            return None

    async def _watch(self) -> None:
        from kubernetes_asyncio import watch

        core = self.client.core
        backoff = KUBE_WATCH.backoff()
        while not self.stopping:
            try:
                # The state and the version to watch from in one list: a separate read before it
                # missed a ConfigMap created between the two (the watch starts after its creation).
                cm_list = await core.list_namespaced_config_map(
                    self.namespace, field_selector=f"metadata.name={self.config_map}", _request_timeout=API_TIMEOUT)
                version = cm_list.metadata.resource_version
                config = (self._parse(cm_list.items[0].data or {}) if cm_list.items
                          else RenderedConfig(namespace=self.namespace).with_version())
                if config is not None:
                    self._deliver(config)
                w = watch.Watch()
                async with w.stream(core.list_namespaced_config_map, self.namespace,
                                    field_selector=f"metadata.name={self.config_map}", resource_version=version,
                                    timeout_seconds=300, _request_timeout=330) as stream:
                    backoff.reset()
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
                if self.stopping:
                    return
                delay = backoff.next()
                log.warning("watching ConfigMap %s failed (%s); retrying in %.1fs", self.config_map, brief(exc),
                            delay)
                await asyncio.sleep(delay)

    def _deliver(self, config: RenderedConfig) -> None:
        if self._on_config is not None:
            self._on_config(config)
        try:
            tmp = self.cache_file.with_name(".tmp-" + self.cache_file.name)
            tmp.write_text(config.to_json())
            os.replace(tmp, self.cache_file)
        except OSError as exc:
            log.warning("cannot cache the applied configuration: %s", exc)
