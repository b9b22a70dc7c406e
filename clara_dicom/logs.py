"""Logging for every component: text for people at a terminal, one JSON object a
line for a cluster's log indexer; and the patient-data hash used in logs and names.

JSON lines carry stable fields: ``time`` (UTC, ISO 8601), ``level``,
``component`` (the command: adapter, up, operator, results-service,
register-results, ...), ``logger``, ``message``, and when known ``event`` (a
short stable key such as ``group.closed``), ``aeTitle``, ``job`` and ``group``
(a group's hash, never its value). Code adds the optional fields with
``extra=fields(...)`` on one call, or ``with log_context(...)`` for everything
logged in that thread/task meanwhile. Patient data never goes into any field.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import hashlib
import json
import logging
import os
import sys
from typing import Any, Iterator

LOG_FORMATS = ("text", "json")
ENV_LOG_FORMAT = "CLARA_LOG_FORMAT"
# The optional fields a log call or context may add; anything else passed in
# ``extra`` stays out of the JSON line (it may be a library's private detail).
CONTEXT_FIELDS = ("event", "aeTitle", "job", "group")

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("clara_log_context", default={})


def fields(event: str | None = None, **values: Any) -> dict[str, str]:
    """``extra=`` for one log call: ``log.info("...", extra=fields("group.closed", aeTitle=ae, group=h))``."""
    out = {k: str(v) for k, v in values.items() if v is not None}
    unknown = set(out) - set(CONTEXT_FIELDS)
    if unknown:
        raise ValueError(f"unknown log fields {sorted(unknown)}; use {CONTEXT_FIELDS}")
    if event is not None:
        out["event"] = event
    return out


@contextlib.contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Add fields (aeTitle, job, group) to every record logged inside the block."""
    merged = dict(_context.get())
    merged.update(fields(**values))
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    """Copies the current log context onto each record (a call's own ``extra`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str):
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        when = _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc)
        out: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "component": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = record.__dict__.get(key)
            if value is not None:
                out[key] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def resolve_format(fmt: str | None = None, env: dict[str, str] | None = None) -> str:
    """The flag if given, else ``CLARA_LOG_FORMAT``, else text. Raises ValueError on an unknown name."""
    env = os.environ if env is None else env
    chosen = fmt or env.get(ENV_LOG_FORMAT) or "text"
    chosen = chosen.strip().lower()
    if chosen not in LOG_FORMATS:
        source = "--log-format" if fmt else ENV_LOG_FORMAT
        raise ValueError(f"{source}: unknown log format {chosen!r} (choose json or text)")
    return chosen


def setup_logging(level: int = logging.INFO, fmt: str = "text", component: str = "clara-dicom") -> None:
    handler = logging.StreamHandler(sys.stderr)
    text = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter(component) if fmt == "json" else text)
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at DEBUG and association details at INFO.
    logging.getLogger("pynetdicom").setLevel(max(level, logging.WARNING))
    # httpx logs every request at INFO: the export agent polls constantly.
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))


def short_hash(value: str, length: int = 10) -> str:
    """A short, stable stand-in for a value that may be patient data.

    Use this wherever an identifier must appear in names, labels, metrics,
    Events or logs.
    """
    return hashlib.sha256(value.encode("utf-8")).hexdigest()[:length]
