"""The receive coordinator: the DICOM port served by several worker processes
(`receive_worker`), with admission and commits kept in this process.

This process binds the listening socket, accepts each connection and hands it
(SCM_RIGHTS) to the least busy of ``receiveWorkers`` worker processes, which do
all the per-byte work. It keeps what must
be exact or durable: association admission (AE titles, source rules, the disk
guard, ``maxAssociations`` slots, exact A-ASSOCIATE-RJ codes), the journal, the
processors, timers and job creation. One thread reads every worker's link
(`worker_link`); each instance a worker receives is renamed into place and
committed here, everything the workers sent in one round of that thread in one
call of `Ingest.commit_instances` (group commit); the worker answers the
C-STORE only after our reply.

A worker that dies loses only what it had not been answered for: its
associations end (the sender resends), their slots are released, its
temporary files (named ``.tmp-w<coordinator id>-<pid>-…``) are deleted and a new worker takes
its place. Workers end with this process (their link reaches EOF).

Same interface as `scp.StorageSCP`, which `Adapter` uses when ``receiveWorkers`` is 0.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from clara_dicom.logs import short_hash

from clara_adapter.dimse import OUT_OF_RESOURCES, PROCESSING_FAILURE
from clara_adapter.ingest import REJECT_BUSY, REJECT_CALLED_AE, Ingest, Route, commit_prepared
from clara_adapter.journal import InstanceRecord
from clara_adapter.storage import TMP_PREFIX
from clara_adapter.worker_link import Link, LinkClosed

log = logging.getLogger(__name__)

SUPERVISE_SECONDS = 0.2
READY_TIMEOUT = 60.0
RESPAWN_MIN_SECONDS = 1.0  # a worker that cannot start is retried at most once a second
ENDED_KEPT = 1024  # ended associations remembered per worker for their late commits (see Worker.ended)
# What a worker needs to receive; nothing else (journal DSN, tokens) leaves this process.
WORKER_SETTINGS = ("host", "dicomPort", "maxAssociations", "maxPduSize", "artimTimeout", "networkTimeout",
                   "tlsCertFile", "tlsKeyFile", "tlsCaFile", "storageDir", "watermarkPercent", "reserveSpaceGB",
                   "fsyncFiles")
WORKER_COUNTERS = {"ignored", "store_failures", "associations"}


@dataclass(eq=False)
class Worker:
    index: int
    proc: subprocess.Popen
    link: Link
    started: float
    slots: dict[int, Route] = field(default_factory=dict)  # admission id -> route, as accepted
    # admission id -> route of associations that ended lately: a peer that leaves right after its
    # last instance has the worker's batched commit of it arrive after "closed" (bounded)
    ended: dict[int, Route] = field(default_factory=dict)
    handoff: socket.socket | None = None  # SOCK_SEQPACKET: (key, connection fd) per accepted connection
    linked: bool = False  # its link is read by the link thread
    unlinked: threading.Event = field(default_factory=threading.Event)  # ... no longer: its last messages handled
    accepted: int = 0  # associations this worker was admitted for
    idle: int = 0  # connections handed to it that have not sent an A-ASSOCIATE-RQ
    handed: int = 0

    def send(self, message: tuple) -> None:
        try:
            self.link.send(message)
        except OSError:
            pass  # it died: the supervisor notices


class ReceiveCoordinator:
    def __init__(self, ingest: Ingest, settings: Any, workers: int,
                 on_association: Callable[[str], None] | None = None):
        self.ingest = ingest
        self.settings = settings
        self.count = workers
        self.on_association = on_association or (lambda result: None)
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(8, min(64, settings.maxAssociations + 4)), thread_name_prefix="receive-commit")
        self.server: socket.socket | None = None  # the listening socket
        self.workers: list[Worker | None] = []
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._negotiated = 0
        self._admitting = 0
        self._accepting = True
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None
        # never-associated connections of every worker, in accept order: (worker, key)
        self._idle: dict[tuple[Worker, int], None] = {}
        self._accept_thread: threading.Thread | None = None
        self._keys = itertools.count(1)
        # one thread reads every worker's link (select): each round's commits, from all workers, in one batch
        self._link_thread: threading.Thread | None = None
        self._joining: list[Worker] = []  # workers whose link the link thread is to add
        self._wake_r, self._wake_w = socket.socketpair()
        self._links_stop = False
        self.max_awaiting = max(64, 4 * settings.maxAssociations)  # as StorageSCP, across all workers
        # in workers' temp-file names: replicas share the volume and pids repeat across pods,
        # so a dead worker's leftovers are found by this coordinator's id and the worker's pid
        self.tmp_id = uuid.uuid4().hex[:8]

    # -- lifecycle ----------------------------------------------------------------
    def start(self, host: str, port: int) -> None:
        """Bind, start the workers and wait until each serves; OSError if the port cannot be bound."""
        self.server = socket.create_server((host, port), backlog=256, reuse_port=False)
        self._link_thread = threading.Thread(target=self._serve_links, name="receive-links", daemon=True)
        self._link_thread.start()
        try:
            self.workers = [self._launch(i) for i in range(self.count)]  # they start in parallel
            for worker in self.workers:
                self._await_ready(worker)
        except BaseException:
            self.close()
            raise
        self._supervisor = threading.Thread(target=self._supervise, name="receive-supervisor", daemon=True)
        self._supervisor.start()
        self.server.settimeout(SUPERVISE_SECONDS)  # so the accept loop sees stop_accepting
        self._accept_thread = threading.Thread(target=self._accept, name="dicom-accept", daemon=True)
        self._accept_thread.start()
        log.info("receiving DICOM in %d worker processes (pids %s)", self.count,
                 ", ".join(str(w.proc.pid) for w in self.workers if w))

    def _spawn(self, index: int) -> Worker:
        return self._await_ready(self._launch(index))

    def _launch(self, index: int) -> Worker:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        handoff, their_handoff = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        root = logging.getLogger()
        formatter = root.handlers[0].formatter if root.handlers else None
        fmt = "json" if type(formatter).__name__ == "JsonFormatter" else "text"
        component = getattr(formatter, "component", "clara-dicom")  # workers log as their coordinator does
        cmd = [sys.executable, "-m", "clara_adapter.receive_worker", str(their_handoff.fileno()),
               str(theirs.fileno()), str(os.getpid()), str(root.getEffectiveLevel()), fmt, component]
        try:
            proc = subprocess.Popen(cmd, pass_fds=(their_handoff.fileno(), theirs.fileno()),
                                    stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
            their_handoff.close()
        worker = Worker(index, proc, Link(mine), time.monotonic(), handoff=handoff)
        worker.send({**self.settings.model_dump(mode="json", include=set(WORKER_SETTINGS)),
                     "incoming_dir": str(self.settings.incoming_dir),
                     "tmp_tag": f"w{self.tmp_id}-{worker.proc.pid}-"})
        return worker

    def _await_ready(self, worker: Worker) -> Worker:
        proc, link = worker.proc, worker.link
        try:
            link.receive_one(READY_TIMEOUT)  # ("ready", pid)
        except TimeoutError:
            exc: Exception = OSError(f"receive worker {proc.pid} did not start within {READY_TIMEOUT:g}s")
        except (OSError, LinkClosed) as error:
            exc = error
        else:
            with self._cond:
                self._joining.append(worker)
            self._wake()
            return worker
        proc.kill()
        proc.wait()
        link.close()
        worker.handoff.close()
        raise OSError(f"receive worker did not start: {exc}") from None

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # closed: the link thread has stopped

    def _supervise(self) -> None:
        """Replace workers that died (SIGKILL, OOM, a bug): their peers resend."""
        while not self._stopping.wait(SUPERVISE_SECONDS):
            for i, worker in enumerate(self.workers):
                if worker is None or worker.proc.poll() is None:
                    continue
                log.warning("receive worker %d (pid %d) exited with %s: its associations were aborted; "
                            "starting another", i, worker.proc.pid, worker.proc.returncode)
                if worker.linked:
                    worker.unlinked.wait(5)  # its last commits handled before its files are removed
                self._forget(worker)
                if self._stopping.is_set():
                    return
                time.sleep(max(0.0, worker.started + RESPAWN_MIN_SECONDS - time.monotonic()))
                try:
                    self.workers[i] = self._spawn(i)
                except OSError as exc:
                    log.error("%s", exc)
                    self.workers[i] = None
                    threading.Timer(RESPAWN_MIN_SECONDS, self._retry_spawn, args=(i,)).start()

    def _retry_spawn(self, i: int) -> None:
        if self._stopping.is_set() or self.workers[i] is not None:
            return
        try:
            self.workers[i] = self._spawn(i)
        except OSError as exc:
            log.error("%s", exc)
            threading.Timer(RESPAWN_MIN_SECONDS, self._retry_spawn, args=(i,)).start()

    def _forget(self, worker: Worker) -> None:
        """A worker is gone: free its slots, delete its temporary files."""
        worker.link.close()
        worker.handoff.close()
        with self._cond:
            self._negotiated -= len(worker.slots)
            worker.slots.clear()
            for gone in [k for k in self._idle if k[0] is worker]:
                del self._idle[gone]
            worker.idle = 0
            self.ingest.metrics.active.set(self._negotiated)
            self._cond.notify_all()
        prefix = f"{TMP_PREFIX}w{self.tmp_id}-{worker.proc.pid}-"
        root = self.ingest.store.root
        removed = 0
        for entry in os.scandir(root):
            if entry.name.startswith(prefix):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except FileNotFoundError:
                    pass
        if removed:
            log.info("removed %d partial files of receive worker %d", removed, worker.proc.pid)

    # -- the links ----------------------------------------------------------------
    def _serve_links(self) -> None:
        """Every worker's messages, on this one thread: each round of the select
        reads everything waiting on every link, runs the commits of all of them
        in one call of the group commit (one transaction) and answers each
        worker in one message. No thread hand-off per instance; admissions,
        which may resolve host names, go to the pool."""
        selector = selectors.DefaultSelector()
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._links_stop:
                commits: list[tuple[Worker, list]] = []
                ended: list[Worker] = []
                for key, _ in selector.select():
                    worker = key.data
                    if worker is None:
                        self._join_links(selector)
                        continue
                    try:
                        messages = worker.link.receive()
                    except LinkClosed as exc:
                        log.warning("receive worker %d: link broken (%s)", worker.proc.pid, exc)
                        messages = []
                        worker.link.at_eof = True
                    for message in messages:
                        if message[0] == "commit":
                            commits.append((worker, message[1]))
                            continue
                        try:
                            self._handle(worker, message)
                        except Exception:  # one bad message must not stop every worker's link
                            log.exception("receive worker %d: cannot handle %r", worker.proc.pid, message[0])
                    if worker.link.at_eof:
                        selector.unregister(key.fileobj)
                        ended.append(worker)
                if commits:
                    self._commit_all(commits)
                for worker in ended:
                    worker.unlinked.set()
        except Exception:  # a bug here stalls every worker: make it loud
            log.exception("receive link thread failed")
            raise
        finally:
            selector.close()

    def _join_links(self, selector: selectors.BaseSelector) -> None:
        try:
            self._wake_r.recv(4096, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            pass
        with self._cond:
            joining, self._joining = self._joining, []
        for worker in joining:
            try:
                selector.register(worker.link.sock, selectors.EVENT_READ, worker)
            except (ValueError, OSError):  # closed meanwhile
                worker.unlinked.set()
                continue
            worker.linked = True

    def _commit_all(self, commits: list[tuple[Worker, list]]) -> None:
        """Commit every instance asked for in one round, together; then one
        ``replies`` message per worker (each C-STORE-RSP waits for it)."""
        who: list[tuple[Worker, int]] = []
        prepared: list[tuple[Route, InstanceRecord] | int] = []
        for worker, batch in commits:
            for entry in batch:
                try:
                    call_id, admission, tmp_name, fields = entry
                except (TypeError, ValueError):
                    log.error("receive worker %d sent a malformed commit", worker.proc.pid)
                    continue
                who.append((worker, call_id))
                prepared.append(self._prepare(worker, admission, tmp_name, fields))
        try:
            statuses = commit_prepared(prepared, self.ingest.commit_instances)
        except Exception:
            log.exception("receive worker commits failed")
            statuses = [PROCESSING_FAILURE] * len(prepared)
        replies: dict[Worker, list[tuple[int, int]]] = {}
        for (worker, call_id), status in zip(who, statuses):
            replies.setdefault(worker, []).append((call_id, status))
        for worker, answers in replies.items():
            worker.send(("replies", answers))

    def _handle(self, worker: Worker, message: tuple) -> None:
        kind = message[0]
        if kind == "admit":
            with self._cond:
                self._admitting += 1
            self.pool.submit(self._reply, worker, message[1], self._admit, worker, *message[2:])
        elif kind == "closed":
            with self._cond:
                route = worker.slots.pop(message[1], None)
                if route is not None:
                    self._negotiated -= 1
                    self.ingest.metrics.active.set(self._negotiated)
                    worker.ended[message[1]] = route
                    if len(worker.ended) > ENDED_KEPT:
                        del worker.ended[next(iter(worker.ended))]  # the oldest
                self._cond.notify_all()
        elif kind == "idle_end":
            with self._cond:
                if self._idle.pop((worker, message[1]), "gone") is None:
                    worker.idle -= 1
        elif kind == "count" and message[1] in WORKER_COUNTERS:
            if message[1] == "associations":
                self.on_association(*message[2])
            else:
                getattr(self.ingest.metrics, message[1]).labels(*message[2]).inc(message[3])

    def _accept(self) -> None:
        """Accept every connection here and hand it to the least busy worker: the
        load is spread evenly (a shared listening socket lets one busy worker
        take most connections) and the cap on never-associated connections holds
        across workers, oldest first."""
        server = self.server
        while self._accepting:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._accepting or server.fileno() < 0:
                    return
                log.warning("accept failed: %s", exc.strerror)  # EMFILE and the like: the peer retries
                time.sleep(0.05)
                continue
            try:
                self._hand_over(conn)
            finally:
                conn.close()  # the worker has its own descriptor now

    def _hand_over(self, conn: socket.socket) -> None:
        dropped = None
        with self._cond:
            live = [w for w in self.workers if w is not None and w.linked and w.proc.poll() is None]
            if not live:
                log.warning("connection refused: no receive worker running")
                return
            worker = min(live, key=lambda w: (len(w.slots) + w.idle, w.handed))
            key = next(self._keys)
            worker.handed += 1
            worker.idle += 1
            self._idle[(worker, key)] = None
            if len(self._idle) > self.max_awaiting:
                dropped = next(iter(self._idle))
                del self._idle[dropped]
                dropped[0].idle -= 1
        try:
            socket.send_fds(worker.handoff, [key.to_bytes(8, "big")], [conn.fileno()])
        except OSError:
            with self._cond:
                if self._idle.pop((worker, key), "gone") is None:
                    worker.idle -= 1
        if dropped is not None:
            dropped[0].send(("close_idle", dropped[1]))

    def _reply(self, worker: Worker, call_id: int, fn: Callable[..., Any], *args: Any) -> None:
        try:
            result = fn(*args)
        except Exception:
            log.exception("receive worker request failed")
            result = ("rj", REJECT_BUSY) if fn == self._admit else PROCESSING_FAILURE
        worker.send(("reply", call_id, result))

    def _admit(self, worker: Worker, called_ae: str, calling_ae: str, address: str) -> tuple:
        try:
            verdict = self.ingest.check_association(called_ae, calling_ae, address)
            if verdict is not None:
                rsd, why = verdict
                log.info("association from %s (%s) to %s refused: %s", calling_ae, address, called_ae, why)
                self.on_association("rejected")
                return "rj", rsd
            with self._cond:
                route = self.ingest.routes.get(called_ae)
                if route is None:  # the configuration changed while the policy ran
                    self.on_association("rejected")
                    return "rj", REJECT_CALLED_AE
                if not self._accepting or self._negotiated >= self.settings.maxAssociations:
                    log.info("association from %s refused: %d associations in progress (maxAssociations)",
                             calling_ae, self._negotiated)
                    self.on_association("rejected")
                    return "rj", REJECT_BUSY
                admission = next(self._ids)
                worker.slots[admission] = route
                worker.accepted += 1
                self._negotiated += 1
                self.ingest.metrics.active.set(self._negotiated)
            self.on_association("accepted")
            return "ok", admission, {
                "owner": route.owner, "ae_title": route.ae_title, "tags": route.tags,
                "ignored_sop_classes": route.ignored_sop_classes, "allowed_sop_classes": route.allowed_sop_classes,
                "allowed_sources": route.allowed_sources}
        finally:
            with self._cond:
                self._admitting -= 1
                self._cond.notify_all()

    def _prepare(self, worker: Worker, admission: int, tmp_name: str,
                 fields: tuple) -> tuple[Route, InstanceRecord] | int:
        """Rename a worker's finished file into place: what to commit, or the C-STORE status."""
        root = self.ingest.store.root
        # an association that has just ended still gets its last instances committed, as in-process
        route = worker.slots.get(admission) or worker.ended.get(admission)
        try:
            (calling_ae, sop_instance_uid, sop_class_uid, transfer_syntax, study_uid, series_uid, final_name,
             size, tags) = fields
        except (TypeError, ValueError):
            route = final_name = None
        if (route is None or not isinstance(tmp_name, str) or "/" in tmp_name or not tmp_name.startswith(TMP_PREFIX)
                or not isinstance(final_name, str) or "/" in final_name or final_name.startswith(".")):
            log.error("receive worker %d sent a commit for an unknown association or a bad file name",
                      worker.proc.pid)
            if isinstance(tmp_name, str) and "/" not in tmp_name and tmp_name.startswith(TMP_PREFIX):
                _unlink(root / tmp_name)
            return PROCESSING_FAILURE
        record = InstanceRecord(
            owner=route.owner, ae_title=route.ae_title, calling_ae=calling_ae, sop_instance_uid=sop_instance_uid,
            sop_class_uid=sop_class_uid, transfer_syntax=transfer_syntax, study_uid=study_uid,
            series_uid=series_uid, path=root / final_name, size=size, acked_at=0.0, tags=tags)
        try:
            os.rename(root / tmp_name, record.path)
        except OSError as exc:
            log.warning("instance %s on %s: cannot finalize its file: %s", short_hash(record.sop_instance_uid),
                        route.ae_title, exc.strerror)
            _unlink(root / tmp_name)
            self.ingest.metrics.store_failures.labels("write_error").inc()
            return OUT_OF_RESOURCES
        return route, record

    # -- what Adapter asks --------------------------------------------------------
    @property
    def active_associations(self) -> int:
        return self._negotiated

    def status(self) -> dict[str, Any]:
        """For /health/status: each worker's pid, associations accepted and open."""
        return {"receiveWorkers": [{"pid": w.proc.pid, "associationsAccepted": w.accepted,
                                    "associationsActive": len(w.slots)} for w in list(self.workers) if w is not None]}

    def _broadcast(self, message: tuple) -> None:
        for worker in list(self.workers):
            if worker is not None:
                worker.send(message)

    def stop_accepting(self) -> None:
        """Close the port everywhere and every connection that has not associated;
        associations in progress continue."""
        with self._cond:
            self._accepting = False
        self._broadcast(("stop_accepting",))
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        if self.server is not None:
            self.server.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no association is open (or being admitted) in any worker."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._negotiated > 0 or self._admitting > 0:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.2))
        return True

    def abort_all(self) -> None:
        self._broadcast(("abort_all",))

    def close(self) -> None:
        """Stop the workers (after a drain or abort_all) and the commit threads."""
        self._stopping.set()
        with self._cond:
            self._accepting = False
        if self._accept_thread is not None:
            self._accept_thread.join(5)
        self._broadcast(("exit",))
        for worker in list(self.workers):
            if worker is None:
                continue
            try:
                worker.proc.wait(5)
            except subprocess.TimeoutExpired:
                worker.proc.kill()
                worker.proc.wait()
            if worker.linked:
                worker.unlinked.wait(5)  # its last messages handled
            self._forget(worker)  # its spare and partial files
        if self._supervisor is not None:
            self._supervisor.join(5)
        if self.server is not None:
            self.server.close()
        self._links_stop = True
        self._wake()
        if self._link_thread is not None:
            self._link_thread.join(5)
        self._wake_w.close()
        self._wake_r.close()
        self.pool.shutdown(wait=True)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
