"""Discovery of job-processor plug-ins through Python entry points.

Entry point group ``clara_dicom.processors``: name = JobProcessor ``type``,
value = a class implementing ``clara_adapter.processors.base.JobProcessorBase``.
Kept here (not in the adapter) because the operator validates processor
settings with the same plug-ins.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.metadata import entry_points
from typing import Any

ENTRY_POINT_GROUP = "clara_dicom.processors"


@lru_cache(maxsize=None)
def processor_class(type_name: str) -> Any | None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == type_name:
            return ep.load()
    return None


def installed_types() -> list[str]:
    return sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)})


def validate_processor_spec(spec: Any) -> tuple[str, str] | None:
    """None when the processor's type is installed and accepts its settings,
    else (reason, message) for a Ready=False condition."""
    try:
        cls = processor_class(spec.type)
    except Exception as exc:  # a broken plug-in must not take the operator or adapter down
        return ("UnknownProcessorType", f"processor plug-in {spec.type!r} failed to load: {type(exc).__name__}: {exc}")
    if cls is None:
        known = ", ".join(installed_types()) or "none"
        return ("UnknownProcessorType", f"processor type {spec.type!r} is not installed (installed: {known})")
    try:
        cls.validate(dict(spec.settings))
    except (ValueError, TypeError) as exc:
        return ("InvalidSettings", f"settings rejected by {spec.type}: {exc}")
    return None
