"""Structured (key=value) logging, and the patient-data hash used in logs and names."""
from __future__ import annotations

import hashlib
import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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
