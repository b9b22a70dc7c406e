"""The job-processor plug-in API, in the spirit of Clara's ``JobProcessorBase``.

A plug-in is a class registered under the entry-point group
``clara_dicom.processors`` (name = ``JobProcessor.spec.type``). The adapter
creates one instance per ClaraAETitle that uses a processor of that type.

Contract — commit, then publish:

* ``validate(settings)`` (classmethod) raises ``ValueError`` with a message a
  person can act on; the operator shows it in the JobProcessor's conditions.
* ``handle_instance(instance, tx)`` decides what happens to a stored instance,
  before its C-STORE success is sent. It runs inside the journal transaction
  that records the instance; that transaction may also hold other instances
  (the adapter batches concurrent C-STOREs into one commit), so calls are
  serialised, but memory is not yet updated for the instances before it.
  Keep it short: the C-STORE-RSP waits for it, and on PostgreSQL the server
  ends a transaction left idle for 10 s (the replica then answers 0xA700).

  - Write durable state through ``tx.journal``; its reads see the transaction's
    own writes. ``tx.pending`` is a dict for what later instances of the same
    transaction must see before it is published (e.g. "group X opened as id 7").
  - Change nothing else — memory, timers, files, submissions — directly:
    register it with ``tx.after_commit(fn)``. Callbacks run in order, under
    ``ctx.lock``, once the transaction is committed, and never if it fails (the
    C-STORE then fails and its file is deleted). They must not block.
  - Return ``KEEP`` to hold the instance: the adapter journals it in the same
    transaction right after ``handle_instance`` returns (``instance.id`` is set
    before the callbacks run). ``IGNORE`` or ``DUPLICATE`` drop it: its file is
    deleted after the commit.
  - An exception fails this instance alone (status 0x0110): its writes and
    callbacks are undone; the other instances of the transaction go on.
  - Times: ``tx.now`` (wall clock) for records, ``tx.mono`` (monotonic) for
    timers (``ctx.scheduler.call_at`` takes monotonic deadlines;
    ``ctx.scheduler.mono_of(wall)`` maps a journaled time).
* ``submit_pipeline_job(...)`` creates PipelineJobs (idempotent, retried for as
  long as the sink fails); ``on_done`` runs when the instances may be released:
  every job exists, or the payload could not be built and the files were
  quarantined for a person. ``remove_instances(...)`` releases held instances.
* Instances a plug-in has not released are offered again after a restart
  through ``recover(groups, instances)``: by default ``handle_instance(instance,
  tx)`` for each, in one transaction (the instance then already has an ``id``,
  and its ``tags`` hold the values the plug-in asked for through
  ``tags_needed``); an instance it no longer KEEPs is released, row and file.
* Replicas: on a journal several adapter processes share (``journal.shared``,
  PostgreSQL), memory is per process. A plug-in that keeps its state in the
  journal sets ``replica_safe = True`` (the AE Title processor does); otherwise
  every starting replica is offered every held instance of the owner, which
  suits only a single replica. On such a journal a replica-safe plug-in's
  ``handle_instance`` may also run in several threads of one process at once
  (concurrent batches, journal_pg.py), exactly as it runs in several replicas.
"""
from __future__ import annotations

import enum
import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from clara_dicom.logs import short_hash
from clara_dicom.models import JobProcessorSpec

from clara_adapter.job_requests import JobRequest
from clara_adapter.journal import GroupRecord, InstanceRecord, Journal, Transaction
from clara_adapter.submitter import JobSubmitter

log = logging.getLogger(__name__)


class Outcome(enum.Enum):
    KEEP = "keep"
    IGNORE = "ignore"  # e.g. the group tag is missing
    DUPLICATE = "duplicate"  # dropped duplicate (or replaced in place: the new file is not kept)


