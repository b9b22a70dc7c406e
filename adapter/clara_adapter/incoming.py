"""One instance being received: its dataset bytes go to a temporary file and
through the structural walker as they arrive; at the end it is either a
complete, checked file ready to commit, or a C-STORE failure status with
nothing left on disk.

Used by the DICOM receive path (one per C-STORE) and usable by STOW-RS (one per
part)::

    incoming = ingest.receive_instance(route, calling_ae, sop_class, sop_instance, ts)
    for chunk in fragments:
        incoming.feed(chunk)          # never raises; a failure is remembered
    outcome = incoming.finish()       # InstanceRecord (file still temporary) or a status (int)
    if isinstance(outcome, int): answer(outcome)
    else: answer(ingest.commit_received(route, incoming))   # renames, then commit_instance

SOP UID check: the dataset's (0008,0016)/(0008,0018) must equal the command's
Affected SOP Class/Instance UID. A mismatch, or a dataset without them, gets
``0xA900`` ("Data Set does not match SOP Class", the status dcmtk's storescp
uses for the same check) and is not stored: the file would be filed under one
identity while carrying another, and a retry cannot fix a sender's bug, so a
failure (not a warning) is the honest answer.
"""
from __future__ import annotations

import logging
from typing import Any

from clara_dicom.logs import short_hash

from clara_adapter.dataset_walk import SOP_CLASS_UID, SOP_INSTANCE_UID, DatasetWalker, MalformedDataset
from clara_adapter.dimse import CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH, OUT_OF_RESOURCES, SUCCESS
from clara_adapter.journal import InstanceRecord
from clara_adapter.storage import DiskFull, InstanceStore, InstanceWriter, file_header

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID = 0x0020000D, 0x0020000E


class IncomingInstance:
    __slots__ = ("route", "calling_ae", "sop_class_uid", "sop_instance_uid", "transfer_syntax", "status",
                 "writer", "walker", "metrics", "record")

    def __init__(self, store: InstanceStore, metrics: Any, route: Any, calling_ae: str, sop_class_uid: str,
                 sop_instance_uid: str, transfer_syntax: str):
        self.route = route
        self.calling_ae = calling_ae
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.metrics = metrics
        self.status: int | None = None  # decided early: dropped (SUCCESS) or failed
        self.writer: InstanceWriter | None = None
        self.walker: DatasetWalker | None = None
        self.record: InstanceRecord | None = None
        ae = route.ae_title
        if route.drops(sop_class_uid):
            metrics.ignored.labels(ae, "sop_class").inc()
            self.status = SUCCESS
            return
        self.walker = DatasetWalker(transfer_syntax, set(route.tags) | {SOP_CLASS_UID, SOP_INSTANCE_UID})
        try:
            self.writer = store.open(file_header(sop_class_uid, sop_instance_uid, transfer_syntax, calling_ae))
        except DiskFull as exc:
            self._fail(OUT_OF_RESOURCES, "disk_full", f"refused: {exc}")
        except OSError as exc:
            self._fail(OUT_OF_RESOURCES, "write_error", f"cannot create its file: {exc.strerror}")

    def feed(self, data: memoryview | bytes, budget: int | None = None) -> int:
        """``budget``: see `DatasetWalker.feed` (then `drain` while `backlog`); returns the bytes inflated."""
        if self.status is not None:
            return 0  # dropped or already failed: the rest of the dataset is read and discarded
        try:
            self.writer.write(data)
            return self.walker.feed(data, budget)
        except MalformedDataset as exc:
            self._fail(CANNOT_UNDERSTAND, "unreadable", f"malformed dataset ({exc})")
        except DiskFull as exc:
            self._fail(OUT_OF_RESOURCES, "disk_full", f"refused: {exc}")
        except OSError as exc:
            self._fail(OUT_OF_RESOURCES, "write_error", f"write failed: {exc.strerror}")
        return 0

    @property
    def backlog(self) -> bool:
        return self.status is None and self.walker is not None and self.walker.backlog

    def drain(self, budget: int | None = None) -> int:
        try:
            return self.walker.drain(budget)
        except MalformedDataset as exc:
            self._fail(CANNOT_UNDERSTAND, "unreadable", f"malformed dataset ({exc})")
            return 0

    def finish(self) -> InstanceRecord | int:
        """After the last fragment: the record to commit (its file not yet
        renamed into place), or the C-STORE status to answer with."""
        if self.status is not None:
            return self.status
        try:
            tags = self.walker.finish()
        except MalformedDataset as exc:
            self._fail(CANNOT_UNDERSTAND, "unreadable", f"malformed dataset ({exc})")
            return self.status
        if tags.get(SOP_INSTANCE_UID) != self.sop_instance_uid or tags.get(SOP_CLASS_UID) != self.sop_class_uid:
            self._fail(DATASET_DOES_NOT_MATCH, "uid_mismatch",
                       "its dataset's SOP Class/Instance UID differ from the command's (or are missing)")
            return self.status
        route = self.route
        wanted = {t: v for t, v in tags.items() if t in route.tags}
        self.record = InstanceRecord(
            owner=route.owner, ae_title=route.ae_title, calling_ae=self.calling_ae,
            sop_instance_uid=self.sop_instance_uid, sop_class_uid=self.sop_class_uid,
            transfer_syntax=self.transfer_syntax, study_uid=tags.get(STUDY_UID, ""),
            series_uid=tags.get(SERIES_UID, ""), path=self.writer.final, size=self.writer.size, acked_at=0.0,
            tags=wanted)
        return self.record

    def finalize(self) -> InstanceRecord | int:
        """Rename the checked file into place (fsync first if configured); may
        block on the disk, so the receive loop calls it from a worker thread."""
        try:
            self.writer.finalize()
        except OSError as exc:
            self._fail(OUT_OF_RESOURCES, "write_error", f"cannot finalize its file: {exc.strerror}")
            return self.status
        return self.record

    def discard(self) -> None:
        """The association ended before the instance was complete: nothing stays on disk."""
        if self.writer is not None:
            self.writer.discard()
            self.writer = None

    def _fail(self, status: int, reason: str, why: str) -> None:
        log.warning("instance %s on %s: %s", short_hash(self.sop_instance_uid), self.route.ae_title, why)
        self.metrics.store_failures.labels(reason).inc()
        self.status = status
        self.discard()
