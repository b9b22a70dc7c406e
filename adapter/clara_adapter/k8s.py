"""Kubernetes mode: configuration from the operator's ConfigMap (k8s_config),
the applied version published back (k8s_status), and PipelineJobs as the job
sink (k8s_sink), sharing one API client on one asyncio loop (k8s_client)."""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

from clara_dicom.config import RenderedConfig

from clara_adapter.k8s_client import KubeClient
from clara_adapter.k8s_config import CONFIG_KEY, ConfigWatcher
from clara_adapter.k8s_sink import PipelineJobSink
from clara_adapter.k8s_status import (APPLIED_VERSION_KEY, DESTINATION_PROBLEMS_KEY, VersionPublisher,
                                      config_map_writer, destination_problems_writer)

__all__ = ["APPLIED_VERSION_KEY", "CONFIG_KEY", "DESTINATION_PROBLEMS_KEY", "KubeBridge"]


class KubeBridge:
    """The three Kubernetes roles of the adapter, wired to one client."""

    def __init__(self, namespace: str, config_map: str, status_config_map: str, cache_file: Path,
                 kubeconfig: str | None = None):
        self.namespace = namespace
        self.client = KubeClient(kubeconfig)
        self.identity = os.environ.get("POD_NAME") or socket.gethostname()
        self.watcher = ConfigWatcher(self.client, namespace, config_map, cache_file)
        self.sink = PipelineJobSink(self.client, namespace)
        self.publisher = VersionPublisher(self.client.loop, config_map_writer(self.client, namespace,
                                                                              status_config_map, self.identity))
        self.problems_publisher = VersionPublisher(
            self.client.loop, destination_problems_writer(self.client, namespace, status_config_map),
            what="destination problems")

    def start(self, on_config: Callable[[RenderedConfig], None]) -> RenderedConfig | None:
        """Connect; return the current configuration and watch for changes."""
        self.client.start()
        return self.watcher.start(on_config)

    def publish(self, version: str) -> None:
        """The adapter applied this configuration version (call in the order applied)."""
        self.publisher.publish(version)

    def publish_destination_problems(self, problems: dict[str, str]) -> None:
        """Tell the operator which destinations the export agent cannot serve (any thread; newest wins)."""
        self.problems_publisher.publish(json.dumps(problems, sort_keys=True))

    def create(self, manifest: dict[str, Any]) -> bool:
        """JobSink: create a PipelineJob; False if it already exists; raise to retry."""
        return self.sink.create(manifest)

    def stop(self) -> None:
        self.publisher.stopping = self.problems_publisher.stopping = True
        self.watcher.stop()
        self.client.stop()
