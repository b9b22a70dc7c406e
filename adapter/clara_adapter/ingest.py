"""From a received C-STORE to a journaled, acknowledged instance.

`Ingest` owns the live routing table (AE title -> processor instance) and the
processor instances themselves. Configuration changes swap the routing table
atomically; associations already open keep the route they were accepted with.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from clara_dicom.config import RenderedConfig
from clara_dicom.logs import short_hash
from clara_dicom.models import JobProcessorSpec
from clara_dicom.plugins import processor_class

from clara_adapter.group_commit import GroupCommit
from clara_adapter.journal import InstanceRecord, Journal, TransactionAborted, is_out_of_resources
from clara_adapter.processors.base import JobProcessorBase, Outcome, ProcessorContext, delete_files
from clara_adapter.incoming import IncomingInstance
# Route and the A-ASSOCIATE-RJ codes live in route.py: receive workers import them without the processors.
from clara_adapter.route import REJECT_BUSY, REJECT_CALLED_AE, REJECT_CALLING_AE, Route  # noqa: F401
from clara_adapter.storage import InstanceStore, read_tags

log = logging.getLogger(__name__)

STUDY_UID, SERIES_UID = 0x0020000D, 0x0020000E

# C-STORE statuses
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

@dataclass
class SourceMatcher:
    """Matches a calling (AE title, address) to ClaraSource names."""

    sources: dict[str, Any] = field(default_factory=dict)  # name -> ClaraSourceSpec

    def matching(self, calling_ae: str, address: str) -> set[str]:
        names = set()
        for name, spec in self.sources.items():
            if spec.aeTitle == calling_ae and host_matches(spec.host, address):
                names.add(name)
        return names


def host_matches(host: str, address: str) -> bool:
    try:
        peer = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped:
        peer = peer.ipv4_mapped
    try:
        if "/" in host:
            return peer in ipaddress.ip_network(host, strict=False)
        return peer == ipaddress.ip_address(host)
    except ValueError:
        return address in _resolve(host, int(time.time() // 30))


@lru_cache(maxsize=256)
def _resolve(hostname: str, _epoch: int) -> frozenset[str]:
    """Addresses of a hostname, cached for up to 30 s."""
    try:
        return frozenset(info[4][0] for info in socket.getaddrinfo(hostname, None))
    except OSError:
        return frozenset()



def commit_prepared(prepared: list[tuple[Route, InstanceRecord] | int],
                    commit: Callable[[list[tuple[Route, InstanceRecord]]], list[int]]) -> list[int]:
    """C-STORE statuses in the order of ``prepared``: an int is a status already
    decided (the file could not be put in place); the others are committed
    together, in one call of ``commit``."""
    todo = [p for p in prepared if not isinstance(p, int)]
    done = iter(commit(todo) if todo else ())
    return [p if isinstance(p, int) else next(done) for p in prepared]

class Ingest:
    def __init__(self, ctx: ProcessorContext, store: InstanceStore, reject_unknown_sources: bool = True):
        self.ctx = ctx
        self.journal: Journal = ctx.journal
        self.store = store
        self.reject_unknown_sources = reject_unknown_sources
        self.routes: dict[str, Route] = {}
        self.sources = SourceMatcher()
        self.processors: dict[str, JobProcessorBase] = {}  # owner -> instance (incl. retired)
        self.config = RenderedConfig()
        self.metrics = ctx.metrics
        # One batch at a time under the journal's lock (SQLite); several at once on their own
        # connections where the journal allows (PostgreSQL: journal_pg.py, "Concurrent transactions").
        lanes = self.journal.concurrent_transactions
        self._group_commit: GroupCommit = GroupCommit(self._commit_batch, self.journal.lock if lanes == 1 else None,
                                                      lanes)

    # -- configuration --------------------------------------------------------
    def _make_processor(self, owner: str, ae_title: str, processor_name: str, spec: JobProcessorSpec,
                        overwrite: bool) -> JobProcessorBase | None:
        cls = processor_class(spec.type)
        if cls is None:
            log.error("processor type %r of %s is not installed", spec.type, owner)
            return None
        return cls(self.ctx, owner, ae_title, processor_name, spec, overwrite)

    def recover(self) -> int:
        """Rebuild processor instances from the journal and offer them their
        unreleased instances and groups. Returns the number of instances recovered."""
        groups_by_owner: dict[str, list] = {}
        for g in self.journal.groups():
            groups_by_owner.setdefault(g.owner, []).append(g)
        count = 0
        for owner, (ae_title, processor_name, spec_json) in self.journal.owners().items():
            spec = JobProcessorSpec.model_validate(spec_json)
            proc = self._make_processor(owner, ae_title, processor_name, spec, False)
            if proc is None:
                continue  # keep its instances: they are offered once the plug-in is installed
            proc.retire()  # until the configuration names it again
            # On a shared journal a replica-safe processor's work is in the database, not offered again.
            shared = self.journal.shared and proc.replica_safe
            instances = [] if shared else self.journal.instances(owner=owner)
            for inst in instances:
                inst.tags = self._read_tags(inst, proc.tags_needed())
            with self.ctx.lock:
                proc.recover(groups_by_owner.get(owner, []), instances)
            self.processors[owner] = proc
            count += len(instances)
        return count

    @staticmethod
    def _read_tags(inst: InstanceRecord, tags: set[int]) -> dict[int, str]:
        if not tags:
            return {}
        try:
            with open(inst.path, "rb") as fh:
                data = fh.read()
            # Part 10 file: skip preamble, DICM and the file meta group.
            meta_len = int.from_bytes(data[140:144], "little")
            return read_tags(memoryview(data)[144 + meta_len:], inst.transfer_syntax, tags)
        except Exception as exc:  # unreadable: let the processor treat the tag as missing
            log.warning("cannot re-read %s: %s", inst.path, exc)
            return {}

    def apply_config(self, config: RenderedConfig) -> None:
        routes: dict[str, Route] = {}
        live: set[str] = set()
        for owner, aet in sorted(config.aeTitles.items()):
            spec = config.processors.get(aet.processor)
            if spec is None:
                continue  # resolve() never renders this; be defensive
            proc = self.processors.get(owner)
            if proc is not None and proc.spec.type != spec.type:
                proc.retire()
                proc = None
            if proc is None:
                proc = self._make_processor(owner, aet.aeTitle, aet.processor, spec, aet.overwriteSameInstance)
                if proc is None:
                    continue
                self.processors[owner] = proc
            else:
                proc.update(aet.aeTitle, aet.processor, spec, aet.overwriteSameInstance)
            self.journal.save_owner(owner, aet.aeTitle, aet.processor, spec.model_dump(mode="json"))
            live.add(owner)
            routes[aet.aeTitle] = Route(
                owner=owner,
                ae_title=aet.aeTitle,
                processor=proc,
                tags=frozenset(proc.tags_needed() | {STUDY_UID, SERIES_UID}),
                ignored_sop_classes=frozenset(aet.ignoredSopClasses),
                allowed_sop_classes=frozenset(aet.allowedSopClasses),
                allowed_sources=frozenset(aet.allowedSources),
            )
        for owner, proc in list(self.processors.items()):
            if owner not in live:
                proc.retire()
        self.sources = SourceMatcher(dict(config.sources))
        self.routes = routes  # one assignment: readers see the old or the new table
        self.config = config
        self.collect_retired()

    def collect_retired(self) -> None:
        for owner, proc in list(self.processors.items()):
            if proc.retired and proc.idle():
                del self.processors[owner]
                self.journal.forget_owner(owner)

    # -- associations ---------------------------------------------------------
    def check_association(self, called_ae: str, calling_ae: str, address: str) -> tuple[tuple[int, int, int], str] | None:
        """None to accept, else (A-ASSOCIATE-RJ result/source/reason, why)."""
        route = self.routes.get(called_ae.strip())
        if route is None:
            return REJECT_CALLED_AE, f"called AE title {called_ae.strip()!r} is not served"
        if self.reject_unknown_sources or route.allowed_sources:
            names = self.sources.matching(calling_ae.strip(), address)
            if self.reject_unknown_sources and not names:
                return REJECT_CALLING_AE, f"calling AE title {calling_ae.strip()!r} from {address} is no ClaraSource"
            if route.allowed_sources and not names & route.allowed_sources:
                return REJECT_CALLING_AE, f"source {calling_ae.strip()!r} from {address} may not send to {route.ae_title}"
        if self.store.guard is not None:
            problem = self.store.guard.check()
            if problem:
                return REJECT_BUSY, f"storage full: {problem}"
        if not self.journal.available():
            return REJECT_BUSY, "journal unreachable"
        return None

    # -- instances ------------------------------------------------------------
    def receive_instance(self, route: Route, calling_ae: str, sop_class_uid: str, sop_instance_uid: str,
                         transfer_syntax: str) -> IncomingInstance:
        """Start receiving one instance: feed it the dataset bytes as they
        arrive, then `finish` it and, if it yields a record, `commit_received`."""
        return IncomingInstance(self.store, self.metrics, route, calling_ae, sop_class_uid, sop_instance_uid,
                                transfer_syntax)

    def commit_received(self, route: Route, incoming: IncomingInstance) -> int:
        """Rename a finished, checked instance into place and commit it; returns
        the C-STORE status. Blocks on the disk and the journal: call it from a
        worker thread, never from the receive event loop."""
        outcome = incoming.finalize()
        if isinstance(outcome, int):
            return outcome
        return self.commit_instance(route, outcome)

    @property
    def quick_commits(self) -> bool:
        """Is a commit short enough to run on the receive event loop? True for
        the SQLite journal without fsync (a WAL commit is tens of microseconds);
        PostgreSQL round trips and fsyncs go to worker threads."""
        return isinstance(self.journal, Journal) and not self.store.fsync and not self.journal.durable

    def commit_received_now(self, items: list[tuple[Route, IncomingInstance]]) -> list[int] | None:
        """`commit_received` for several finished instances at once, in one
        transaction, on the calling thread; None (nothing done) when the journal
        is busy (a group closing, a batch of another thread) so the caller, the
        receive event loop, never waits for it."""
        lock = self.journal.lock
        if not lock.acquire(blocking=False):
            return None
        try:
            prepared: list[tuple[Route, InstanceRecord] | int] = []
            for route, incoming in items:
                outcome = incoming.finalize()  # the file in place, or the status why not
                prepared.append(outcome if isinstance(outcome, int) else (route, outcome))
            return commit_prepared(prepared, self._commit_batch)
        finally:
            lock.release()

    def store_instance(self, route: Route, calling_ae: str, sop_class_uid: str, sop_instance_uid: str,
                       transfer_syntax: str, dataset: bytes | memoryview) -> int:
        """Store, journal and hand over one instance held in memory; returns the
        C-STORE status (the streaming receive path uses `receive_instance`)."""
        incoming = self.receive_instance(route, calling_ae, sop_class_uid, sop_instance_uid, transfer_syntax)
        incoming.feed(dataset)
        outcome = incoming.finish()
        if isinstance(outcome, int):
            return outcome
        return self.commit_received(route, incoming)

    def commit_instance(self, route: Route, inst: InstanceRecord) -> int:
        """Hand a stored file (renamed into place) to its processor and journal it;
        returns the C-STORE status. The receive side calls this once the file is
        complete, from any number of threads: concurrent callers' records share
        one transaction (group commit), and each caller returns only after its
        own record is committed. On failure the file is deleted and memory is
        untouched (the processor publishes only after the commit)."""
        return self._group_commit.submit((route, inst))

    def commit_instances(self, items: list[tuple[Route, InstanceRecord]]) -> list[int]:
        """`commit_instance` for several stored files at once (one caller, one wait)."""
        return self._group_commit.submit_many(items)

    def _commit_batch(self, items: list[tuple[Route, InstanceRecord]]) -> list[int]:
        """One transaction for every queued instance (runs under the journal lock)."""
        outcomes: list[Outcome | None] = [None] * len(items)
        statuses: list[int | None] = [None] * len(items)  # None: decided by the commit
        sched = self.ctx.scheduler
        try:
            # Plug-ins that keep no process memory (replica-safe) may share the journal with other batches.
            concurrent = all(route.processor.replica_safe for route, _ in items)
            # One instance whose files need no directory sync before the commit: the journal may
            # commit it with its own write (one round trip on PostgreSQL).
            alone = len(items) == 1 and not self.store.fsync
            with self.journal.transaction(sched.now(), sched.mono(), concurrent=concurrent, alone=alone) as tx:
                if len(items) == 1:  # alone: a failure rolls the whole transaction back, no savepoint needed
                    outcomes[0] = self._handle(*items[0], tx)
                else:
                    for i, (route, inst) in enumerate(items):
                        try:
                            with tx.step():
                                outcomes[i] = self._handle(route, inst, tx)
                        except TransactionAborted:
                            raise
                        except Exception as exc:
                            statuses[i] = self._failed(route, inst, exc)
                if self.store.fsync and any(o is Outcome.KEEP for o in outcomes):
                    self.store.sync_directory()  # the renames of this batch survive a power loss
        except Exception as exc:
            # nothing of this batch is committed, nothing published
            return [self._failed(route, inst, exc) if status is None else status
                    for (route, inst), status in zip(items, statuses)]
        self.metrics.journal_batches.observe(len(items))
        for i, ((route, inst), outcome) in enumerate(zip(items, outcomes)):
            if outcome is None:
                continue
            statuses[i] = SUCCESS
            ae = route.ae_title
            if outcome is Outcome.KEEP:
                self.metrics.instances.labels(ae).inc()
                self.metrics.bytes.labels(ae).inc(inst.size)
            else:
                delete_files([inst.path])
                self.metrics.ignored.labels(ae, outcome.value).inc()
        return [PROCESSING_FAILURE if status is None else status for status in statuses]

    @staticmethod
    def _handle(route: Route, inst: InstanceRecord, tx: Any) -> Outcome:
        inst.acked_at = tx.now
        outcome = route.processor.handle_instance(inst, tx)
        if outcome is Outcome.KEEP and inst.id is None:
            tx.journal.add_instance(inst)
        return outcome

    def _failed(self, route: Route, inst: InstanceRecord, exc: BaseException) -> int:
        delete_files([inst.path])
        inst.id = None
        if is_out_of_resources(exc):
            log.warning("instance %s on %s refused: journal out of resources (%s)",
                        short_hash(inst.sop_instance_uid), route.ae_title, exc)
            self.metrics.store_failures.labels("disk_full").inc()
            return OUT_OF_RESOURCES
        log.error("instance %s on %s failed in processor %s: %s: %s", short_hash(inst.sop_instance_uid),
                  route.ae_title, route.processor.name, type(exc).__name__, exc, exc_info=not isinstance(exc, (sqlite3.Error, TransactionAborted)))
        self.metrics.store_failures.labels("processor_error").inc()
        return PROCESSING_FAILURE

    def open_groups(self) -> int:
        if self.journal.shared:  # the groups of every replica, in the database
            try:
                return self.journal.count_open_groups()
            except Exception:  # database out of reach: reported by /health/ready, not by a failed scrape
                return 0
        return sum(len(getattr(p, "open_groups", ())) for p in self.processors.values())
