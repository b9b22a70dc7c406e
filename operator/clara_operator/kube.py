"""The Kubernetes API calls of the PipelineJob and RegisterResults controllers
(kubernetes_asyncio), and how a refused request reads in a status.

Jobs and pods are read as the API's JSON (``_preload_content=False`` + json.loads):
the typed models cost a deserialisation and a sanitize_for_serialization per object,
which was a quarter of the operator's CPU at 1,000 PipelineJobs. Lists are paged
(``LIST_PAGE`` objects per request) so a resync over thousands of objects never holds
one huge response."""
from __future__ import annotations

import json
from typing import Any, Callable

from clara_dicom.models import GROUP, VERSION

MERGE = "application/merge-patch+json"
# A create answered with the new object's metadata only (what a new Job's status is: empty); a
# server that cannot, answers the whole object, which reads the same through seen.trim_job.
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1, application/json"
PIPELINEJOBS = "pipelinejobs"
LIST_PAGE = 500
Keep = Callable[[dict[str, Any]], dict[str, Any]]
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

    async def read_json(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        """The call's response body as the API's JSON (no typed model); raises ApiException on a non-2xx."""
        from kubernetes_asyncio.client.rest import RESTResponse

        resp = await call(*args, _preload_content=False, **kwargs)
        try:
            data = await resp.read()
        finally:
            resp.release()
        if not 200 <= resp.status <= 299:
            raise self.ApiException(http_resp=RESTResponse(resp, data))
        return json.loads(data)

    async def _paged(self, call: Any, *args: Any, keep: Keep | None = None, **kwargs: Any) -> list[dict[str, Any]]:
        """Every item, page by page; ``keep`` trims each one as its page arrives."""
        items, _ = await self._paged_versioned(call, *args, keep=keep, **kwargs)
        return items

    async def _paged_versioned(self, call: Any, *args: Any, keep: Keep | None = None, **kwargs: Any
                               ) -> tuple[list[dict[str, Any]], str | None]:
        """`_paged`, and the list's resourceVersion (where a watch of it starts)."""
        items: list[dict[str, Any]] = []
        token = None
        while True:
            page = await self.read_json(call, *args, limit=LIST_PAGE, **({"_continue": token} if token else {}), **kwargs)
            items.extend(page.get("items") or [] if keep is None else map(keep, page.get("items") or []))
            meta = page.get("metadata") or {}
            token = meta.get("continue")
            if not token:
                return items, meta.get("resourceVersion")

    async def list(self, plural: str, namespace: str | None, keep: Keep | None = None) -> list[dict[str, Any]]:
        items, _ = await self.list_versioned(plural, namespace, keep)
        return items

    async def list_versioned(self, plural: str, namespace: str | None, keep: Keep | None = None
                             ) -> tuple[list[dict[str, Any]], str | None]:
        """The custom objects of ``namespace`` (None: every namespace) and the list's resourceVersion."""
        if namespace is None:
            return await self._paged_versioned(self.custom.list_cluster_custom_object, GROUP, VERSION, plural,
                                               keep=keep)
        return await self._paged_versioned(self.custom.list_namespaced_custom_object, GROUP, VERSION, namespace,
                                           plural, keep=keep)

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
        return await self._get(self.read_json, self.batch.read_namespaced_job, name, namespace)

    async def list_jobs(self, namespace: str | None, selector: str, keep: Keep | None = None) -> list[dict[str, Any]]:
        items, _ = await self.list_jobs_versioned(namespace, selector, keep)
        return items

    async def list_jobs_versioned(self, namespace: str | None, selector: str, keep: Keep | None = None
                                  ) -> tuple[list[dict[str, Any]], str | None]:
        """The Jobs of ``namespace`` (None: every namespace) and the list's resourceVersion."""
        if namespace is None:
            return await self._paged_versioned(self.batch.list_job_for_all_namespaces, label_selector=selector,
                                               keep=keep)
        return await self._paged_versioned(self.batch.list_namespaced_job, namespace, label_selector=selector,
                                           keep=keep)

    async def create_job(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create the Job; its metadata as stored (no spec, no status: see METADATA_ONLY), or None if
        one of that name exists (the names are deterministic). The whole Job back, pod template and
        managedFields, was a third of a create's CPU in the operator, and serialising it the server's."""
        try:
            return await self.read_json(self.api_client.call_api, "/apis/batch/v1/namespaces/{namespace}/jobs",
                                        "POST", {"namespace": manifest["metadata"]["namespace"]}, [],
                                        {"Accept": METADATA_ONLY, "Content-Type": "application/json"},
                                        body=manifest, auth_settings=["BearerToken"], response_types_map={})
        except self.ApiException as exc:
            if exc.status == 409:
                return None
            raise

    async def create_event(self, namespace: str, event: dict[str, Any]) -> None:
        await self.read_json(self.core.create_namespaced_event, namespace, event)

    async def job_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return await self._paged(self.core.list_namespaced_pod, namespace, label_selector=f"job-name={job}")


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