@dataclass
class ProcessorContext:
    """What the adapter gives every processor instance."""

    namespace: str
    journal: Journal
    scheduler: Any  # ThreadScheduler or ManualScheduler: .now(), .call_at(), .call_later()
    submitter: JobSubmitter
    metrics: Any = None

    @property
    def lock(self) -> threading.RLock:
        return self.journal.lock

    def transaction(self):
        """A journal transaction (commit, then publish) stamped with both clocks."""
        return self.journal.transaction(self.scheduler.now(), self.scheduler.mono())


class JobProcessorBase:
    type_name: ClassVar[str] = ""
    replica_safe: ClassVar[bool] = False  # see "Replicas" in the module docstring

    def __init__(self, ctx: ProcessorContext, owner: str, ae_title: str, processor_name: str,
                 spec: JobProcessorSpec, overwrite_same_instance: bool = False):
        self.ctx = ctx
        self.owner = owner  # ClaraAETitle object name: the journal key of this instance
        self.ae_title = ae_title
        self.processor_name = processor_name
        self.spec = spec
        self.overwrite_same_instance = overwrite_same_instance
        self.retired = False

    # -- identity -----------------------------------------------------------
    @property
    def name(self) -> str:
        return self.processor_name

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        """Raise ValueError when ``settings`` are unusable. Default: accept anything."""

    def tags_needed(self) -> set[int]:
        """Top-level tags the adapter reads from each instance's header for this processor."""
        return set()

    def update(self, ae_title: str, processor_name: str, spec: JobProcessorSpec, overwrite: bool) -> None:
        """A live edit of the ClaraAETitle or JobProcessor. New settings apply to new work."""
        with self.ctx.lock:
            self.ae_title, self.processor_name, self.spec = ae_title, processor_name, spec
            self.overwrite_same_instance = overwrite
            self.retired = False

    def retire(self) -> None:
        """The AE title is gone: no new instances; work in progress still completes."""
        self.retired = True

    def idle(self) -> bool:
        """True when nothing is held (a retired instance can then be dropped)."""
        return not self.ctx.journal.instances(owner=self.owner)

    # -- the plug-in's job ----------------------------------------------------
    def handle_instance(self, instance: InstanceRecord, tx: Transaction) -> Outcome:
        raise NotImplementedError

    def recover(self, groups: list[GroupRecord], instances: list[InstanceRecord]) -> None:
        """Offer the journaled instances again; release those the plug-in no longer keeps."""
        with self.ctx.transaction() as tx:
            for inst in instances:
                outcome = self.handle_instance(inst, tx)
                if outcome is not Outcome.KEEP and inst.id is not None:
                    log.info("instance %s released on recovery by %s (%s)", short_hash(inst.sop_instance_uid),
                             self.owner, outcome.value)
                    tx.journal.remove_instances([inst.id])
                    tx.after_commit(functools.partial(delete_files, [inst.path]))

    # -- services for plug-ins ----------------------------------------------
    def new_sequence(self) -> tuple[int, str]:
        """A (number, text) never used before in this journal, for JobRequest.sequence
        and as the submission's group id. Job names hash the sequence, so reusing
        one would make a new job look like an existing one. A plug-in that needs
        exactly-once across crashes persists the sequence with its instances."""
        number = self.ctx.journal.next_sequence()
        return number, f"{self.ctx.journal.epoch}-s{number}"

    def submit_pipeline_job(self, group_id: int, requests: list[JobRequest],
                            on_done: Callable[[], None] | None = None, deadline: float | None = None) -> None:
        """Create these PipelineJobs (retried until they exist); then ``on_done``
        (also after a payload that cannot be built was quarantined).
        ``group_id`` identifies the submission in the journal (see ``new_sequence``)."""
        self.ctx.submitter.submit(group_id, requests, on_done or (lambda: None), deadline)

    def remove_instances(self, instances: list[InstanceRecord]) -> None:
        """Release instances: forget them in the journal, then delete their files."""
        ids = [i.id for i in instances if i.id is not None]
        if ids:
            self.ctx.journal.remove_instances(ids)
        delete_files([i.path for i in instances])

    def close(self) -> None:
        """The adapter is stopping."""


def delete_files(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not delete %s: %s", path, exc)
