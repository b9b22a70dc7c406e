"""The job-processor plug-in API, in the spirit of Clara's ``JobProcessorBase``.

A plug-in is a class registered under the entry-point group
``clara_dicom.processors`` (name = ``JobProcessor.spec.type``). The adapter
creates one instance per ClaraAETitle that uses a processor of that type.

Contract:

* ``validate(settings)`` (classmethod) raises ``ValueError`` with a message a
  person can act on; the operator shows it in the JobProcessor's conditions.
* ``handle_instance(instance)`` is called for every stored instance, under the
  journal lock, before the C-STORE success is sent. Return ``KEEP`` to hold the
  instance (it is journaled and survives a restart), ``IGNORE`` or ``DUPLICATE``
  to drop it (its file is deleted).
* ``submit_pipeline_job(...)`` creates PipelineJobs (idempotent, retried for as
  long as it takes); ``remove_instances(...)`` releases held instances.
* Instances a plug-in has not released are offered again after a restart
  through ``recover`` (by default: ``handle_instance(instance)`` for each; the
  instance then already has an ``id``, and its ``tags`` hold the values the
  plug-in asked for through ``tags_needed``).
"""
from __future__ import annotations

import enum
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

from clara_dicom.models import JobProcessorSpec

from clara_adapter.journal import GroupRecord, InstanceRecord, Journal
from clara_adapter.jobs import JobRequest, JobSubmitter

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
        return self.journal._lock


class JobProcessorBase:
    type_name: ClassVar[str] = ""

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
    def handle_instance(self, instance: InstanceRecord) -> Outcome:
        raise NotImplementedError

    def recover(self, groups: list[GroupRecord], instances: list[InstanceRecord]) -> None:
        for inst in instances:
            self.handle_instance(inst)

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
        """Create these PipelineJobs (retried until they exist); then ``on_done``.
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
