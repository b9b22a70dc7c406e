"""Closing groups on a journal several adapter replicas share (PostgreSQL).

Every replica runs one `SharedGroupCloser`. It polls the database, never its
own memory, so a group is closed on time whichever replica received its last
instance, even one that died since: each poll closes the groups whose quiet
period has ended (``close_due_groups``: one replica wins each group) and hands
them to their processor's ``submit_closed``. The next poll is due when the
earliest open group falls due by the database's clock, at most ``poll``
seconds away (other replicas open groups this one does not see).

Each poll also heartbeats. A closed group whose closer has not heartbeaten for
``dead_after`` seconds (it died while creating the jobs) is taken over, but
only by a replica that has itself been heartbeating for ``dead_after``
seconds: after a database outage every replica's heartbeat is stale, and the
live ones must get the chance to renew theirs before anyone takes their work.
"""
from __future__ import annotations

import logging
from typing import Any

from clara_dicom.models import JobProcessorSpec

log = logging.getLogger(__name__)


class SharedGroupCloser:
    POLL_SECONDS = 0.25
    MIN_DELAY = 0.005  # a due group skipped because an instance is joining it: look again soon
    HEARTBEAT_SECONDS = 1.0
    DEAD_AFTER_SECONDS = 10.0

    def __init__(self, ingest: Any, scheduler: Any, poll: float = POLL_SECONDS,
                 dead_after: float = DEAD_AFTER_SECONDS):
        self.ingest = ingest
        self.journal = ingest.journal
        self.scheduler = scheduler
        self.poll = poll
        self.dead_after = dead_after
        self._healthy_since: float | None = None  # monotonic time of the first heartbeat since the last failure
        self._beat_at = float("-inf")
        self._timer: Any = None
        self._stopped = False
        self._failing = False
        self.closed = 0  # groups this replica closed or took over (tests, status)

    def start(self) -> None:
        self._schedule(0.0)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()

    def _schedule(self, delay: float) -> None:
        if not self._stopped:
            self._timer = self.scheduler.call_at(self.scheduler.mono() + delay, self.run_once)

    def run_once(self) -> None:
        """One poll; schedules the next."""
        try:
            delay = self._poll()
            if self._failing:
                log.info("shared journal reachable again: closing groups")
            self._failing = False
        except Exception as exc:
            self._healthy_since = None
            if not self._failing:
                log.warning("closing due groups failed (%s: %s); retrying every %.2fs", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "", self.poll)
            self._failing = True
            delay = self.poll
        self._schedule(delay)

    def _poll(self) -> float:
        mono = self.scheduler.mono()
        if mono - self._beat_at >= self.HEARTBEAT_SECONDS:
            self.journal.heartbeat()  # before closing anything: a closer is always a live replica
            self._beat_at = mono
            if self._healthy_since is None:
                self._healthy_since = mono
        for record in self.journal.close_due_groups():
            self._hand_over(record, "closed")
        if self._healthy_since is not None and mono - self._healthy_since >= self.dead_after:
            for record in self.journal.take_orphaned_groups(self.dead_after):
                self._hand_over(record, "taken over")
        due_in = self.journal.next_due_in()
        if due_in is None:
            return self.poll
        return min(self.poll, max(self.MIN_DELAY, due_in))

    def _hand_over(self, record: Any, how: str) -> None:
        self.closed += 1
        proc = self._processor(record)
        if proc is None:  # the plug-in is not installed here: leave the group to a replica that has it
            log.error("group %s of %s %s, but processor %s is not available on this replica", record.id,
                      record.owner, how, record.processor)
            return
        log.debug("group %s of %s %s by this replica", record.id, record.owner, how)
        try:
            proc.submit_closed(record)
        except Exception:  # recorded as closed: a takeover (after a restart) retries it
            log.exception("submitting the jobs of group %s failed", record.id)

    def _processor(self, record: Any) -> Any:
        with self.ingest.ctx.lock:
            proc = self.ingest.processors.get(record.owner)
            if proc is not None and hasattr(proc, "submit_closed"):
                return proc
            # An owner this replica has not configured (yet): the group carries its frozen settings.
            spec = JobProcessorSpec.model_validate(record.settings["spec"])
            proc = self.ingest._make_processor(record.owner, record.ae_title, record.processor, spec, False)
            if proc is None or not hasattr(proc, "submit_closed"):
                return None
            proc.retire()
            self.ingest.processors[record.owner] = proc
            return proc
