"""A receive worker process: the asyncio DICOM acceptor serving connections
the coordinator (`receive_coordinator`) accepted and handed over (the socket
passed with SCM_RIGHTS on a SOCK_SEQPACKET pair, with a key naming it); the
coordinator owns everything durable.

The worker does the per-byte work: PDU parsing, P-DATA reassembly, streaming
each dataset into a temporary file in the shared incoming folder, the
structural walk and the extraction of the grouping tags. It asks the
coordinator, over its link (`worker_link`: a Unix socket pair, marshal frames of
plain tuples), for:

* admission, once per association: ``("admit", id, called, calling, address)``
  → ``("ok", admission, route fields)`` or ``("rj", (result, source, reason))``;
  so slot counts, AE titles and source rules stay exact across workers;
* the commit of each instance: ``("commit", [(id, admission, temp name,
  record fields), ...])`` with every instance finished in one loop iteration
  → C-STORE statuses, in ``("replies", [(id, status), ...])``; the coordinator
  renames each file into place and commits what every worker sent in one round
  in one batch (group commit), and only then does the worker send the
  C-STORE-RSP (commit, then publish).

It tells the coordinator ``("closed", admission)`` when an association ends and
``("count", metric, labels, n)`` for the counters it decides (ignored SOP
classes, store failures, protocol rejections), and ``("idle_end", key)`` when a
handed-over connection sent its A-ASSOCIATE-RQ or closed. The coordinator sends
``("close_idle", key)`` (over the cap of never-associated connections),
``("stop_accepting",)``, ``("abort_all",)`` and ``("exit",)``.

The worker dies with the coordinator: its link reaches EOF (and PR_SET_PDEATHSIG
covers a coordinator that vanishes without closing it). SIGTERM/SIGINT are
ignored here: the coordinator drives the drain.

Run as ``python -m clara_adapter.receive_worker HANDOFF_FD LINK_FD PARENT_PID
LOG_LEVEL LOG_FORMAT COMPONENT``; the settings arrive as the first message on the link.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import importlib
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import types
from pathlib import Path
from typing import Any

from clara_dicom.logs import short_hash

from clara_adapter.dimse import OUT_OF_RESOURCES
from clara_adapter.dul_acceptor import Association
from clara_adapter.dul_pdu import AssociateRequest
from clara_adapter.incoming import IncomingInstance
from clara_adapter.journal import InstanceRecord
from clara_adapter.route import Route
from clara_adapter.scp import LoopFuture, StorageSCP
from clara_adapter.storage import DiskGuard, InstanceStore
from clara_adapter.worker_link import Link, LinkClosed

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


class CoordinatorLink:
    """The worker's end of the link: calls (answered by id) from any thread,
    notices, and the coordinator's commands (read on the event loop)."""

    def __init__(self, link: Link):
        self.link = link
        self._ids = itertools.count(1)
        self._pending: dict[int, concurrent.futures.Future | LoopFuture] = {}
        self._commits: list[tuple] = []  # queued on the loop, sent together at the end of its iteration
        self.loop: asyncio.AbstractEventLoop | None = None

    def send(self, message: tuple) -> None:
        self.link.send(message)

    def call(self, kind: str, *args: Any) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._ids)
        self._pending[call_id] = future
        self.send((kind, call_id, *args))
        return future

    def commit(self, admission: int, tmp_name: str, record: InstanceRecord) -> LoopFuture:
        """On the event loop: ask for the commit of one instance; every commit
        asked in one loop iteration goes out in one message (one write here, one
        read and one journal transaction in the coordinator). Its reply is read on
        the loop too, so a `LoopFuture` is enough."""
        future = LoopFuture()
        call_id = next(self._ids)
        self._pending[call_id] = future
        self._commits.append((call_id, admission, tmp_name, record_fields(record)))
        if len(self._commits) == 1:
            self.loop.call_soon(self._flush_commits)
        return future

    def commit_now(self, admission: int, tmp_name: str, record: InstanceRecord) -> concurrent.futures.Future:
        """`commit` from any thread, sent at once."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._ids)
        self._pending[call_id] = future
        self.send(("commit", [(call_id, admission, tmp_name, record_fields(record))]))
        return future

    def _flush_commits(self) -> None:
        batch, self._commits = self._commits, []
        try:
            self.send(("commit", batch))
        except OSError:
            pass  # the coordinator is gone: its link's EOF ends this process

    def read_ready(self, on_command: Any) -> bool:
        """On the event loop when the link is readable: handle every message
        waiting (replies resolve their futures right here, no thread hand-off).
        False once the coordinator is gone or said exit."""
        try:
            messages = self.link.receive()
        except LinkClosed:
            return False
        for message in messages:
            if message[0] == "replies":  # commits, answered together
                for call_id, result in message[1]:
                    future = self._pending.pop(call_id, None)
                    if future is not None:
                        future.set_result(result)
            elif message[0] == "reply":
                future = self._pending.pop(message[1], None)
                if future is not None:
                    future.set_result(message[2])
            elif on_command(message) is False:
                return False
        return not self.link.at_eof


def record_fields(record: InstanceRecord) -> tuple:
    """What the coordinator needs of a received instance, as plain values (its
    route, owner and AE title, it knows from the admission)."""
    return (record.calling_ae, record.sop_instance_uid, record.sop_class_uid, record.transfer_syntax,
            record.study_uid, record.series_uid, record.path.name, record.size, record.tags)


class _Counter:
    """A counter of the coordinator's metrics, incremented over the link."""

    def __init__(self, link: CoordinatorLink, name: str, labels: tuple = ()):
        self.link, self.name, self._labels = link, name, labels

    def labels(self, *labels: str) -> "_Counter":
        return _Counter(self.link, self.name, labels)

    def inc(self, amount: float = 1) -> None:
        self.link.send(("count", self.name, self._labels, amount))


