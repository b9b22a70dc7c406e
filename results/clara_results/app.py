"""The Results Service HTTP API (FastAPI): Clara-compatible task endpoints.

``create_app(store, token)`` builds the ASGI application. Every request except
``/health/*`` needs ``Authorization: Bearer <token>``. Every bad request gets a
4xx JSON body ``{"message": "...", "details": [...]}``; an unavailable database
gives 503. See README.md in this folder for the endpoint summary.
"""
from __future__ import annotations

import hmac
import json
import logging
import uuid
from typing import Any, Awaitable, Callable, Optional

from fastapi import Body, FastAPI, Path, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CollectorRegistry, Counter, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from clara_results import models as m
from clara_results.models import NewTask, TaskState
from clara_results.store import StoreUnavailable, TaskConflict, TaskNotFound, TaskStore

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 * 1024 * 1024
API_VERSION = "1.0.0"


# --------------------------------------------------------------------------- schemas
class TaskCreate(BaseModel):
    """A task to register. Unknown fields are ignored (Clara clients may send more)."""

    model_config = ConfigDict(extra="ignore")

    jobId: str = Field(pattern=m.ID_PATTERN, description="The pipeline job that produced the results.")
    pipelineId: str = Field(pattern=m.ID_PATTERN, description="The pipeline the job ran.")
    payloadId: str = Field(
        pattern=m.PAYLOAD_ID_PATTERN,
        description="The job's payload; `uris` are relative to `<payloads root>/<payloadId>/`.",
    )
    agent: str = Field(
        pattern=m.AGENT_PATTERN,
        description="Who processes the task (e.g. `ClaraSCU`, `renderserver`): letters, digits, hyphens; "
        "starts with a letter, does not end with a hyphen; at most 63 characters.",
    )
    parameters: Optional[str] = Field(
        default=None,
        max_length=m.MAX_PARAMETERS_LENGTH,
        description="Free text for the agent, by convention JSON (register-results stores the JSON "
        'serialisation of one `--data` element, e.g. `"\\"Orthanc\\""`), or null.',
    )
    uris: list[str] = Field(
        min_length=1,
        max_length=m.MAX_URIS,
        description="Result files, as paths relative to the payload directory (no leading `/`, no `..`).",
    )
    operator: Optional[str] = Field(
        default=None, pattern=m.ID_PATTERN, description="The pipeline operator that registered the task."
    )
    idempotencyKey: Optional[str] = Field(
        default=None,
        min_length=1,
        max_length=m.MAX_IDEMPOTENCY_KEY_LENGTH,
        pattern=m.ID_PATTERN,
        description="Creating a task with a key already stored returns the stored task (HTTP 200) "
        "instead of a new one (HTTP 201).",
    )

    @field_validator("parameters")
    @classmethod
    def _parameters_text(cls, v: Optional[str]) -> Optional[str]:
        if v is not None:
            problem = m.text_problem(v)
            if problem:
                raise ValueError(f"parameters {problem}")
        return v

    @field_validator("uris")
    @classmethod
    def _uris_relative(cls, v: list[str]) -> list[str]:
        for i, uri in enumerate(v):
            problem = m.uri_problem(uri)
            if problem:
                raise ValueError(f"uris[{i}] {problem}")
        return v


class TaskOut(BaseModel):
    """A task as the service stores it."""

    id: str = Field(description="Task ID (a UUID); also called taskId in the paths.")
    jobId: str
    pipelineId: str
    payloadId: str
    operator: Optional[str] = None
    agent: str
    parameters: Optional[str] = None
    uris: list[str]
    state: int = Field(ge=1, le=4, description="1 Pending, 2 InProgress, 3 Succeeded, 4 Failed.")
    stateName: str = Field(description="The state's name: Pending, InProgress, Succeeded or Failed.")
    retries: int = Field(ge=0, description="Failures reported so far.")
    idempotencyKey: Optional[str] = None
    createdAt: str
    updatedAt: str
    availableAt: Optional[str] = Field(default=None, description="A Pending task is not leased before this.")
    leaseId: Optional[str] = Field(
        default=None,
        description="The lease's fencing token: set only in the answer of `GET /api/tasks/{agent}/pending` "
        "(new for every lease). Send it back as `?leaseId=` with the report and the renewals.",
    )
    leaseExpiresAt: Optional[str] = Field(
        default=None,
        description="When an InProgress task's lease ends; an expired lease counts as a failed attempt "
        "with retryLater=true.",
    )
    finishedAt: Optional[str] = None

    @classmethod
    def of(cls, task: m.Task) -> "TaskOut":
        # The store's tasks are valid by construction; FastAPI still checks them against response_model.
        return cls.model_construct(**task.to_json())


