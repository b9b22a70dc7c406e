"""The adapter follows the operator's configuration ConfigMap on a real kube-apiserver,
whatever the moment the ConfigMap appears (a race the e2e suite once lost)."""
from __future__ import annotations

import threading

import pytest
from peers import wait_for

from clara_adapter.k8s_client import KubeClient
from clara_adapter.k8s_config import CONFIG_KEY, ConfigWatcher
from clara_dicom.config import RenderedConfig

pytestmark = pytest.mark.e2e

NAME = "clara-dicom-adapter-config"


def config_map(namespace: str, version_of: RenderedConfig) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": NAME, "namespace": namespace},
            "data": {CONFIG_KEY: version_of.to_json()}}


def test_a_configmap_created_just_before_the_watch_starts_is_delivered(k8s_cluster, k8s_namespace, tmp_path):
    ns = k8s_namespace
    wanted = RenderedConfig(namespace=ns, version="created-in-the-gap")
    client = KubeClient(str(k8s_cluster.kubeconfig))
    client.start()
    got = threading.Event()

    def on_config(config: RenderedConfig) -> None:
        if config.version == wanted.version:
            got.set()

    # The operator creates the ConfigMap after the adapter found none and before its watch
    # starts: here, right before the watch's first list.
    original = client.core.list_namespaced_config_map
    created = []

    async def list_after_creating(*args, **kwargs):
        if not created and not kwargs.get("watch"):
            created.append(True)
            k8s_cluster.apply(config_map(ns, wanted))
        return await original(*args, **kwargs)

    client.core.list_namespaced_config_map = list_after_creating
    watcher = ConfigWatcher(client, ns, NAME, tmp_path / "applied-config.json")
    try:
        first = watcher.start(on_config)
        assert first is not None and first.version != wanted.version  # nothing there at the start
        wait_for(got.is_set, 20, what="the ConfigMap created in the gap delivered")
        assert created
    finally:
        watcher.stop()
        client.stop()
