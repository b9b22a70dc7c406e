"""Task states, validation rules and the task record shared by store, API and client.

Imports only the standard library so the CLI modules can use the rules
(agent names, states) without pulling in FastAPI or pydantic.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import enum
import re
from typing import Any

#: An agent name: letters, digits and hyphens, starting with a letter and not
#: ending with a hyphen (SPEC §2, RegisterResults.agent), at most 63 characters.
AGENT_PATTERN = r"^[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$"
AGENT_RE = re.compile(AGENT_PATTERN)

#: A payload ID names a directory under the payloads root, so it must be a
#: single safe path segment.
PAYLOAD_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$"
PAYLOAD_ID_RE = re.compile(PAYLOAD_ID_PATTERN)

#: Job and pipeline IDs: printable, no surrounding whitespace, 1..253 characters.
ID_PATTERN = r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,251}[^\s\x00-\x1f\x7f])?$"
ID_RE = re.compile(ID_PATTERN)

#: A lease id (the fencing token ``GET …/pending`` hands out): opaque, hex digits today.
LEASE_ID_PATTERN = r"^[A-Za-z0-9-]{1,64}$"

MAX_URIS = 100_000
MAX_URI_LENGTH = 4096
MAX_PARAMETERS_LENGTH = 65_536
MAX_IDEMPOTENCY_KEY_LENGTH = 256


class TaskState(enum.IntEnum):
    """Clara's task states."""

    PENDING = 1
    IN_PROGRESS = 2
    SUCCEEDED = 3
    FAILED = 4

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED)


def is_valid_agent(name: object) -> bool:
    return isinstance(name, str) and AGENT_RE.match(name) is not None


def text_problem(value: str) -> str | None:
    """Why a string cannot be stored (NUL/control characters, lone surrogates), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "contains characters that are not valid Unicode"
    if "\x00" in value:
        return "contains a NUL character"
    return None


def uri_problem(uri: str) -> str | None:
    """Why ``uri`` is not an acceptable task URI (a relative path inside the payload), or None."""
    if not uri:
        return "is empty"
    if len(uri) > MAX_URI_LENGTH:
        return f"is longer than {MAX_URI_LENGTH} characters"
    problem = text_problem(uri)
    if problem:
        return problem
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return "contains control characters"
    if uri.startswith("/") or uri.startswith("\\") or re.match(r"^[A-Za-z]:", uri):
        return "must be relative to the payload directory"
    parts = re.split(r"[/\\]", uri)
    if any(p == ".." for p in parts):
        return "must not contain '..' segments"
    return None


def iso_time(ts: float) -> str:
    """Seconds since the epoch as the API writes times: ISO 8601, UTC, ``Z``."""
    return _dt.datetime.fromtimestamp(ts, tz=_dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """The inverse of :func:`iso_time`."""
    return _dt.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def _iso(ts: float | None) -> str | None:
    return None if ts is None else iso_time(ts)


@dataclasses.dataclass(frozen=True)
class Task:
    """One task as stored by the Results Service.

    ``parameters`` is a string (by convention the JSON serialisation of one
    ``--data`` element) or None. ``uris`` are paths relative to the job's payload
    directory. Times are seconds since the epoch (UTC). ``lease_id`` is the fencing
    token of the lease that handed the task out (None elsewhere, and from services
    written for Clara, which have none).
    """

    id: str
    job_id: str
    pipeline_id: str
    payload_id: str
    agent: str
    parameters: str | None
    uris: tuple[str, ...]
    state: TaskState
    retries: int
    created_at: float
    updated_at: float
    operator: str | None = None
    idempotency_key: str | None = None
    available_at: float | None = None
    lease_expires_at: float | None = None
    finished_at: float | None = None
    #: The lease's fencing token; only set on tasks just handed out by a lease.
    lease_id: str | None = None

    @property
    def task_id(self) -> str:
        return self.id

    def to_json(self) -> dict[str, Any]:
        """The Clara-compatible JSON form (camelCase) used by the HTTP API."""
        return {
            "id": self.id,
            "jobId": self.job_id,
            "pipelineId": self.pipeline_id,
            "payloadId": self.payload_id,
            "operator": self.operator,
            "agent": self.agent,
            "parameters": self.parameters,
            "uris": list(self.uris),
            "state": int(self.state),
            "stateName": STATE_NAMES[self.state],
            "retries": self.retries,
            "idempotencyKey": self.idempotency_key,
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.updated_at),
            "availableAt": _iso(self.available_at),
            "leaseId": self.lease_id,
            "leaseExpiresAt": _iso(self.lease_expires_at),
            "finishedAt": _iso(self.finished_at),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Task":
        """Parse the JSON form returned by the API (the inverse of :meth:`to_json`)."""

        def ts(key: str) -> float | None:
            v = data.get(key)
            return None if v is None else parse_time(v)

        return cls(
            id=str(data["id"]),
            job_id=data["jobId"],
            pipeline_id=data["pipelineId"],
            payload_id=data["payloadId"],
            agent=data["agent"],
            parameters=data.get("parameters"),
            uris=tuple(data.get("uris") or ()),
            state=TaskState(int(data["state"])),
            retries=int(data.get("retries") or 0),
            created_at=ts("createdAt") or 0.0,
            updated_at=ts("updatedAt") or 0.0,
            operator=data.get("operator"),
            idempotency_key=data.get("idempotencyKey"),
            available_at=ts("availableAt"),
            lease_expires_at=ts("leaseExpiresAt"),
            finished_at=ts("finishedAt"),
            lease_id=data.get("leaseId"),
        )


STATE_NAMES = {
    TaskState.PENDING: "Pending",
    TaskState.IN_PROGRESS: "InProgress",
    TaskState.SUCCEEDED: "Succeeded",
    TaskState.FAILED: "Failed",
}


@dataclasses.dataclass(frozen=True)
class NewTask:
    """What a client submits (already validated by the API layer)."""

    job_id: str
    pipeline_id: str
    payload_id: str
    agent: str
    uris: tuple[str, ...]
    parameters: str | None = None
    operator: str | None = None
    idempotency_key: str | None = None