class LeaseOut(BaseModel):
    """A renewed lease."""

    leaseExpiresAt: str = Field(description="The lease now runs until this time (`--lease-seconds` from now).")


class FailureReport(BaseModel):
    model_config = ConfigDict(extra="ignore")

    retryLater: bool = Field(
        default=False,
        description="true for a transient cause: the task returns to Pending while its retries stay "
        "below the server's --max-retries; false fails it for good.",
    )


class ErrorOut(BaseModel):
    message: str
    details: list[dict[str, Any]] = []


class HealthOut(BaseModel):
    status: str
    message: Optional[str] = None


ERRORS = {
    400: {"model": ErrorOut, "description": "Bad request"},
    401: {"model": ErrorOut, "description": "Missing or wrong bearer token"},
    413: {"model": ErrorOut, "description": "Request body too large"},
    422: {"model": ErrorOut, "description": "Invalid request"},
    503: {"model": ErrorOut, "description": "Database unavailable"},
}
NOT_FOUND = {404: {"model": ErrorOut, "description": "Unknown task"}}
CONFLICT = {409: {"model": ErrorOut, "description": "The task's state does not allow this, or `leaseId` is "
                  "not the task's current lease (superseded or unknown); nothing was changed"}}


def _lease_query(required: bool) -> Any:
    return Query(
        default=... if required else None,
        pattern=m.LEASE_ID_PATTERN,
        description="The `leaseId` the task was leased with. "
        + ("" if required else "Without it (clients written for Clara) the report is accepted while the task "
           "is InProgress, whoever holds the lease."),
    )


# --------------------------------------------------------------------------- metrics
class ResultsMetrics:
    """Prometheus metrics of one service instance (its own registry)."""

    def __init__(self, store: TaskStore) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.created = Counter("clara_results_tasks_created_total", "Tasks created", registry=self.registry)
        self.leased = Counter("clara_results_tasks_leased_total", "Tasks handed out by lease", registry=self.registry)
        self.reports = Counter(
            "clara_results_task_reports_total",
            "Results reported by agents, by outcome (succeeded, retry, failed)",
            ["outcome"],
            registry=self.registry,
        )
        self.renewals = Counter(
            "clara_results_lease_renewals_total", "Leases renewed by their holders", registry=self.registry
        )
        self.purged = Counter(
            "clara_results_tasks_purged_total", "Finished tasks deleted after retention", registry=self.registry
        )
        self.requests = Counter(
            "clara_results_http_requests_total",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(store))


class _StateCollector:
    def __init__(self, store: TaskStore) -> None:
        self.store = store

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        up = GaugeMetricFamily("clara_results_store_up", "1 when the database answers")
        g = GaugeMetricFamily("clara_results_tasks", "Tasks currently stored, by state", labels=["state"])
        try:
            counts = self.store.count_by_state()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is down
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for state, n in counts.items():
            g.add_metric([m.STATE_NAMES[state]], n)
        yield g


# --------------------------------------------------------------------------- middleware
def _json_bytes(status: int, message: str) -> bytes:
    return json.dumps({"message": message, "details": []}).encode()


