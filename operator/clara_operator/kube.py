"""The Kubernetes API calls of the PipelineJob and RegisterResults controllers
(kubernetes_asyncio), and how a refused request reads in a status."""
from __future__ import annotations

import json
from typing import Any

from clara_dicom.models import GROUP, VERSION

MERGE = "application/merge-patch+json"
PIPELINEJOBS = "pipelinejobs"
CLARAPIPELINES = "clarapipelines"
REGISTERRESULTS = "registerresults"


class Kube:
    def __init__(self, api_client: Any) -> None:
        from kubernetes_asyncio import client

        self.api_client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.ApiException = client.ApiException

    def plain(self, obj: Any) -> Any:
        """A client model as the API's JSON (camelCase keys, RFC 3339 times)."""
        return self.api_client.sanitize_for_serialization(obj)

    async def _get(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """The call's result; None on 404."""
        try:
            return await call(*args, **kwargs)
        except self.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # ---- custom objects
    async def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._get(self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)

    async def list(self, plural: str, namespace: str | None) -> list[dict[str, Any]]:
        if namespace is None:
            result = await self.custom.list_cluster_custom_object(GROUP, VERSION, plural)
        else:
            result = await self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
        return result.get("items", [])

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]
                           ) -> dict[str, Any] | None:
        """Merge-patch the status; the object as stored (None: it is gone)."""
        return await self._get(self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace,
                               plural, name, {"status": status}, _content_type=MERGE)

    async def delete(self, plural: str, namespace: str, name: str) -> None:
        await self._get(self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, plural, name,
                        propagation_policy="Background")

    # ---- batch Jobs and pods
    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        job = await self._get(self.batch.read_namespaced_job, name, namespace)
        return None if job is None else self.plain(job)

    async def list_jobs(self, namespace: str | None, selector: str) -> list[dict[str, Any]]:
        if namespace is None:
            resp = await self.batch.list_job_for_all_namespaces(label_selector=selector)
        else:
            resp = await self.batch.list_namespaced_job(namespace, label_selector=selector)
        return self.plain(resp).get("items", [])

    async def create_job(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create the Job; None if one of that name exists (the names are deterministic)."""
        try:
            resp = await self.batch.create_namespaced_job(manifest["metadata"]["namespace"], manifest)
        except self.ApiException as exc:
            if exc.status == 409:
                return None
            raise
        return self.plain(resp)

    async def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        resp = await self.core.list_namespaced_pod(namespace, label_selector=f"job-name={job}")
        return self.plain(resp).get("items", [])


def api_message(exc: BaseException) -> str:
    """The API server's own message of a failed request (its Status body), else the error."""
    body = getattr(exc, "body", None)
    if body:
        try:
            message = json.loads(body).get("message")
        except (ValueError, AttributeError):
            message = None
        if message:
            return str(message)[:1000]
    status, reason = getattr(exc, "status", None), getattr(exc, "reason", None)
    if status:
        return f"{status} {reason or ''}".strip()
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:1000]


def refusal(exc: BaseException) -> tuple[str, str]:
    """(condition reason, message) of a create the API refused or could not take:

    QuotaExceeded     a ResourceQuota forbids it (403 … exceeded quota / status unknown for quota)
    AdmissionDenied   an admission policy or webhook denied it (403/422 from admission)
    APIUnavailable    the API server did not answer, or answered 429/5xx
    JobRefused        anything else (the message says what)
    """
    status = getattr(exc, "status", None)
    message = api_message(exc)
    lower = message.lower()
    if status == 403 and "quota" in lower:
        return "QuotaExceeded", message
    if status in (400, 403, 422) and ("admission" in lower or "denied" in lower or "validatingadmissionpolicy" in lower):
        return "AdmissionDenied", message
    if status is None or status == 0 or status == 429 or status >= 500:
        return "APIUnavailable", message
    return "JobRefused", message


__all__ = ["Kube", "refusal", "api_message", "PIPELINEJOBS", "CLARAPIPELINES", "REGISTERRESULTS", "MERGE"]
