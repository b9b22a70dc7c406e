"""DICOM upper-layer PDUs (PS3.8 §9.3): incremental framing of what a peer
sends, and encoding of what the acceptor answers.

`PduStream` is fed the bytes of a connection as they arrive and calls its
handler per PDU; P-DATA-TF is never buffered whole: each PDV's value is handed
on in the pieces the network delivered (``pdv_data``), so memory per connection
is a few header bytes plus the body of a non-data PDU (bounded by
``MAX_CONTROL_PDU``). A declared length above the limit raises `PduError`
before anything is allocated for it.

A-ASSOCIATE-RQ is decoded with pynetdicom's PDU classes (well tested, and the
tests' SCU speaks the same); the few answers are packed here.
"""
from __future__ import annotations

import contextlib
import logging
import struct
import threading
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Protocol

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1396.1"  # clara-dicom
IMPLEMENTATION_VERSION = "CLARA_DICOM_02"

MAX_CONTROL_PDU = 256 * 1024  # A-ASSOCIATE-RQ and friends; real ones are a few KB
PDU_HEADER = struct.Struct(">BBI")
PDV_HEADER = struct.Struct(">IBB")
_ONE_PDV_PDU = struct.Struct(">BBIIBB")

# A-ABORT source/reason (PS3.8 §9.3.8)
ABORT_SOURCE_PROVIDER = 0x02
ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 0x01, 0x02, 0x06
ABORT_UNSPECIFIED = 0x00

# Presentation context results (PS3.8 §9.3.3.2)
PC_ACCEPTANCE, PC_NO_REASON, PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, PC_TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 2, 3, 4

# Waiting for the next PDU header / a PDV header / PDV value / a control PDU body
_HEADER, _PDV_HEADER, _PDV_VALUE, _BODY = 0, 1, 2, 3


class PduError(Exception):
    """The peer broke the PDU framing; answer with A-ABORT(reason)."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER):
        super().__init__(message)
        self.reason = reason


class PduHandler(Protocol):
    def control_pdu(self, pdu_type: int, body: bytes) -> None: ...
    def pdv_begin(self, context_id: int, is_command: bool, is_last: bool) -> None: ...
    def pdv_data(self, data: memoryview) -> None: ...
    def pdv_end(self) -> None: ...


class PduStream:
    """Incremental PDU parser of one connection."""

    def __init__(self, handler: PduHandler, max_pdata_length: int | None):
        self.handler = handler
        self.max_pdata_length = max_pdata_length  # None: no limit (the value is streamed anyway)
        self.stopped = False
        self._state = _HEADER
        self._partial = b""  # a PDU or PDV header split across reads
        self._pdu_left = 0
        self._pdv_left = 0
        self._type = 0
        self._body = bytearray()

    def feed(self, data: memoryview) -> int:
        """Parse ``data``; returns how many bytes were used (fewer than ``len(data)``
        only when the handler stopped the stream)."""
        pos, n = 0, len(data)
        handler = self.handler
        while pos < n and not self.stopped:
            state = self._state
            if state == _PDV_VALUE:
                take = self._pdv_left if self._pdv_left <= n - pos else n - pos
                handler.pdv_data(data[pos:pos + take])
                pos += take
                self._pdv_left -= take
                self._pdu_left -= take
                if not self._pdv_left:
                    handler.pdv_end()
                    self._state = _PDV_HEADER if self._pdu_left else _HEADER
            elif state == _PDV_HEADER:
                head, pos = self._gather(data, pos, n, 6)
                if head is None:
                    return n
                length, context_id, control = PDV_HEADER.unpack_from(head)
                if length < 2 or length + 4 > self._pdu_left:
                    raise PduError("PDV length does not fit its P-DATA-TF PDU")
                self._pdu_left -= 6
                self._pdv_left = length - 2
                handler.pdv_begin(context_id, bool(control & 1), bool(control & 2))
                if self._pdv_left:
                    self._state = _PDV_VALUE
                else:
                    handler.pdv_end()
                    self._state = _PDV_HEADER if self._pdu_left else _HEADER
            elif state == _HEADER:
                head, pos = self._gather(data, pos, n, 6)
                if head is None:
                    return n
                pdu_type, _, length = PDU_HEADER.unpack_from(head)
                if pdu_type == P_DATA_TF:
                    if self.max_pdata_length and length > self.max_pdata_length:
                        raise PduError(f"P-DATA-TF of {length} bytes exceeds our maximum {self.max_pdata_length}")
                    if length < 6:
                        raise PduError("empty P-DATA-TF")
                    self._pdu_left = length
                    self._state = _PDV_HEADER
                elif A_ASSOCIATE_RQ <= pdu_type <= A_ABORT:
                    if length > MAX_CONTROL_PDU:
                        raise PduError(f"PDU type {pdu_type} of {length} bytes is too long")
                    self._type, self._pdu_left = pdu_type, length
                    self._body = bytearray()
                    self._state = _BODY
                    if not length:
                        self._control_done()
                else:
                    raise PduError(f"unknown PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
            else:  # _BODY
                take = min(self._pdu_left, n - pos)
                self._body += data[pos:pos + take]
                pos += take
                self._pdu_left -= take
                if not self._pdu_left:
                    self._control_done()
        return pos

    def _control_done(self) -> None:
        self._state = _HEADER
        body, self._body = bytes(self._body), bytearray()
        self.handler.control_pdu(self._type, body)

    def _gather(self, data: memoryview, pos: int, n: int, size: int) -> tuple[bytes | memoryview | None, int]:
        """``size`` header bytes starting at ``pos`` (joined with a partial
        header from the previous read), or None after keeping what there is."""
        if self._partial:
            need = size - len(self._partial)
            self._partial += bytes(data[pos:pos + need])
            pos += min(need, n - pos)
            if len(self._partial) < size:
                return None, pos
            head, self._partial = self._partial, b""
            return head, pos
        if n - pos >= size:
            return data[pos:pos + size], pos + size
        self._partial = bytes(data[pos:n])
        return None, n


# -- decoding the A-ASSOCIATE-RQ ------------------------------------------------
@dataclass
class ProposedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRequest:
    protocol_version: int
    called_ae: str
    calling_ae: str
    called_raw: bytes  # the 16-byte fields, echoed in the A-ASSOCIATE-AC
    calling_raw: bytes
    application_context: str
    contexts: list[ProposedContext] = field(default_factory=list)
    max_pdu_length: int = 0  # the requestor's maximum receive length (0: unlimited)


class _QuietWhileDecoding(logging.Filter):
    """Drops what pynetdicom and pydicom log about a peer's A-ASSOCIATE-RQ while we decode
    it (an ERROR with a traceback per bad AE title, a warning per bad UID): a hostile peer
    must not write a dozen lines per connection. Our own one line says what happened."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(self.local, "on", False)

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        self.local.on = True
        try:
            yield
        finally:
            self.local.on = False