class GuardMiddleware:
    """Bearer-token check (all paths but /health/*), body size limit, request metrics."""

    def __init__(self, app: Any, token: str, metrics: ResultsMetrics) -> None:
        self.app = app
        self.token = token.encode("utf-8")
        self.metrics = metrics

    async def _reply(self, send: Callable[..., Awaitable[None]], status: int, message: str,
                     extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
        body = _json_bytes(status, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += list(extra_headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _authorised(self, scope: dict[str, Any]) -> tuple[bool, str]:
        header = None
        for k, v in scope.get("headers") or []:
            if k == b"authorization":
                header = v
                break
        if header is None:
            return False, "missing bearer token: send 'Authorization: Bearer <token>'"
        scheme, _, value = header.partition(b" ")
        if scheme.lower() != b"bearer" or not value.strip():
            return False, "malformed Authorization header: expected 'Bearer <token>'"
        if not hmac.compare_digest(value.strip(), self.token):
            return False, "wrong bearer token"
        return True, ""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status_holder = {"status": 500}

        async def send_wrapper(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "?")
            if method not in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"):
                method = "other"
            self.metrics.requests.labels(method, template, str(status_holder["status"])).inc()

    async def _handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if not path.startswith("/health/"):
            ok, why = self._authorised(scope)
            if not ok:
                await self._reply(send, 401, why, [(b"www-authenticate", b'Bearer realm="clara-results"')])
                return
        method = scope.get("method", "GET")
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            for k, v in scope.get("headers") or []:
                if k == b"content-length":
                    try:
                        length = int(v)
                    except ValueError:
                        await self._reply(send, 400, "invalid Content-Length header")
                        return
                    if length > MAX_BODY_BYTES:
                        await self._reply(send, 413, f"request body larger than {MAX_BODY_BYTES} bytes")
                        return
            # Buffer the body (bounded) so an oversized chunked body is refused cleanly too.
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                total += len(chunk)
                if total > MAX_BODY_BYTES:
                    await self._reply(send, 413, f"request body larger than {MAX_BODY_BYTES} bytes")
                    return
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            sent = False

            async def replay() -> dict[str, Any]:
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            await self.app(scope, replay, send)
            return
        await self.app(scope, receive, send)


# --------------------------------------------------------------------------- app
def _error(status: int, message: str, details: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"message": message, "details": details or []}, status_code=status, headers=headers)


def _short(value: str, n: int = 80) -> str:
    return value if len(value) <= n else value[:n] + "…"


def _parse_task_id(task_id: str) -> str:
    try:
        return str(uuid.UUID(task_id))
    except (ValueError, AttributeError):
        raise TaskNotFound(f"no task with id {_short(task_id)!r} (task IDs are UUIDs)") from None


def create_app(store: TaskStore, token: str, *, metrics: ResultsMetrics | None = None) -> FastAPI:
    """Build the Results Service ASGI app over ``store``, guarded by bearer ``token``."""
    if not token:
        raise ValueError("a non-empty token is required")
    metrics = metrics or ResultsMetrics(store)
    bearer = HTTPBearer(auto_error=False, description="The token from CLARA_RESULTS_TOKEN / --token-file.")
    app = FastAPI(
        title="Clara DICOM Results Service",
        version=API_VERSION,
        description=(
            "Clara-compatible task API. Pipelines register result files as tasks for an agent; agents "
            "lease Pending tasks (which become InProgress until the lease expires), then report success "
            "or failure. The server alone decides retries (`--max-retries`). States: 1 Pending, "
            "2 InProgress, 3 Succeeded, 4 Failed. Every path except /health/* needs "
            "`Authorization: Bearer <token>`."
        ),
        docs_url=None,
        redoc_url=None,
    )
    app.state.store = store
    app.state.metrics = metrics
    auth = [Security(bearer)]

    # ---- errors: always JSON, always 4xx for the caller's mistakes
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            details.append({"loc": _short(loc, 200), "msg": _short(str(err.get("msg", "")), 300),
                            "type": str(err.get("type", ""))})
        first = details[0] if details else {"loc": "request", "msg": "invalid", "type": ""}
        if first["type"] == "json_invalid":
            return _error(422, "invalid request: the body is not valid JSON", details)
        return _error(422, f"invalid request: {first['loc']}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint"
        elif exc.status_code == 405:
            message = "method not allowed on this endpoint"
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(TaskNotFound)
    async def _not_found(_: Request, exc: TaskNotFound) -> JSONResponse:
        return _error(404, str(exc))

    @app.exception_handler(TaskConflict)
    async def _conflict(_: Request, exc: TaskConflict) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_: Request, exc: StoreUnavailable) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        return _error(503, f"database unavailable: {exc}", headers={"Retry-After": "5"})

    # ---- health (no auth)
    @app.get("/health/live", response_model=HealthOut, tags=["health"], summary="Liveness")
    def live() -> dict[str, Any]:
        return {"status": "ok"}

    @app.get("/health/ready", response_model=HealthOut, tags=["health"], summary="Readiness (database answers)",
             responses={503: {"model": HealthOut}})
    def ready() -> Any:
        try:
            store.ping()
        except StoreUnavailable as exc:
            return JSONResponse({"status": "unavailable", "message": str(exc)}, status_code=503)
        return {"status": "ok"}

    # ---- tasks
    @app.post(
        "/api/tasks",
        response_model=TaskOut,
        status_code=201,
        tags=["tasks"],
        summary="Register a task",
        dependencies=auth,
        responses={200: {"model": TaskOut, "description": "A task with this idempotencyKey already exists"},
                   **ERRORS},
    )
    def create_task(response: Response, body: TaskCreate = Body(...)) -> TaskOut:
        new = NewTask(
            job_id=body.jobId, pipeline_id=body.pipelineId, payload_id=body.payloadId, agent=body.agent,
            uris=tuple(body.uris), parameters=body.parameters, operator=body.operator,
            idempotency_key=body.idempotencyKey,
        )
        task, created = store.create(new)
        if created:
            metrics.created.inc()
            log.debug("task created id=%s agent=%s files=%d", task.id, task.agent, len(task.uris))
        else:
            response.status_code = 200
        return TaskOut.of(task)

    @app.get(
        "/api/tasks",
        response_model=list[TaskOut],
        tags=["tasks"],
        summary="List tasks (oldest first)",
        dependencies=auth,
        responses=ERRORS,
    )
    def list_tasks(
        agent: Optional[str] = Query(default=None, pattern=m.AGENT_PATTERN),
        state: Optional[int] = Query(default=None, ge=1, le=4, description="1..4; InProgress tasks whose "
                                     "lease expired count as the failed attempt they are: Pending, or Failed "
                                     "at --max-retries"),
        jobId: Optional[str] = Query(default=None, pattern=m.ID_PATTERN),
        limit: int = Query(default=100, ge=1, le=1000),
        offset: int = Query(default=0, ge=0, le=1_000_000_000),
    ) -> list[TaskOut]:
        tasks = store.list(agent=agent, state=TaskState(state) if state else None, job_id=jobId,
                           limit=limit, offset=offset)
        return [TaskOut.of(t) for t in tasks]

    @app.get(
        "/api/tasks/{taskId}",
        response_model=TaskOut,
        tags=["tasks"],
        summary="Look up one task",
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND},
    )
    def get_task(taskId: str = Path(..., max_length=200)) -> TaskOut:
        return TaskOut.of(store.get(_parse_task_id(taskId)))

    @app.get(
        "/api/tasks/{agent}/pending",
        response_model=list[TaskOut],
        tags=["tasks"],
        summary="Lease up to `size` Pending tasks of an agent",
        description="The tasks become InProgress with a lease: each answer carries a new `leaseId` and its "
        "`leaseExpiresAt` (`--lease-seconds` from now). Renew the lease with `PUT /api/tasks/{taskId}/lease` "
        "while working on the task. A lease that expires counts as a failed attempt with retryLater=true: "
        "retries + 1, the task is Pending again after the usual back-off, or Failed at --max-retries.",
        dependencies=auth,
        responses=ERRORS,
    )
    def lease(
        agent: str = Path(..., pattern=m.AGENT_PATTERN),
        size: int = Query(default=1, ge=1, le=1000, description="How many tasks at most."),
    ) -> list[TaskOut]:
        tasks = store.lease(agent, size)
        if tasks:
            metrics.leased.inc(len(tasks))
        return [TaskOut.of(t) for t in tasks]

    @app.put(
        "/api/tasks/{taskId}/lease",
        response_model=LeaseOut,
        tags=["tasks"],
        summary="Renew a lease",
        description="The lease `leaseId` runs `--lease-seconds` from now; this works for an expired lease "
        "too as long as the task has not been leased again. 409 once another lease exists or the task is "
        "finished: the holder must then stop working on the task and report nothing.",
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    )
    def renew_lease(taskId: str = Path(..., max_length=200),
                    leaseId: str = _lease_query(required=True)) -> LeaseOut:
        expires = store.renew(_parse_task_id(taskId), leaseId)
        metrics.renewals.inc()
        return LeaseOut(leaseExpiresAt=m.iso_time(expires))

    @app.put(
        "/api/tasks/success/{taskId}",
        response_model=TaskOut,
        tags=["tasks"],
        summary="Report that a leased task succeeded",
        description="Accepted while the task's lease `leaseId` is its current one (even if it has expired, "
        "until the task is leased again). Repeating the report with the same lease is harmless. Without "
        "`leaseId`, accepted while the task is InProgress; success is idempotent.",
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    )
    def report_success(taskId: str = Path(..., max_length=200),
                       leaseId: Optional[str] = _lease_query(required=False)) -> TaskOut:
        task = store.report_success(_parse_task_id(taskId), leaseId)
        metrics.reports.labels("succeeded").inc()
        return TaskOut.of(task)

    @app.put(
        "/api/tasks/failure/{taskId}",
        response_model=TaskOut,
        tags=["tasks"],
        summary="Report that a leased task failed",
        description="retries + 1; back to Pending while retryLater and retries < --max-retries "
        "(after a growing delay), otherwise Failed. Fenced by `leaseId` as success is; repeating the "
        "report with the same lease returns the task unchanged.",
        dependencies=auth,
        responses={**ERRORS, **NOT_FOUND, **CONFLICT},
    )
    def report_failure(taskId: str = Path(..., max_length=200),
                       leaseId: Optional[str] = _lease_query(required=False),
                       body: Optional[FailureReport] = Body(default=None)) -> TaskOut:
        report = body or FailureReport()
        task = store.report_failure(_parse_task_id(taskId), report.retryLater, leaseId)
        metrics.reports.labels("retry" if task.state == TaskState.PENDING else "failed").inc()
        return TaskOut.of(task)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics", dependencies=auth,
             response_class=Response, responses={200: {"content": {"text/plain": {}}}, **ERRORS})
    def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - defensive
        log.exception("unexpected error")
        return _error(500, "internal error")

    app.add_middleware(GuardMiddleware, token=token, metrics=metrics)
    return app
