"""The association acceptor: PS3.8 upper-layer state machine of one inbound
connection, with the C-ECHO and C-STORE service on top (asyncio protocol).

States (PS3.8 §9.2): awaiting A-ASSOCIATE-RQ (Sta2, ARTIM running) →
negotiating (our policy runs in a worker thread) → established (Sta6) →
closed. A-RELEASE-RQ is answered with A-RELEASE-RP and the connection closed;
any framing or protocol error gets an A-ABORT; a peer's A-ABORT or a lost
connection discards the instance being received.

Why our own and not pynetdicom's: pynetdicom runs two polling threads and a
per-PDU state machine per association and buffers whole datasets; here one
event loop serves every connection, PDV fragments go straight to the temporary
file, and every bound (PDU length, control PDUs, un-negotiated connections) is
checked before anything is allocated (SPEC §9 "Receive path").

Only the C-STORE commit (finalize the file + `Ingest.commit_instance`) and the
association policy run outside the loop, in the server's thread pool. A peer
that sends a second instance before the first is answered (we negotiate no
asynchronous operations) stops being read until both are committed, which
bounds the work a peer can queue.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import TYPE_CHECKING, Any

from pydicom.uid import RE_VALID_UID

from clara_adapter import dimse, dul_pdu
from clara_adapter.dul_pdu import AssociateRequest, PduError, PduStream

if TYPE_CHECKING:
    from clara_adapter.incoming import IncomingInstance
    from clara_adapter.scp import StorageSCP

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
VERIFICATION_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                         "1.2.840.10008.1.2.2")
# Accepted like storage (pynetdicom's "unrestricted storage"): storage SOP classes, and private or
# unknown abstract syntaxes (vendors' private storage classes); known non-storage services are refused.
_STORAGE_LIKE = {"StorageServiceClass", "NonPatientObjectStorageServiceClass", "ServiceClass"}

RECEIVE_BUFFER = 1024 * 1024  # once associated: one recv can take a whole 512 KB CT slice
NEGOTIATION_BUFFER = 64 * 1024  # before: an A-ASSOCIATE-RQ is a few KB
INFLATE_BUDGET = 16 * 1024 * 1024  # deflated datasets: bytes inflated per event-loop turn (~40 ms), see _inflate_step

AWAITING_RQ, NEGOTIATING, ESTABLISHED, CLOSED = "awaiting-rq", "negotiating", "established", "closed"


def is_storage_like(abstract_syntax: str) -> bool:
    from pynetdicom.sop_class import uid_to_service_class  # ~1 s to import: a receive worker warms it up

    return uid_to_service_class(abstract_syntax).__name__ in _STORAGE_LIKE


def is_uid(value: str) -> bool:
    """A syntactically valid UID (PS3.5 9.1): dot-separated numbers, at most 64 characters
    (pydicom's pattern; its ``UID.is_valid`` would also log a warning per hostile name)."""
    return len(value) <= 64 and RE_VALID_UID.fullmatch(value) is not None


def negotiate_contexts(rq: AssociateRequest) -> list[tuple[int, int, str]]:
    """(context id, result, transfer syntax) for each proposed context: Verification
    with an uncompressed syntax; storage with the first proposed syntax kept."""
    results = []
    for cx in rq.contexts:
        if not cx.transfer_syntaxes:
            results.append((cx.context_id, dul_pdu.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, ""))
        elif cx.abstract_syntax == VERIFICATION:
            ts = next((t for t in cx.transfer_syntaxes if t in VERIFICATION_SYNTAXES), None)
            results.append((cx.context_id, dul_pdu.PC_ACCEPTANCE, ts) if ts else
                           (cx.context_id, dul_pdu.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, cx.transfer_syntaxes[0]))
        elif cx.abstract_syntax and is_storage_like(cx.abstract_syntax):
            # kept as proposed, into the file meta: the first that is a UID at all
            ts = next((t for t in cx.transfer_syntaxes if is_uid(t)), None)
            results.append((cx.context_id, dul_pdu.PC_ACCEPTANCE, ts) if ts else
                           (cx.context_id, dul_pdu.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, cx.transfer_syntaxes[0]))
        else:
            results.append((cx.context_id, dul_pdu.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, cx.transfer_syntaxes[0]))
    return results


class RefusedInstance:
    """A C-STORE refused from its command alone: its dataset is read and dropped."""

    __slots__ = ("status",)
    backlog = False

    def __init__(self, status: int):
        self.status = status

    def feed(self, data: memoryview, budget: int | None = None) -> int:
        return 0

    def finish(self) -> int:
        return self.status

    def discard(self) -> None:
        pass


class Association(asyncio.BufferedProtocol):
    """One inbound connection, from TCP accept to close."""

    def __init__(self, server: "StorageSCP"):
        self.server = server
        self.settings = server.settings
        self.state = AWAITING_RQ
        self.opened = time.monotonic()
        self.last_activity = self.opened
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.route: Any = None
        self.calling_ae = ""
        self.peer_max_pdu = 0
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, transfer syntax)
        self.holds_slot = False
        self.admission: int | None = None  # the coordinator's id for it (receive workers)
        self._view = memoryview(bytearray(NEGOTIATION_BUFFER))
        max_pdu = self.settings.maxPduSize
        self.stream = PduStream(self, max_pdu or None)
        # the DIMSE message being received
        self._pdv_is_command = False
        self._pdv_context = 0
        self._pdv_last = False
        self._command = bytearray()
        self._command_context = 0
        self._store: tuple[dict, IncomingInstance, int] | None = None  # (command, incoming, context id)
        self._committing = 0
        self._paused = False  # reading paused until the instances in flight are committed
        self._writes_blocked = False  # reading paused until the peer takes our answers (pause_writing)
        self._release_pending = False
        self._held = b""  # bytes read but not parsed yet: after the A-ASSOCIATE-RQ, or behind an inflation
        self._inflating = False  # a deflated dataset's backlog is inflated a slice per loop turn
        self._end_after_inflating = False
        self._inflate_budget = INFLATE_BUDGET  # left for this loop turn

    # -- transport callbacks ----------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.address = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.server.connection_opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.last_activity = time.monotonic()
        self._inflate_budget = INFLATE_BUDGET
        self._feed(self._view[:nbytes])

    def _feed(self, data: memoryview) -> None:
        try:
            used = self.stream.feed(data)
            if used < len(data) and (self.state == NEGOTIATING or self._inflating):
                # PDUs sent before our A-ASSOCIATE-AC arrived with the RQ, or behind a dataset
                # being inflated: kept (≤ one read) for later, as the kernel keeps later segments
                self._held += bytes(data[used:])
        except PduError as exc:
            self.abort(str(exc), exc.reason)
        except Exception:
            log.exception("association from %s: internal error", self.address)
            self.abort("internal error")

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        # The peer does not read our answers: stop reading its requests, or every C-ECHO-RSP and
        # C-STORE-RSP it leaves unread would pile up in the transport's buffer without bound.
        # Silent from then on, it is aborted after networkTimeout like any stalled peer.
        self._writes_blocked = True
        if self.state == ESTABLISHED and self.transport is not None and not self._paused:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._writes_blocked = False
        self._resume_reading()

    def _resume_reading(self) -> None:
        if (self.state == ESTABLISHED and not self._paused and not self._writes_blocked and not self._inflating
                and self.transport is not None and not self.transport.is_closing()):
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._store is not None:
            self._store[1].discard()
            self._store = None
            if self.state == ESTABLISHED:
                log.info("association from %s (%s) ended inside a C-STORE: the partial instance was discarded",
                         self.calling_ae, self.address)
        self.state = CLOSED
        self.stream.stopped = True
        self.server.connection_closed(self)

    # -- closing ------------------------------------------------------------------
    def abort(self, why: str, reason: int = dul_pdu.ABORT_UNSPECIFIED) -> None:
        """Send A-ABORT and drop the connection."""
        if self.state == CLOSED or self.transport is None:
            return
        if self.transport.is_closing():
            # closed (released, peer's A-ABORT) but our last PDUs are still unsent after
            # networkTimeout: a peer that reads nothing, and close() would wait for it forever
            if self.transport.get_write_buffer_size():
                self.transport.abort()
            return
        log.warning("association from %s aborted: %s", self.address, why)
        self.stream.stopped = True
        self.transport.write(dul_pdu.abort(dul_pdu.ABORT_SOURCE_PROVIDER, reason))
        if self.transport.get_write_buffer_size():  # the peer is not reading: the A-ABORT cannot reach it
            self.transport.abort()
        else:
            self.transport.close()

    def close_quietly(self) -> None:
        """Drop a connection that never associated (ARTIM expired, shutdown)."""
        self.stream.stopped = True
        if self.transport is not None:
            self.transport.abort()

    # -- PDUs -----------------------------------------------------------------------
    def control_pdu(self, pdu_type: int, body: bytes) -> None:
        if pdu_type == dul_pdu.A_ASSOCIATE_RQ:
            if self.state != AWAITING_RQ:
                raise PduError("A-ASSOCIATE-RQ on an association", dul_pdu.ABORT_UNEXPECTED_PDU)
            rq = dul_pdu.decode_associate_rq(body)
            self.state = NEGOTIATING
            self.server.request_received(self)
            self.stream.stopped = True  # nothing may follow until we answered
            self.transport.pause_reading()
            asyncio.ensure_future(self._negotiate(rq))
        elif pdu_type == dul_pdu.A_RELEASE_RQ:
            if self.state != ESTABLISHED:
                raise PduError("A-RELEASE-RQ before association", dul_pdu.ABORT_UNEXPECTED_PDU)
            self.stream.stopped = True
            if self._committing:
                self._release_pending = True  # answered once the C-STORE in flight is answered
            else:
                self._release()
        elif pdu_type == dul_pdu.A_ABORT:
            log.info("association from %s (%s): peer aborted", self.calling_ae or "?", self.address)
            self.stream.stopped = True
            self.transport.close()
        else:
            raise PduError(f"unexpected PDU type {pdu_type} from a requestor", dul_pdu.ABORT_UNEXPECTED_PDU)

    async def _negotiate(self, rq: AssociateRequest) -> None:
        route, verdict = await self.server.admit(self, rq)
        if route is not None:
            if self.state == CLOSED:  # the peer left while we decided: connection_closed already ran
                self.server.release_slot(self)
                return
            self.holds_slot = True  # released in connection_closed
        if self.transport is None or self.transport.is_closing():
            return
        if route is None:
            self.transport.write(dul_pdu.associate_rj(*verdict))
            self.transport.close()
            self.state = CLOSED
            return
        self.route = route
        self.calling_ae = rq.calling_ae
        self.peer_max_pdu = rq.max_pdu_length
        results = negotiate_contexts(rq)
        self.contexts = {cid: self._context_syntax(rq, cid, ts) for cid, result, ts in results
                         if result == dul_pdu.PC_ACCEPTANCE}
        self.transport.write(dul_pdu.associate_ac(rq, results, self.settings.maxPduSize))
        self.state = ESTABLISHED
        self._view = memoryview(bytearray(RECEIVE_BUFFER))
        self.last_activity = time.monotonic()
        self.stream.stopped = False
        held, self._held = self._held, b""
        if held:
            self._feed(memoryview(held))
        self._resume_reading()

    @staticmethod
    def _context_syntax(rq: AssociateRequest, context_id: int, ts: str) -> tuple[str, str]:
        abstract = next(cx.abstract_syntax for cx in rq.contexts if cx.context_id == context_id)
        return abstract, ts

    def _release(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(dul_pdu.RELEASE_RP)
            self.transport.close()

    # -- PDVs -----------------------------------------------------------------------
    def pdv_begin(self, context_id: int, is_command: bool, is_last: bool) -> None:
        if self.state != ESTABLISHED:
            raise PduError("P-DATA-TF before association", dul_pdu.ABORT_UNEXPECTED_PDU)
        if context_id not in self.contexts:
            raise PduError(f"PDV on presentation context {context_id}, which was not accepted")
        if is_command:
            if self._store is not None:
                raise PduError("command fragment inside a dataset", dul_pdu.ABORT_UNEXPECTED_PDU)
            if self._command and context_id != self._command_context:
                raise PduError("command fragments on different presentation contexts")
            self._command_context = context_id
        else:
            if self._store is None or self._store[2] != context_id:
                raise PduError("dataset fragment without a C-STORE-RQ on its context",
                               dul_pdu.ABORT_UNEXPECTED_PDU)
        self._pdv_is_command = is_command
        self._pdv_last = is_last

    def pdv_data(self, data: memoryview) -> None:
        if self._pdv_is_command:
            if len(self._command) + len(data) > dimse.MAX_COMMAND_SET:
                raise PduError("command set too long")
            self._command += data
        else:
            incoming = self._store[1]
            self._inflate_budget -= incoming.feed(data, self._inflate_budget)
            if incoming.backlog and not self._inflating:
                self._inflating = True
                self.stream.stopped = True  # the rest of this read is held (_feed)
                self.transport.pause_reading()
                self.server.loop.call_soon(self._inflate_step)

    def _inflate_step(self) -> None:
        """One slice of a deflated dataset's backlog per loop turn, then what was held back."""
        if self.state == CLOSED or self._store is None or self.transport is None or self.transport.is_closing():
            return
        self.last_activity = time.monotonic()  # our work, not a silent peer
        try:
            incoming = self._store[1]
            self._inflate_budget = INFLATE_BUDGET - incoming.drain(INFLATE_BUDGET)
            if incoming.backlog:
                self.server.loop.call_soon(self._inflate_step)
                return
            self._inflating = False
            if self._end_after_inflating:
                self._end_after_inflating = False
                command, incoming, context_id = self._store
                self._store = None
                self._on_dataset_complete(command, incoming, context_id)
        except PduError as exc:
            self.abort(str(exc), exc.reason)
            return
        except Exception:
            log.exception("association from %s: internal error", self.address)
            self.abort("internal error")
            return
        self.stream.stopped = False
        held, self._held = self._held, b""
        if held:
            self._feed(memoryview(held))
        self._resume_reading()

    def pdv_end(self) -> None:
        if not self._pdv_last:
            return
        if self._inflating and not self._pdv_is_command:
            self._end_after_inflating = True  # finished by _inflate_step once inflated
            return
        if self._pdv_is_command:
            raw, self._command = self._command, bytearray()
            self._on_command(raw, self._command_context)
        else:
            command, incoming, context_id = self._store
            self._store = None
            self._on_dataset_complete(command, incoming, context_id)

    # -- DIMSE ----------------------------------------------------------------------
    def _on_command(self, raw: bytearray, context_id: int) -> None:
        try:
            command = dimse.parse_command(raw)
        except dimse.CommandError as exc:
            raise PduError(f"bad command set: {exc}") from None
        field = command[dimse.COMMAND_FIELD]
        has_dataset = command.get(dimse.DATASET_TYPE, dimse.NO_DATASET) != dimse.NO_DATASET
        abstract, ts = self.contexts[context_id]
        if field == dimse.C_ECHO_RQ and not has_dataset:
            rsp = dimse.c_echo_rsp(str(command.get(dimse.AFFECTED_SOP_CLASS, abstract)),
                                   int(command.get(dimse.MESSAGE_ID, 0)))
            self.transport.write(dul_pdu.p_data_command(context_id, rsp, self.peer_max_pdu))
        elif field == dimse.C_STORE_RQ and has_dataset:
            sop_class = str(command.get(dimse.AFFECTED_SOP_CLASS, ""))
            sop_instance = str(command.get(dimse.AFFECTED_SOP_INSTANCE, ""))
            if not (sop_class + sop_instance).isascii():  # undecodable bytes: no file meta can carry them
                log.warning("association from %s (%s): C-STORE-RQ with a non-ASCII SOP Class/Instance UID: "
                            "refused 0xC000", self.calling_ae, self.address)
                self.server.ingest.metrics.store_failures.labels("unreadable").inc()
                incoming = RefusedInstance(dimse.CANNOT_UNDERSTAND)
            elif sop_class != abstract.rstrip("\0 ").lstrip(" "):  # compared as parse_command trims
                # PS3.7 9.1.1.1: the class is the context's abstract syntax; else the negotiation
                # (non-storage classes refused, each class its own transfer syntax) is bypassed
                log.warning("association from %s (%s): C-STORE of a SOP class its presentation context %d "
                            "was not negotiated for: refused 0x0122", self.calling_ae, self.address, context_id)
                self.server.ingest.metrics.store_failures.labels("sop_class_not_negotiated").inc()
                incoming = RefusedInstance(dimse.SOP_CLASS_NOT_SUPPORTED)
            else:
                incoming = self.server.ingest.receive_instance(self.route, self.calling_ae, sop_class,
                                                               sop_instance, ts)
            self._store = (command, incoming, context_id)
        else:
            raise PduError(f"unsupported DIMSE command 0x{field:04X}", dul_pdu.ABORT_UNEXPECTED_PDU)

    def _on_dataset_complete(self, command: dict, incoming: "IncomingInstance", context_id: int) -> None:
        outcome = incoming.finish()
        if isinstance(outcome, int):
            self._respond(command, context_id, outcome)
            return
        self._committing += 1
        if self._committing > 1 and not self._paused:
            # A peer that does not wait for our answers (we negotiate no asynchronous operations):
            # stop reading until its instances are committed, so it cannot queue unbounded work.
            self._paused = True
            if not self._writes_blocked:  # else reading is paused already
                self.transport.pause_reading()
        server = self.server
        future = server.commit(self, incoming)
        # committed on the loop (quick journal): answered right away; from a pool thread: via the loop
        future.add_done_callback(lambda f: server.call_from_any_thread(self._committed, f, command, context_id))

    def _committed(self, future: "concurrent.futures.Future", command: dict, context_id: int) -> None:
        self._committing -= 1
        try:
            status = future.result()
        except Exception:
            log.exception("commit failed")
            status = dimse.PROCESSING_FAILURE
        self._respond(command, context_id, status)
        self.last_activity = time.monotonic()
        if not self._committing and self._release_pending:
            self._release()
        elif not self._committing and self._paused:
            self._paused = False
            self._resume_reading()

    def _respond(self, command: dict, context_id: int, status: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        rsp = dimse.c_store_rsp(str(command.get(dimse.AFFECTED_SOP_CLASS, "")),
                                str(command.get(dimse.AFFECTED_SOP_INSTANCE, "")),
                                int(command.get(dimse.MESSAGE_ID, 0)), status)
        self.transport.write(dul_pdu.p_data_command(context_id, rsp, self.peer_max_pdu))

    @property
    def busy(self) -> bool:
        """Inside a DIMSE message or committing one."""
        return self._committing > 0 or self._store is not None or bool(self._command)
