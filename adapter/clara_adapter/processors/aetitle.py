"""The AE Title Job Processor (Clara's default), written on the plug-in API.

Instances are grouped by (AE title, value of the group tag). A group closes
``timeout`` seconds after its last acknowledged instance, across associations;
the close is journaled before its jobs are created, so a later instance with
the same key starts a new group. Each group keeps the settings it opened with.
``open_groups`` is published state: it changes only after the journal commit
that records the change (see processors/base.py).

On a journal shared by several replicas (``journal.shared``) the groups live in
the database alone: an instance joins its group there (``join_group``), no
process keeps members or timers, and any replica's ``SharedGroupCloser``
closes a due group and hands it to ``submit_closed``.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from clara_dicom.logs import fields, short_hash
from clara_dicom.models import JobProcessorSpec, format_tag, parse_group_by

from clara_adapter.job_requests import JobRequest
from clara_adapter.journal import GroupRecord, InstanceRecord, Transaction
from clara_adapter.processors.base import JobProcessorBase, Outcome, delete_files

log = logging.getLogger(__name__)


@dataclass
class OpenGroup:
    record: GroupRecord
    spec: JobProcessorSpec  # frozen at open
    last_ack_mono: float  # the last acknowledgement on the monotonic clock (record.last_ack is wall clock)
    members: dict[str, InstanceRecord] = field(default_factory=dict)  # by SOP Instance UID
    timer: Any = None

    @property
    def deadline(self) -> float:
        """Monotonic time at which the quiet period ends."""
        return self.last_ack_mono + self.spec.timeout

    @property
    def wall_deadline(self) -> float:
        return self.record.last_ack + self.spec.timeout


class AETitleJobProcessor(JobProcessorBase):
    type_name = "aetitle"
    replica_safe = True  # on a shared journal, groups are the database's (see module docstring)
    CLOSE_RETRY_SECONDS = 1.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.open_groups: dict[str, OpenGroup] = {}  # published state: changed only after a commit

    @classmethod
    def validate(cls, settings: dict[str, Any]) -> None:
        if settings:
            raise ValueError(
                "the aetitle processor takes no settings (use groupBy, priority, timeout and pipelines): "
                f"remove {', '.join(sorted(settings))}"
            )

    def tags_needed(self) -> set[int]:
        return {self.spec.group_tag}

    # -- instances: decide in the transaction, publish after the commit --------
    def handle_instance(self, inst: InstanceRecord, tx: Transaction) -> Outcome:
        value = (inst.tags.get(self.spec.group_tag) or "").strip(" \0")
        if not value:
            log.info("instance %s ignored by processor %s: no %s value", short_hash(inst.sop_instance_uid),
                     self.processor_name, format_tag(self.spec.group_tag))
            return Outcome.IGNORE
        journal, now, mono = tx.journal, tx.now, tx.mono
        if journal.shared:
            return self._join_shared(inst, tx, value)
        group = self.open_groups.get(value)
        group_id = group.record.id if group is not None else tx.pending.get((self, value))
        if group_id is None:
            spec = self.spec
            settings = {"spec": spec.model_dump(mode="json"), "processor": self.processor_name,
                        "aeTitle": self.ae_title}
            record = journal.open_group(self.owner, self.ae_title, self.processor_name, value, settings, now)
            group_id = tx.pending[(self, value)] = record.id
            tx.after_commit(lambda: self._publish_open(record, spec, mono))
        else:
            old = journal.group_member(group_id, inst.sop_instance_uid)
            if old is not None:
                if not self.overwrite_same_instance:
                    return Outcome.DUPLICATE  # dropped; the quiet period is not extended
                old.size, old.acked_at = inst.size, now  # new content, same journal record
                journal.update_instance(old)
                journal.touch_group(group_id, now)
                new_path = inst.path
                tx.after_commit(lambda: self._publish_overwrite(value, old, new_path, now, mono))
                return Outcome.DUPLICATE
            journal.touch_group(group_id, now)
            tx.after_commit(lambda: self._publish_touch(value, now, mono))
        inst.group_id = group_id
        inst.group_value = value
        tx.after_commit(lambda: self._publish_member(value, inst))
        return Outcome.KEEP

    def _join_shared(self, inst: InstanceRecord, tx: Transaction, value: str) -> Outcome:
        """The same rules on the database's groups: join (or open) the group and
        journal the instance in it atomically; a duplicate neither joins nor
        extends the quiet period (unless overwriting, which replaces the file)."""
        journal, spec = tx.journal, self.spec
        inst.group_value = value
        if journal.add_to_open_group(inst) is not None:
            return Outcome.KEEP  # joined the open group (inst.id and group_id set): one round trip
        settings = {"spec": spec.model_dump(mode="json"), "processor": self.processor_name, "aeTitle": self.ae_title}
        group_id, _ = journal.join_group(self.owner, self.ae_title, self.processor_name, value, settings,
                                         spec.timeout)
        inst.group_id, inst.group_value = group_id, value
        if journal.add_member(inst) is not None:
            return Outcome.KEEP  # journaled here (inst.id is set): the adapter does not add it again
        inst.group_id = None
        if self.overwrite_same_instance:
            old = journal.group_member(group_id, inst.sop_instance_uid)
            journal.refresh_member(old.id, inst.size)
            new_path, old_path = inst.path, old.path
            tx.after_commit(lambda: os.replace(new_path, old_path))
        return Outcome.DUPLICATE

    def submit_closed(self, record: GroupRecord) -> None:
        """A group this replica closed (or took over from a dead one): create its jobs."""
        spec = JobProcessorSpec.model_validate(record.settings["spec"])
        members = self.ctx.journal.instances(group_id=record.id)
        self._submit(record, spec, members, record.last_ack + spec.timeout)

    def _publish_open(self, record: GroupRecord, spec: JobProcessorSpec, mono: float) -> None:
        group = OpenGroup(record=record, spec=spec, last_ack_mono=mono)
        self.open_groups[record.group_value] = group
        self._arm(group)

    def _publish_touch(self, value: str, now: float, mono: float) -> None:
        group = self.open_groups[value]
        group.record.last_ack = max(group.record.last_ack, now)
        group.last_ack_mono = max(group.last_ack_mono, mono)  # the timer re-arms itself when it fires early

    def _publish_member(self, value: str, inst: InstanceRecord) -> None:
        self.open_groups[value].members[inst.sop_instance_uid] = inst

    def _publish_overwrite(self, value: str, old: InstanceRecord, new_path: Any, now: float, mono: float) -> None:
        member = self.open_groups[value].members[old.sop_instance_uid]
        os.replace(new_path, member.path)
        member.size, member.acked_at = old.size, now
        self._publish_touch(value, now, mono)

    # -- timers -------------------------------------------------------------
    def _arm(self, group: OpenGroup, at: float | None = None) -> None:
        group.timer = self.ctx.scheduler.call_at(group.deadline if at is None else at,
                                                 lambda: self._on_timer(group))

    def _on_timer(self, group: OpenGroup) -> None:
        with self.ctx.lock:
            if self.open_groups.get(group.record.group_value) is not group:
                return
            mono = self.ctx.scheduler.mono()
            if mono < group.deadline:  # instances arrived since: wait for the new deadline
                self._arm(group)
                return
            # Record the close before creating jobs: a new instance now opens a new group.
            now = self.ctx.scheduler.now()
            try:
                self.ctx.journal.close_group(group.record.id, now)
            except Exception as exc:  # e.g. disk full: the group stays open and is tried again
                log.warning("closing group %s of %s failed (%s); retrying in %.0fs", group.record.id,
                            self.ae_title, exc, self.CLOSE_RETRY_SECONDS)
                self._arm(group, mono + self.CLOSE_RETRY_SECONDS)
                return
            group.record.state, group.record.closed_at = "closed", now
            del self.open_groups[group.record.group_value]
        self._submit(group.record, group.spec, list(group.members.values()), group.wall_deadline)

    def _submit(self, record: GroupRecord, spec: JobProcessorSpec, members: list[InstanceRecord],
                deadline: float | None) -> None:
        if not members:
            self.ctx.journal.finish_group(record.id)
            return
        requests = [
            JobRequest(
                namespace=self.ctx.namespace,
                ae_title=record.ae_title,
                processor=record.processor,
                pipeline_key=key,
                pipeline_id=pipeline_id,
                priority=spec.priority,
                group_by=spec.groupBy,
                group_value=record.group_value,
                sequence=f"{self.ctx.journal.epoch}-{record.id}",
                instances=members,
                closed_at=record.closed_at or self.ctx.scheduler.now(),
            )
            for key, pipeline_id in sorted(spec.pipelines.items())
        ]
        log.info("group %s of %s closed: %d instances, %d pipeline jobs", short_hash(record.group_value),
                 record.ae_title, len(members), len(requests),
                 extra=fields("group.closed", aeTitle=record.ae_title, group=short_hash(record.group_value)))
        if self.ctx.metrics is not None:
            self.ctx.metrics.group_closed(record.ae_title)

        def release() -> None:
            self.ctx.journal.finish_group(record.id)
            delete_files([m.path for m in members])

        self.submit_pipeline_job(record.id, requests, release, deadline)

    # -- restart --------------------------------------------------------------
    def recover(self, groups: list[GroupRecord], instances: list[InstanceRecord]) -> None:
        if self.ctx.journal.shared:
            return  # the groups are the database's: SharedGroupCloser closes and takes them over
        by_group: dict[int, list[InstanceRecord]] = {}
        for inst in instances:
            by_group.setdefault(inst.group_id or -1, []).append(inst)
        for record in groups:
            spec = JobProcessorSpec.model_validate(record.settings["spec"])
            members = by_group.pop(record.id, [])
            if record.state == "closed":
                self._submit(record, spec, members, None)
                continue
            group = OpenGroup(record=record, spec=spec, last_ack_mono=self.ctx.scheduler.mono_of(record.last_ack),
                              members={m.sop_instance_uid: m for m in members})
            self.open_groups[record.group_value] = group
            self._arm(group)
        stray = [i for lst in by_group.values() for i in lst]
        if stray:  # not expected: instances are journaled with their group in one commit
            log.warning("%d journaled instances of %s had no group; releasing them", len(stray), self.owner)
            self.remove_instances(stray)

    def idle(self) -> bool:
        return not self.open_groups and super().idle()


__all__ = ["AETitleJobProcessor", "parse_group_by"]
