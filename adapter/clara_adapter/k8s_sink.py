"""The Kubernetes job sink: PipelineJob objects created through the API."""
from __future__ import annotations

from typing import Any

from clara_dicom.models import GROUP, VERSION

from clara_adapter.k8s_client import API_TIMEOUT, KubeClient


class PipelineJobSink:
    def __init__(self, client: KubeClient, namespace: str):
        self.client = client
        self.namespace = namespace

    def create(self, manifest: dict[str, Any]) -> bool:
        """JobSink: create a PipelineJob; False if it already exists; raise to retry."""
        return self.client.run(self._create(manifest))

    async def _create(self, manifest: dict[str, Any]) -> bool:
        from kubernetes_asyncio.client.exceptions import ApiException

        body = dict(manifest)
        body["metadata"] = {**manifest["metadata"], "namespace": self.namespace}
        try:
            await self.client.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "pipelinejobs",
                                                                     body, _request_timeout=API_TIMEOUT)
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise RuntimeError(f"creating PipelineJob {manifest['metadata']['name']}: HTTP {exc.status} "
                               f"{exc.reason}") from None