class RemoteMetrics:
    def __init__(self, link: CoordinatorLink):
        self.ignored = _Counter(link, "ignored")
        self.store_failures = _Counter(link, "store_failures")


class WorkerIngest:
    """What the acceptor needs of `Ingest` in a worker: start receiving an instance."""

    def __init__(self, store: InstanceStore, metrics: RemoteMetrics):
        self.store = store
        self.metrics = metrics

    def receive_instance(self, route: Route, calling_ae: str, sop_class_uid: str, sop_instance_uid: str,
                         transfer_syntax: str) -> IncomingInstance:
        return IncomingInstance(self.store, self.metrics, route, calling_ae, sop_class_uid, sop_instance_uid,
                                transfer_syntax)


class WorkerSCP(StorageSCP):
    """The acceptor with admission and commits done by the coordinator."""

    def __init__(self, link: CoordinatorLink, store: InstanceStore, settings: Any):
        metrics = RemoteMetrics(link)
        associations = _Counter(link, "associations")
        super().__init__(WorkerIngest(store, metrics), settings,
                         on_association=lambda result: associations.labels(result).inc())
        self.link = link
        self._idle_keys: dict[Any, int] = {}  # connections without an A-ASSOCIATE-RQ -> the coordinator's key
        self._idle_by_key: dict[int, Any] = {}
        self._doomed: set[int] = set()  # dropped by the coordinator before we served them

    # -- connections handed over by the coordinator ----------------------------------
    # It accepts every connection, keeps the cap on never-associated ones across all
    # workers (oldest dropped first, in accept order) and tells us which one to close.
    def take_connections(self, handoff: socket.socket) -> None:
        """On the event loop: serve each connection (fd + key) arriving on ``handoff``."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(handoff, 16, 4)
            except (BlockingIOError, InterruptedError):
                return
            if not data:  # the coordinator is gone
                self.loop.remove_reader(handoff.fileno())
                return
            key = int.from_bytes(data, "big")
            for fd in fds[1:]:
                os.close(fd)
            if not fds:
                continue
            asyncio.ensure_future(self._serve(socket.socket(fileno=fds[0]), key))

    async def _serve(self, sock: socket.socket, key: int) -> None:
        def make() -> Association:
            assoc = Association(self)
            self._idle_keys[assoc] = key
            self._idle_by_key[key] = assoc
            return assoc

        try:
            await self.serve_connection(sock, make)
        except Exception as exc:  # TLS handshake failed or timed out (ARTIM)
            log.info("connection closed before association: %s", exc)
            sock.close()
            assoc = self._idle_by_key.pop(key, None)
            self._idle_keys.pop(assoc, None)
            self.link.send(("idle_end", key))
            return
        if key in self._doomed:
            self._doomed.discard(key)
            self.close_idle(key)

    def request_received(self, assoc: Any) -> None:
        super().request_received(assoc)
        self._idle_ended(assoc)

    def connection_closed(self, assoc: Any) -> None:
        super().connection_closed(assoc)
        self._idle_ended(assoc)

    def _idle_ended(self, assoc: Any) -> None:
        key = self._idle_keys.pop(assoc, None)
        if key is not None:
            self._idle_by_key.pop(key, None)
            self.link.send(("idle_end", key))

    def close_idle(self, key: int) -> None:
        """On the event loop: the coordinator's cap dropped this connection."""
        assoc = self._idle_by_key.get(key)
        if assoc is None:
            self._doomed.add(key)  # not served yet
        elif assoc in self._awaiting:
            log.warning("connection from %s closed: more than %d connections without an A-ASSOCIATE-RQ",
                        assoc.address, self.max_awaiting)
            assoc.close_quietly()

    async def admit(self, assoc: Any, rq: AssociateRequest) -> tuple[Route | None, tuple[int, int, int] | None]:
        bad = self.check_protocol(rq)
        if bad is not None:
            return None, bad
        reply = await asyncio.wrap_future(self.link.call("admit", rq.called_ae, rq.calling_ae, assoc.address))
        if reply[0] != "ok":
            return None, tuple(reply[1])
        assoc.admission = reply[1]
        return Route(processor=None, **reply[2]), None

    def release_slot(self, assoc: Any) -> None:
        self.link.send(("closed", assoc.admission))

    def commit(self, assoc: Any, incoming: IncomingInstance) -> concurrent.futures.Future | LoopFuture:
        if self.settings.fsyncFiles:  # fsync blocks: not on the event loop
            return self.pool.submit(self._commit, assoc.admission, incoming)
        try:
            incoming.writer.close()  # cheap without fsync: one thread hand-off less per instance
        except OSError as exc:
            future = LoopFuture()
            future.set_result(self._close_failed(incoming, exc))
            return future
        return self.link.commit(assoc.admission, incoming.writer.tmp.name, incoming.record)

    def _close_failed(self, incoming: IncomingInstance, exc: OSError) -> int:
        log.warning("instance %s: cannot close its file: %s", short_hash(incoming.sop_instance_uid), exc.strerror)
        self.ingest.metrics.store_failures.labels("write_error").inc()
        return OUT_OF_RESOURCES

    def _commit(self, admission: int, incoming: IncomingInstance) -> int:
        try:
            incoming.writer.close()  # fsync (if set) here; the coordinator only renames
        except OSError as exc:
            return self._close_failed(incoming, exc)
        return self.link.commit_now(admission, incoming.writer.tmp.name, incoming.record).result()


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the link's EOF still ends us
    if os.getppid() != parent:  # the coordinator died before prctl took effect
        os._exit(0)


