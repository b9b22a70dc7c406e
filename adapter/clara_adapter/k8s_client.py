"""One asyncio loop on a background thread for all of the adapter's
Kubernetes API traffic; the adapter's threads call into it synchronously."""
from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from clara_dicom.errors import UserError

API_TIMEOUT = 10.0


class KubeClient:
    def __init__(self, kubeconfig: str | None = None):
        self.kubeconfig = kubeconfig
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="clara-kube", daemon=True)
        self.api_client: Any = None
        self.core: Any = None
        self.custom: Any = None

    def start(self) -> None:
        self._thread.start()
        self.run(self._connect())

    def run(self, coro: Any, timeout: float = API_TIMEOUT + 5) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def spawn(self, coro: Any) -> "asyncio.Future[Any]":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

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

    def stop(self) -> None:
        if self.api_client is not None:
            try:
                self.run(self.api_client.close(), timeout=5)
            except Exception:
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200]
