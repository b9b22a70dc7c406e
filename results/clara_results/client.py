"""A small synchronous client for the Results Service (httpx).

    from clara_results.client import ResultsClient, TaskState

    with ResultsClient("http://127.0.0.1:8088", token) as client:
        for task in client.lease("ClaraSCU", size=4):
            ...                       # task.parameters, task.uris, task.payload_id
            client.renew(task.id, task.lease_id)   # while working longer than the lease
            client.report_success(task.id, lease_id=task.lease_id)
            # or client.report_failure(task.id, retry_later=True, lease_id=task.lease_id)

``task.lease_id`` fences the reports: once the lease has been superseded (it expired
and the task was leased again), reports and renewals with it raise
:class:`TaskConflictError` and change nothing.

Errors: every failure raises a :class:`ResultsError` subclass —
:class:`ResultsUnavailable` (cannot connect, timeout, HTTP 5xx: worth retrying),
:class:`ResultsAuthError` (401), :class:`TaskNotFoundError` (404),
:class:`TaskConflictError` (409: the task's state does not allow it),
:class:`ResultsRequestError` (other 4xx: the request itself is wrong).
``.status_code`` holds the HTTP status (None when no answer came), ``str(exc)``
the server's one-line message.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from clara_results.models import Task, TaskState, parse_time

__all__ = [
    "ResultsClient",
    "ResultsError",
    "ResultsUnavailable",
    "ResultsAuthError",
    "ResultsRequestError",
    "TaskNotFoundError",
    "TaskConflictError",
    "Task",
    "TaskState",
]


class ResultsError(Exception):
    def __init__(self, message: str, status_code: int | None = None, retry_after: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.retry_after = retry_after  # the answer's Retry-After header (seconds), if any


class ResultsUnavailable(ResultsError):
    """No answer, or a 5xx: the service or its database is not available right now."""


class ResultsAuthError(ResultsError):
    """401: missing or wrong token."""


class ResultsRequestError(ResultsError):
    """A 4xx other than 401/404/409: the request is invalid."""


class TaskNotFoundError(ResultsRequestError):
    """404: no such task."""


class TaskConflictError(ResultsRequestError):
    """409: e.g. reporting a result for a task that is not leased or already finished."""


class ResultsClient:
    """Synchronous Results Service client. Thread-safe (one shared httpx.Client).

    ``base_url``: e.g. ``http://results:8088`` (a trailing slash is fine);
    ``token``: the bearer token; ``timeout``: seconds per request.
    """

    def __init__(self, base_url: str, token: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
            timeout=timeout,
        )

    # ----------------------------------------------------------------- plumbing
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ResultsClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ResultsUnavailable(f"Results Service at {self.base_url} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise ResultsUnavailable(f"cannot reach the Results Service at {self.base_url}: {exc}") from exc
        if response.status_code < 400:
            return response
        try:
            message = str(response.json().get("message") or response.text)
        except (ValueError, AttributeError):
            message = response.text.strip() or response.reason_phrase
        code = response.status_code
        message = f"Results Service: {message} (HTTP {code})"
        if code >= 500:
            raise ResultsUnavailable(message, code, response.headers.get("Retry-After"))
        if code == 401:
            raise ResultsAuthError(message, code)
        if code == 404:
            raise TaskNotFoundError(message, code)
        if code == 409:
            raise TaskConflictError(message, code)
        raise ResultsRequestError(message, code)

    # ----------------------------------------------------------------- API
    def create_task(
        self,
        *,
        job_id: str,
        pipeline_id: str,
        payload_id: str,
        agent: str,
        uris: list[str] | tuple[str, ...],
        parameters: str | None = None,
        operator: str | None = None,
        idempotency_key: str | None = None,
    ) -> Task:
        """``POST /api/tasks``. With an ``idempotency_key`` already stored, returns the stored task
        (see :meth:`create_task_ex` to learn whether it was new)."""
        return self.create_task_ex(
            job_id=job_id, pipeline_id=pipeline_id, payload_id=payload_id, agent=agent, uris=uris,
            parameters=parameters, operator=operator, idempotency_key=idempotency_key,
        )[0]

    def create_task_ex(self, **kwargs: Any) -> tuple[Task, bool]:
        """Like :meth:`create_task`; returns ``(task, created)``."""
        body = {
            "jobId": kwargs["job_id"],
            "pipelineId": kwargs["pipeline_id"],
            "payloadId": kwargs["payload_id"],
            "agent": kwargs["agent"],
            "parameters": kwargs.get("parameters"),
            "uris": list(kwargs["uris"]),
        }
        if kwargs.get("operator") is not None:
            body["operator"] = kwargs["operator"]
        if kwargs.get("idempotency_key") is not None:
            body["idempotencyKey"] = kwargs["idempotency_key"]
        r = self._request("POST", "/api/tasks", json=body)
        return Task.from_json(r.json()), r.status_code == 201

    def lease(self, agent: str, size: int = 1) -> list[Task]:
        """``GET /api/tasks/{agent}/pending?size=N``: up to ``size`` tasks, now InProgress."""
        r = self._request("GET", f"/api/tasks/{quote(agent, safe='')}/pending", params={"size": size})
        return [Task.from_json(t) for t in r.json()]

    @staticmethod
    def _lease_params(lease_id: str | None) -> dict[str, str]:
        return {} if lease_id is None else {"leaseId": lease_id}

    def report_success(self, task_id: str, lease_id: str | None = None) -> Task:
        """``PUT /api/tasks/success/{taskId}[?leaseId=…]``."""
        r = self._request("PUT", f"/api/tasks/success/{quote(task_id, safe='')}",
                          params=self._lease_params(lease_id))
        return Task.from_json(r.json())

    def report_failure(self, task_id: str, retry_later: bool, lease_id: str | None = None) -> Task:
        """``PUT /api/tasks/failure/{taskId}[?leaseId=…]`` with ``{"retryLater": …}``; the returned
        task's state says what the server decided (Pending = will be retried, Failed = final)."""
        r = self._request("PUT", f"/api/tasks/failure/{quote(task_id, safe='')}",
                          params=self._lease_params(lease_id), json={"retryLater": bool(retry_later)})
        return Task.from_json(r.json())

    def renew(self, task_id: str, lease_id: str) -> float:
        """``PUT /api/tasks/{taskId}/lease?leaseId=…``: the lease runs ``--lease-seconds`` from now;
        returns its new expiry (seconds since the epoch, by the server's clock). Raises
        TaskConflictError once the lease is superseded or the task finished."""
        r = self._request("PUT", f"/api/tasks/{quote(task_id, safe='')}/lease", params={"leaseId": lease_id})
        return parse_time(r.json()["leaseExpiresAt"])

    def get_task(self, task_id: str) -> Task:
        """``GET /api/tasks/{taskId}``; raises TaskNotFoundError."""
        return Task.from_json(self._request("GET", f"/api/tasks/{quote(task_id, safe='')}").json())

    def list_tasks(
        self,
        *,
        agent: str | None = None,
        state: TaskState | int | None = None,
        job_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Task]:
        """``GET /api/tasks`` with optional filters (oldest first, one page)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if agent is not None:
            params["agent"] = agent
        if state is not None:
            params["state"] = int(state)
        if job_id is not None:
            params["jobId"] = job_id
        return [Task.from_json(t) for t in self._request("GET", "/api/tasks", params=params).json()]

    def iter_tasks(self, page_size: int = 500, **filters: Any):
        """Every task matching ``filters`` (agent, state, job_id), page by page."""
        offset = 0
        while True:
            page = self.list_tasks(limit=page_size, offset=offset, **filters)
            yield from page
            if len(page) < page_size:
                return
            offset += page_size

    def ready(self) -> bool:
        """True when ``/health/ready`` answers 200."""
        try:
            return self._http.get("/health/ready").status_code == 200
        except httpx.HTTPError:
            return False
