"""Pipeline-job requests, their names and payloads, the job sinks, and the
submitter that creates jobs with unbounded retry.

Instances are released only once every pipeline's job exists; creation is
idempotent (a job that already exists counts as created), so a retry after a
crash or an API outage never duplicates a job.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Protocol

from clara_dicom.logs import fields, short_hash
from clara_dicom.models import API_VERSION, GROUP

from clara_adapter.journal import InstanceRecord
from clara_adapter.storage import link_or_copy

log = logging.getLogger(__name__)

NAME_MAX = 52
ANNOTATION_CLARA_NAME = f"{GROUP}/clara-job-name"
LABEL_AE_TITLE = f"{GROUP}/ae-title"
LABEL_PROCESSOR = f"{GROUP}/processor"
LABEL_PIPELINE_KEY = f"{GROUP}/pipeline-key"
LABEL_GROUP_HASH = f"{GROUP}/group-hash"


def dns_part(text: str) -> str:
    """Lowercase DNS-label fragment: invalid characters become '-', runs collapse."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "x"


def label_value(text: str) -> str:
    value = re.sub(r"[^A-Za-z0-9_.-]", "-", text)[:63].strip("-_.")
    return value or "x"


@dataclass
class JobRequest:
    """One PipelineJob to create for a closed group."""

    namespace: str
    ae_title: str
    processor: str
    pipeline_key: str
    pipeline_id: str
    priority: str
    group_by: str
    group_value: str
    sequence: str  # unique per group occurrence (journal epoch + group id)
    instances: list[InstanceRecord]
    closed_at: float = field(default_factory=time.time)

    @property
    def name(self) -> str:
        digest = hashlib.sha256(
            "\0".join((self.namespace, self.ae_title, self.processor, self.group_value, self.sequence,
                       self.pipeline_key)).encode()
        ).hexdigest()[:10]
        aet, key = dns_part(self.ae_title), dns_part(self.pipeline_key)
        room = NAME_MAX - len(digest) - 2
        if len(aet) + len(key) > room:
            aet = aet[: max(room // 2, room - len(key))].strip("-") or "x"
            key = key[: room - len(aet)].strip("-") or "x"
        return f"{aet}-{key}-{digest}"

    @property
    def clara_name(self) -> str:
        stamp = datetime.fromtimestamp(self.closed_at, timezone.utc).strftime("%Y%m%d%H%M%S")
        return f"{self.ae_title}-{self.pipeline_key}-{stamp}"

    def manifest(self, payload_path: Path) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": "PipelineJob",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {
                    LABEL_AE_TITLE: label_value(self.ae_title),
                    LABEL_PROCESSOR: label_value(self.processor),
                    LABEL_PIPELINE_KEY: label_value(self.pipeline_key),
                    LABEL_GROUP_HASH: short_hash(self.group_value),
                },
                "annotations": {ANNOTATION_CLARA_NAME: self.clara_name},
            },
            "spec": {
                "pipeline": self.pipeline_id,
                "priority": self.priority,
                "source": {"aeTitle": self.ae_title, "processor": self.processor},
                "group": {"by": self.group_by, "value": self.group_value},
                "payload": {
                    "path": str(payload_path),
                    "instances": len(self.instances),
                    "bytes": sum(i.size for i in self.instances),
                },
            },
        }


def build_payload(payloads_root: Path, request: JobRequest) -> Path:
    """`<root>/<payloadId>/input/<Study>/<Series>/<SOP>.dcm` (hard links) and `operators/`."""
    root = payloads_root / request.name
    made: set[Path] = set()
    for inst in request.instances:
        folder = root / "input" / _safe(inst.study_uid) / _safe(inst.series_uid)
        if folder not in made:
            folder.mkdir(parents=True, exist_ok=True)
            made.add(folder)
        link_or_copy(inst.path, folder / f"{_safe(inst.sop_instance_uid)}.dcm")
    (root / "operators").mkdir(parents=True, exist_ok=True)
    return root


