"""Creating the jobs of closed groups: on worker threads, idempotent, retried.

Instances are released (``on_done``) only once every pipeline's job exists;
creation is idempotent (a job that already exists counts as created), so a
retry after a crash or an API outage never duplicates a job. A sink that fails
is retried for as long as it takes. A payload that cannot be built (a received
file is gone or unreadable) will not get better by retrying: the group is
quarantined — its files moved to ``<storage>/quarantine/`` with a reason, a
Warning logged, ``clara_groups_quarantined_total`` counted — and released.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clara_dicom.logs import fields, short_hash
from clara_dicom.retrying import JOB_CREATION, Backoff

from clara_adapter.job_requests import JobRequest
from clara_adapter.job_sinks import JobSink
from clara_adapter.journal import GroupTakenOver
from clara_adapter.payloads import build_payload, discard_payload, quarantine

log = logging.getLogger(__name__)


@dataclass
class _Submission:
    group_id: int
    requests: list[JobRequest]
    on_done: Callable[[], None]
    deadline: float | None  # wall-clock group deadline (job-creation latency metric)
    backoff: Backoff
    payload_failures: int = 0


class JobSubmitter:
    """Creates the jobs of closed groups on worker threads, retrying with
    exponential backoff (the JOB_CREATION policy) for as long as the sink fails.
    Retries are scheduled on the scheduler, not slept, so no worker thread waits."""

    def __init__(self, sink: JobSink, payloads_root: Path, scheduler: Any, journal: Any, metrics: Any = None,
                 max_backoff: float = 30.0, workers: int = 2, synchronous: bool = False,
                 quarantine_root: Path | None = None, max_payload_attempts: int = 5):
        self.sink = sink
        self.payloads_root = Path(payloads_root)
        self.quarantine_root = Path(quarantine_root) if quarantine_root else self.payloads_root.parent / "quarantine"
        self.scheduler = scheduler
        self.journal = journal
        self.metrics = metrics
        self.policy = JOB_CREATION.with_(initial=min(JOB_CREATION.initial, max_backoff), cap=max_backoff)
        self.max_payload_attempts = max_payload_attempts  # other I/O errors (e.g. ENOSPC on a copy) get a few tries
        self.synchronous = synchronous  # tests on the manual clock run attempts inline
        self._pool = None if synchronous else concurrent.futures.ThreadPoolExecutor(workers, "clara-submit")
        self.pending = 0  # groups whose jobs are not all created yet (for /health/status)
        self._pending_lock = threading.Lock()

    def submit(self, group_id: int, requests: list[JobRequest], on_done: Callable[[], None],
               deadline: float | None = None) -> None:
        with self._pending_lock:
            self.pending += 1
        self._dispatch(_Submission(group_id, requests, on_done, deadline, self.policy.backoff()))

    def _dispatch(self, sub: _Submission) -> None:
        if self._pool is None:
            self._attempt(sub)
        else:
            try:
                self._pool.submit(self._attempt, sub)
            except RuntimeError:  # shutting down: the journal resubmits after restart
                pass

    def _attempt(self, sub: _Submission) -> None:
        try:
            if not self._still_ours(sub):
                return
            done = self.journal.jobs_of_group(sub.group_id)
            for req in sub.requests:
                if req.name in done:
                    continue
                try:
                    payload = build_payload(self.payloads_root, req)
                except OSError as exc:
                    if not self._still_ours(sub):  # its files were released by the replica that took it over
                        return
                    discard_payload(self.payloads_root, req)
                    sub.payload_failures += 1
                    if isinstance(exc, FileNotFoundError) or sub.payload_failures >= self.max_payload_attempts:
                        self._quarantine(sub, req, exc)
                        return
                    raise
                created = self.sink.create(req.manifest(payload))
                self.journal.record_job(req.name, sub.group_id, time.time())
                if self.metrics is not None:
                    self.metrics.job_created(req, created, sub.deadline)
                log.info("pipeline job %s %s (pipeline %s, %d instances, group %s)", req.name,
                         "created" if created else "already existed", req.pipeline_id, len(req.instances),
                         short_hash(req.group_value),
                         extra=fields("job.created" if created else "job.exists", aeTitle=req.ae_title,
                                      job=req.name, group=short_hash(req.group_value)))
        except Exception as exc:
            delay = sub.backoff.next()
            log.warning("creating jobs of group %s failed (%s: %s); retry %d in %.1fs", sub.group_id,
                        type(exc).__name__, exc, sub.backoff.failures, delay)
            if self.metrics is not None:
                self.metrics.job_creation_failed()
            self.scheduler.call_later(delay, lambda: self._dispatch(sub))
            return
        self._finish(sub)

    def _still_ours(self, sub: _Submission) -> bool:
        """False (and the submission dropped) when another replica took the group
        over while this one stalled (shared journals only; see journal_pg.py)."""
        if self.journal.owns_group(sub.group_id):
            return True
        log.warning("group %s was taken over by another replica while this one stalled: leaving it to that one",
                    sub.group_id)
        with self._pending_lock:
            self.pending -= 1
        return False

    def _quarantine(self, sub: _Submission, req: JobRequest, exc: OSError) -> None:
        folder = self.quarantine_root / f"{self.journal.epoch}-group-{sub.group_id}"
        reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        kept, missing = quarantine(folder, sub.requests, f"building payload {req.name}: {reason}")
        log.warning("group %s of %s quarantined in %s: its payload cannot be built (%s); %d files kept, "
                    "%d missing; no pipeline job will be created for it", sub.group_id, req.ae_title, folder,
                    type(exc).__name__, kept, missing)
        if self.metrics is not None:
            self.metrics.group_quarantined(req.ae_title)
        self._finish(sub)

    def _finish(self, sub: _Submission) -> None:
        with self._pending_lock:
            self.pending -= 1
        try:
            sub.on_done()
        except GroupTakenOver as exc:  # the fenced release matched no row: the files are the other replica's
            log.warning("%s while this replica stalled: not releasing it", exc)

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