def main(argv: list[str]) -> int:
    handoff_fd, link_fd, parent = int(argv[0]), int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from clara_dicom.logs import setup_logging

    setup_logging(int(argv[3]), argv[4], argv[5])
    conn = Link(socket.socket(fileno=link_fd))
    # the receive settings (validated by the coordinator); not AdapterSettings: its models take a second to import
    settings = types.SimpleNamespace(**conn.receive_one(None))
    incoming = Path(settings.incoming_dir)
    link = CoordinatorLink(conn)
    store = InstanceStore(incoming, DiskGuard(incoming.parent, settings.watermarkPercent,
                                              int(settings.reserveSpaceGB * 1024**3)),
                          fsync=settings.fsyncFiles, tmp_tag=settings.tmp_tag)
    scp = WorkerSCP(link, store, settings)
    scp.start("", 0, listen=False)
    link.loop = scp.loop
    handoff = socket.socket(fileno=handoff_fd)
    handoff.setblocking(False)
    scp.loop.call_soon_threadsafe(scp.loop.add_reader, handoff.fileno(), scp.take_connections, handoff)
    link.send(("ready", os.getpid()))
    # after "ready" (the coordinator's start-up does not wait for it), on the loop thread (pynetdicom's
    # circular imports break when two threads import it at once); connections queue meanwhile
    scp.loop.call_soon_threadsafe(importlib.import_module, "pynetdicom.sop_class")

    def on_command(message: tuple) -> bool:
        if message[0] == "stop_accepting":
            scp.stop_accepting_on_loop()
        elif message[0] == "close_idle":
            scp.close_idle(message[1])
        elif message[0] == "abort_all":
            scp.abort_all_on_loop()
        elif message[0] == "exit":
            return False
        return True

    done = threading.Event()

    def on_link() -> None:
        if not link.read_ready(on_command):
            done.set()

    scp.loop.call_soon_threadsafe(scp.loop.add_reader, conn.fileno(), on_link)
    done.wait()
    os._exit(0)  # coordinator gone or told us to exit: nothing of ours is durable


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