def _safe(uid: str) -> str:
    """UIDs are digits and dots; anything else (a broken sender) must not escape the folder."""
    cleaned = re.sub(r"[^0-9A-Za-z._-]", "_", uid).lstrip(".") or "unknown"
    return cleaned[:128]


class JobSink(Protocol):
    """Where PipelineJobs go. ``create`` is idempotent: an existing job is success."""

    def create(self, manifest: dict[str, Any]) -> bool:
        """Create the job; True if created now, False if it already existed. Raise to retry."""


class LocalJobSink:
    """Local mode: PipelineJob objects written as JSON files under the state folder."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def create(self, manifest: dict[str, Any]) -> bool:
        path = self.folder / f"{manifest['metadata']['name']}.json"
        if path.exists():
            return False
        obj = json.loads(json.dumps(manifest))
        obj["metadata"]["creationTimestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        obj["status"] = {"phase": "Pending"}
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return True

    def list(self) -> list[dict[str, Any]]:
        jobs = []
        for path in sorted(self.folder.glob("[!.]*.json")):
            try:
                jobs.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue
        jobs.sort(key=lambda j: (j["metadata"].get("creationTimestamp", ""), j["metadata"]["name"]))
        return jobs


class JobSubmitter:
    """Creates the jobs of closed groups on worker threads, retrying with
    exponential backoff for as long as it takes."""

    def __init__(self, sink: JobSink, payloads_root: Path, scheduler: Any, journal: Any, metrics: Any = None,
                 max_backoff: float = 30.0, workers: int = 2, synchronous: bool = False):
        self.sink = sink
        self.payloads_root = Path(payloads_root)
        self.scheduler = scheduler
        self.journal = journal
        self.metrics = metrics
        self.max_backoff = max_backoff
        self.synchronous = synchronous  # tests on the manual clock run attempts inline
        self._pool = None if synchronous else concurrent.futures.ThreadPoolExecutor(workers, "clara-submit")
        self.pending = 0  # groups whose jobs are not all created yet (for /health/status)
        self._pending_lock = threading.Lock()

    def submit(self, group_id: int, requests: list[JobRequest], on_done: Callable[[], None],
               deadline: float | None = None) -> None:
        with self._pending_lock:
            self.pending += 1
        self._dispatch(group_id, requests, on_done, 0, deadline)

    def _dispatch(self, group_id, requests, on_done, attempt, deadline) -> None:
        if self._pool is None:
            self._attempt(group_id, requests, on_done, attempt, deadline)
        else:
            try:
                self._pool.submit(self._attempt, group_id, requests, on_done, attempt, deadline)
            except RuntimeError:  # shutting down: the journal resubmits after restart
                pass

    def _attempt(self, group_id, requests, on_done, attempt, deadline) -> None:
        try:
            done = self.journal.jobs_of_group(group_id)
            for req in requests:
                if req.name in done:
                    continue
                payload = build_payload(self.payloads_root, req)
                created = self.sink.create(req.manifest(payload))
                self.journal.record_job(req.name, group_id, time.time())
                if self.metrics is not None:
                    self.metrics.job_created(req, created, deadline)
                log.info("pipeline job %s %s (pipeline %s, %d instances, group %s)", req.name,
                         "created" if created else "already existed", req.pipeline_id, len(req.instances),
                         short_hash(req.group_value),
                         extra=fields("job.created" if created else "job.exists", aeTitle=req.ae_title,
                                      job=req.name, group=short_hash(req.group_value)))
        except Exception as exc:
            delay = min(self.max_backoff, 0.5 * 2**attempt)
            log.warning("creating jobs of group %s failed (%s: %s); retry %d in %.1fs", group_id,
                        type(exc).__name__, exc, attempt + 1, delay)
            if self.metrics is not None:
                self.metrics.job_creation_failed()
            self.scheduler.call_later(delay, lambda: self._dispatch(group_id, requests, on_done, attempt + 1,
                                                                    deadline))
            return
        with self._pending_lock:
            self.pending -= 1
        on_done()

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