_QUIET = _QuietWhileDecoding()
for _name in ("pynetdicom.utils", "pynetdicom.pdu", "pynetdicom.pdu_items", "pydicom"):
    logging.getLogger(_name).addFilter(_QUIET)


def ignore_pydicom_value_warnings() -> None:
    """pydicom both logs and *warns* each invalid value it meets (a peer's bad UID): keep the
    log record (filtered above while decoding) as the one place. Called when the SCP starts."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.valuerep")


def decode_associate_rq(body: bytes) -> AssociateRequest:
    """Decode an A-ASSOCIATE-RQ body; PduError if it is malformed."""
    from pynetdicom.pdu import A_ASSOCIATE_RQ as _RQ

    if len(body) < 68:
        raise PduError("A-ASSOCIATE-RQ too short")
    pdu = _RQ()
    with _QUIET.decoding():
        try:
            pdu.decode(PDU_HEADER.pack(A_ASSOCIATE_RQ, 0, len(body)) + body)
            contexts = [ProposedContext(int(pc.context_id), str(pc.abstract_syntax or ""),
                                        [str(ts) for ts in pc.transfer_syntax])
                        for pc in pdu.presentation_context]
            if len({cx.context_id for cx in contexts}) < len(contexts):  # PS3.8 9.3.2.2: one id, one context
                raise PduError("A-ASSOCIATE-RQ proposes two presentation contexts with one id")
            info = pdu.user_information
            max_length = int(info.maximum_length or 0) if info is not None else 0
            return AssociateRequest(
                protocol_version=int(pdu.protocol_version), called_ae=str(pdu.called_ae_title).strip(),
                calling_ae=str(pdu.calling_ae_title).strip(), called_raw=body[4:20], calling_raw=body[20:36],
                application_context=str(pdu.application_context_name or ""), contexts=contexts,
                max_pdu_length=max_length)
        except PduError:
            raise
        except Exception as exc:  # pynetdicom raises ValueError, AssertionError, struct.error... on garbage
            raise PduError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})") from None


# -- encoding the answers ----------------------------------------------------------
def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(value: str) -> bytes:
    return value.encode("ascii")


def associate_ac(rq: AssociateRequest, results: list[tuple[int, int, str]], max_pdu_length: int) -> bytes:
    """A-ASSOCIATE-AC: ``results`` is [(context id, result, transfer syntax)]."""
    items = [_item(0x10, _uid(APPLICATION_CONTEXT))]
    for context_id, result, ts in results:
        items.append(_item(0x21, struct.pack(">BBBB", context_id, 0, result, 0) + _item(0x40, _uid(ts))))
    user = (_item(0x51, struct.pack(">I", max_pdu_length)) + _item(0x52, _uid(IMPLEMENTATION_CLASS_UID))
            + _item(0x55, IMPLEMENTATION_VERSION.encode("ascii")))
    items.append(_item(0x50, user))
    body = struct.pack(">HH", 1, 0) + rq.called_raw + rq.calling_raw + b"\0" * 32 + b"".join(items)
    return PDU_HEADER.pack(A_ASSOCIATE_AC, 0, len(body)) + body


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return PDU_HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes((0, result, source, reason))


def abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = ABORT_UNSPECIFIED) -> bytes:
    return PDU_HEADER.pack(A_ABORT, 0, 4) + bytes((0, 0, source, reason))


RELEASE_RP = PDU_HEADER.pack(A_RELEASE_RP, 0, 4) + b"\0\0\0\0"


def p_data_command(context_id: int, command: bytes, peer_max_pdu: int) -> bytes:
    """P-DATA-TF PDU(s) carrying a whole command set, fragmented to fit the
    peer's maximum PDU length."""
    limit = peer_max_pdu - 6 if peer_max_pdu and peer_max_pdu > 12 else len(command) + 6
    if len(command) <= limit:  # the usual case: one PDU, one PDV
        return _ONE_PDV_PDU.pack(P_DATA_TF, 0, len(command) + 6, len(command) + 2, context_id, 0x03) + command
    chunk = max(limit, 1)
    out = []
    for start in range(0, len(command), chunk):
        piece = command[start:start + chunk]
        last = start + chunk >= len(command)
        pdv = PDV_HEADER.pack(len(piece) + 2, context_id, 0x03 if last else 0x01) + piece
        out.append(PDU_HEADER.pack(P_DATA_TF, 0, len(pdv)) + pdv)
    return b"".join(out)
