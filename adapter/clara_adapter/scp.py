"""The DICOM SCP: binds the DICOM port (plain or TLS) and runs every inbound
connection as an `Association` (dul_acceptor) on one asyncio event loop in a
thread of its own.

Bounds (SPEC §9 "Receive path"):

* ``maxAssociations`` counts negotiated associations only; a connection gets a
  slot when its A-ASSOCIATE-RQ is accepted, and an RQ beyond the limit gets
  A-ASSOCIATE-RJ (transient, local limit exceeded);
* a connection that has not completed negotiation within ``artimTimeout``
  seconds is closed (the TLS handshake is bounded by the same timeout); at most
  ``max(64, 4 × maxAssociations)`` such connections are kept, the oldest is
  dropped beyond that (a real requestor sends its A-ASSOCIATE-RQ within
  milliseconds, so only idle ones ever get old);
* an established association silent for ``networkTimeout`` seconds (and not
  waiting for us) is aborted; a peer that does not read our answers is not read
  either (so they cannot pile up), hence falls silent and is aborted the same way,
  without waiting for it to take what is still unsent;
* the association policy and every commit run in a small thread pool, so
  neither a slow DNS lookup nor the journal ever blocks the event loop.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from clara_adapter.dul_acceptor import AWAITING_RQ, ESTABLISHED, NEGOTIATING, Association
from clara_adapter.dul_pdu import APPLICATION_CONTEXT, AssociateRequest, ignore_pydicom_value_warnings
from clara_adapter.route import REJECT_BUSY, REJECT_CALLED_AE, Route

if TYPE_CHECKING:
    from clara_adapter.ingest import Ingest

log = logging.getLogger(__name__)

REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)  # permanent, service provider (ACSE), protocol version not supported
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)  # permanent, service user, application context not supported
SWEEP_SECONDS = 0.5


class LoopFuture:
    """The C-STORE status of a commit resolved on the event loop's own thread:
    the part of `concurrent.futures.Future` the acceptor uses, without the
    lock and condition that one allocates per instance."""

    __slots__ = ("_done", "_result", "_error", "_callbacks")

    def __init__(self) -> None:
        self._done = False
        self._result: Any = None
        self._error: BaseException | None = None
        self._callbacks: list[Callable[["LoopFuture"], None]] = []

    def add_done_callback(self, fn: Callable[["LoopFuture"], None]) -> None:
        if self._done:
            fn(self)
        else:
            self._callbacks.append(fn)

    def set_result(self, result: Any) -> None:
        self._result = result
        self._finish()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._finish()

    def _finish(self) -> None:
        if self._done:
            raise RuntimeError("LoopFuture already resolved")
        self._done = True
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn(self)
            except Exception:  # as concurrent.futures: one callback's bug must not starve the others
                log.exception("commit callback failed")

    def done(self) -> bool:
        return self._done

    def result(self) -> Any:
        if not self._done:
            raise RuntimeError("LoopFuture not resolved yet")
        if self._error is not None:
            raise self._error
        return self._result


class StorageSCP:
    """Binds the DICOM port and routes associations to `Ingest`."""

    def __init__(self, ingest: Ingest, settings: Any, on_association: Callable[[str], None] | None = None):
        self.ingest = ingest
        self.settings = settings
        self.on_association = on_association or (lambda result: None)
        self.server: asyncio.AbstractServer | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self._loop_thread = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(4, min(32, settings.maxAssociations + 2)), thread_name_prefix="dicom-commit")
        self._thread: threading.Thread | None = None
        self._connections: set[Association] = set()
        self._awaiting: dict[Association, None] = {}  # never-associated connections, oldest first
        self.max_awaiting = max(64, 4 * settings.maxAssociations)
        self._negotiated = 0
        self._accepting = True
        self._idle = threading.Condition()
        self._quick_commits = bool(getattr(ingest, "quick_commits", False))
        self._ready: list[tuple[Route, Any, LoopFuture]] = []  # finished, to commit on the loop

    # -- what associations ask of the server -------------------------------------
    def connection_opened(self, assoc: Association) -> None:
        if not self._accepting:
            assoc.close_quietly()
            return
        self._connections.add(assoc)
        self._awaiting[assoc] = None
        if len(self._awaiting) > self.max_awaiting:
            oldest = next(iter(self._awaiting))
            log.warning("connection from %s closed: more than %d connections without an A-ASSOCIATE-RQ",
                        oldest.address, self.max_awaiting)
            self._awaiting.pop(oldest)
            oldest.close_quietly()

    def request_received(self, assoc: Association) -> None:
        """The connection sent its A-ASSOCIATE-RQ: it no longer counts as idle."""
        self._awaiting.pop(assoc, None)

    def connection_closed(self, assoc: Association) -> None:
        self._connections.discard(assoc)
        self._awaiting.pop(assoc, None)
        if assoc.holds_slot:
            assoc.holds_slot = False
            self.release_slot(assoc)
        self.association_progressed()

    def release_slot(self, assoc: Association) -> None:
        self._negotiated -= 1
        self.ingest.metrics.active.set(self._negotiated)

    def association_progressed(self) -> None:
        with self._idle:
            self._idle.notify_all()

    async def admit(self, assoc: Association, rq: AssociateRequest) -> tuple[Route | None, tuple[int, int, int] | None]:
        """(route, None) with a slot claimed for ``assoc``, or (None, A-ASSOCIATE-RJ result/source/reason)."""
        verdict = await self.check_association(rq, assoc.address)
        if verdict is not None:
            return None, verdict
        return self.claim_slot(rq)

    def commit(self, assoc: Association, incoming: Any) -> "concurrent.futures.Future[int] | LoopFuture":
        """Commit a finished instance; the future yields its C-STORE status.

        When a commit is quick (SQLite journal, no fsync: `Ingest.quick_commits`)
        it runs on the event loop itself, once per loop iteration for every
        instance finished in it (one transaction), so no thread hand-off is paid
        per instance; a busy journal (a group closing) sends the batch to the
        thread pool instead of blocking the loop. Otherwise (PostgreSQL, fsync)
        it runs in the pool, batched across threads by the group commit."""
        if self._quick_commits:
            future = LoopFuture()
            self._ready.append((assoc.route, incoming, future))
            if len(self._ready) == 1:
                self.loop.call_soon(self._commit_ready)
            return future
        return self.pool.submit(self.ingest.commit_received, assoc.route, incoming)

    def _commit_ready(self) -> None:
        batch, self._ready = self._ready, []
        try:
            statuses = self.ingest.commit_received_now([(route, incoming) for route, incoming, _ in batch])
        except BaseException as exc:  # answered as a processing failure, never left waiting
            for _, _, future in batch:
                future.set_exception(exc)
            return
        if statuses is None:  # resolved from a pool thread: on the loop, as LoopFuture wants
            for route, incoming, future in batch:
                self.pool.submit(_complete, self.loop, future, self.ingest.commit_received, route, incoming)
            return
        for (_, _, future), status in zip(batch, statuses):
            future.set_result(status)  # its callback answers the C-STORE (call_soon: same thread)

    def check_protocol(self, rq: AssociateRequest) -> tuple[int, int, int] | None:
        """The A-ASSOCIATE-RJ for a request we cannot speak, else None."""
        if not rq.protocol_version & 1:
            self.on_association("rejected")
            return REJECT_PROTOCOL_VERSION
        if rq.application_context != APPLICATION_CONTEXT:
            self.on_association("rejected")
            return REJECT_APPLICATION_CONTEXT
        return None

    async def check_association(self, rq: AssociateRequest, address: str) -> tuple[int, int, int] | None:
        """None to accept, else the A-ASSOCIATE-RJ (result, source, reason)."""
        bad = self.check_protocol(rq)
        if bad is not None:
            return bad
        verdict = await self.loop.run_in_executor(self.pool, self.ingest.check_association, rq.called_ae,
                                                  rq.calling_ae, address)
        if verdict is not None:
            rsd, why = verdict
            log.info("association from %s (%s) to %s refused: %s", rq.calling_ae, address, rq.called_ae, why)
            self.on_association("rejected")
            return rsd
        return None

    def claim_slot(self, rq: AssociateRequest) -> tuple[Route | None, tuple[int, int, int] | None]:
        """The route and a slot for an accepted request, or (None, rejection)."""
        route = self.ingest.routes.get(rq.called_ae)
        if route is None:  # the configuration changed while the policy ran
            self.on_association("rejected")
            return None, REJECT_CALLED_AE
        if not self._accepting or self._negotiated >= self.settings.maxAssociations:
            log.info("association from %s refused: %d associations in progress (maxAssociations)",
                     rq.calling_ae, self._negotiated)
            self.on_association("rejected")
            return None, REJECT_BUSY
        self._negotiated += 1
        self.ingest.metrics.active.set(self._negotiated)
        self.on_association("accepted")
        return route, None

    # -- timers -------------------------------------------------------------------
    def _sweep(self) -> None:
        now = time.monotonic()
        artim = self.settings.artimTimeout
        idle = self.settings.networkTimeout
        for assoc in list(self._connections):
            if assoc.state in (AWAITING_RQ, NEGOTIATING):
                if now - assoc.opened > artim and assoc.state == AWAITING_RQ:
                    log.info("connection from %s closed: no A-ASSOCIATE-RQ within %gs (ARTIM)", assoc.address, artim)
                    assoc.close_quietly()
            elif assoc.state == ESTABLISHED and not assoc._committing and now - assoc.last_activity > idle:
                assoc.abort(f"no data for {idle:g}s (networkTimeout)")
        self.loop.call_later(SWEEP_SECONDS, self._sweep)

    # -- lifecycle ----------------------------------------------------------------
    @property
    def active_associations(self) -> int:
        return self._negotiated

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tlsCertFile:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(s.tlsCertFile, s.tlsKeyFile)
        if s.tlsCaFile:
            context.load_verify_locations(s.tlsCaFile)
            context.verify_mode = ssl.CERT_REQUIRED
        return context

    def start(self, host: str, port: int, listen: bool = True) -> None:
        """Bind and serve in a background thread; OSError if the port cannot be
        bound. ``listen=False``: run the loop only, connections are handed in
        (`serve_connection`)."""
        ssl_context = self.ssl_context = self._ssl_context()
        ignore_pydicom_value_warnings()
        if listen:
            import pynetdicom.sop_class  # noqa: F401  (its SOP class tables, now rather than at the first association)
        loop = self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="dicom-scp", daemon=True)
        self._thread.start()
        started.wait()

        async def listen_on() -> asyncio.AbstractServer | None:
            if not listen:
                return None
            return await loop.create_server(lambda: Association(self), host, port, ssl=ssl_context,
                                            ssl_handshake_timeout=self.settings.artimTimeout if ssl_context else None,
                                            backlog=256, reuse_address=True)

        try:
            self.server = asyncio.run_coroutine_threadsafe(listen_on(), loop).result()
        except BaseException:
            self._stop_loop()
            raise
        loop.call_soon_threadsafe(loop.call_later, SWEEP_SECONDS, self._sweep)

    async def serve_connection(self, sock: socket.socket, protocol_factory: Callable[[], Association]) -> None:
        """Serve a connection accepted elsewhere (TLS handshake included)."""
        await self.loop.connect_accepted_socket(
            protocol_factory, sock, ssl=self.ssl_context,
            ssl_handshake_timeout=self.settings.artimTimeout if self.ssl_context else None)

    def _run(self, started: threading.Event) -> None:
        self._loop_thread = threading.get_ident()
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(started.set)
        self.loop.run_forever()

    def _call(self, fn: Callable[[], Any], timeout: float = 10) -> Any:
        """Run ``fn`` on the event loop and wait for its result."""
        if self.loop is None or not self.loop.is_running():
            return None

        async def call() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout)

    def stop_accepting(self) -> None:
        """Close the listening socket and every connection that has not
        associated; associations in progress continue."""
        self._call(self.stop_accepting_on_loop)

    def stop_accepting_on_loop(self) -> None:
        self._accepting = False
        if self.server is not None:
            self.server.close()
        for assoc in list(self._connections):
            if assoc.state == AWAITING_RQ:
                assoc.close_quietly()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no negotiated association is open (or in negotiation)."""
        end = time.monotonic() + timeout

        def busy() -> bool:
            return any(a.state in (NEGOTIATING, ESTABLISHED) for a in list(self._connections))

        with self._idle:
            while busy():
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(min(left, 0.2))
        return True

    def abort_all(self) -> None:
        self._call(self.abort_all_on_loop)

    def abort_all_on_loop(self) -> None:
        for assoc in list(self._connections):
            assoc.abort("adapter shutting down")

    def call_from_any_thread(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` now on the loop's own thread, else soon on the loop."""
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        else:
            self.loop.call_soon_threadsafe(fn, *args)

    def close(self) -> None:
        """Stop the event loop and the commit threads (after a drain or abort_all)."""
        self._stop_loop()
        self.pool.shutdown(wait=True)

    def _stop_loop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._thread is not None:
                self._thread.join(5)


def _complete(loop: asyncio.AbstractEventLoop, future: LoopFuture, fn: Callable[..., Any], *args: Any) -> None:
    """In a pool thread: ``fn(*args)``, its result (or error) handed to ``future`` on the loop."""
    try:
        result = fn(*args)
    except BaseException as exc:
        loop.call_soon_threadsafe(future.set_exception, exc)
        return
    loop.call_soon_threadsafe(future.set_result, result)
