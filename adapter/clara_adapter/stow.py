"""STOW-RS (DICOM PS3.18 §10.5) into an AE title: each instance of a
``multipart/related; type="application/dicom"`` request takes the C-STORE path
of that AE title (route, source checks, storing, journal, grouping, duplicates).

The body is parsed as a stream (python-multipart's push parser; chunked bodies
decoded by :class:`ChunkedReader`): each part is fed, as it arrives, to the same
receive path as a C-STORE dataset (`Ingest.receive_instance`: a Part 10 file with
our file meta group, source AE ``DICOMWEB``, written while its dataset is walked
structurally), with the UIDs and transfer syntax from the part's own file meta
group; nothing is held in memory. Only once the whole multipart body has been read
and found well-formed are the instances committed (`Ingest.commit_instance`), one
by one, each journaled before the answer is sent; a malformed body stores nothing.

Answers (PS3.18 JSON, ``application/dicom+json``): 200 all stored, 202 some
failed (FailedSOPSequence), 409 none stored, 400 malformed multipart, 401 no
bearer token, 403 wrong token or refused source, 404 unknown AE title or STOW
off, 411 no length and not chunked, 413 a size limit crossed, 415 wrong content
type, 503 storage full.
"""
from __future__ import annotations

import hmac
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from email.message import Message
from typing import Any, BinaryIO, Callable

from clara_dicom.logs import fields, log_context

from clara_adapter.dimse import CANNOT_UNDERSTAND, SUCCESS
from clara_adapter.ingest import REJECT_BUSY, REJECT_CALLED_AE, Ingest, Route
from clara_adapter.journal import InstanceRecord

log = logging.getLogger(__name__)

CALLING_AE = "DICOMWEB"
READ_SIZE = 256 * 1024
MAX_PARTS = 100_000
MAX_META_BYTES = 64 * 1024  # a file meta group larger than this is not one we accept

# PS3.18 response attributes
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_CLASS = "00081150"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


class StowError(Exception):
    """A request-level answer (no per-instance results)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class StowAnswer:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- body streams
class ChunkedReader:
    """Decodes a ``Transfer-Encoding: chunked`` body (RFC 9112 §7.1) from a stream."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.left = 0
        self.done = False

    def _line(self) -> bytes:
        line = self.stream.readline(4098)
        if not line.endswith(b"\n"):
            raise StowError(400, "chunked body ends early or has an over-long chunk header")
        return line.rstrip(b"\r\n")

    def read(self, n: int) -> bytes:
        if self.done:
            return b""
        if self.left == 0:
            size_text = self._line().split(b";", 1)[0].strip()
            try:
                self.left = int(size_text, 16)
            except ValueError:
                raise StowError(400, "chunked body has an invalid chunk size") from None
            if self.left == 0:
                while self._line():  # trailer fields, up to the empty line
                    pass
                self.done = True
                return b""
        data = self.stream.read(min(n, self.left))
        if not data:
            raise StowError(400, "chunked body ends inside a chunk")
        self.left -= len(data)
        if self.left == 0 and self.stream.read(2) != b"\r\n":
            raise StowError(400, "chunk not followed by CRLF")
        return data


class LengthReader:
    """Exactly ``length`` bytes of a stream; ending early is an error."""

    def __init__(self, stream: BinaryIO, length: int):
        self.stream = stream
        self.left = length

    def read(self, n: int) -> bytes:
        if self.left <= 0:
            return b""
        data = self.stream.read(min(n, self.left))
        if not data:
            raise StowError(400, f"body ends {self.left} bytes before its Content-Length")
        self.left -= len(data)
        return data


# --------------------------------------------------------------------------- parts
def parse_file_meta(buf: bytes | bytearray) -> tuple[dict[int, str], int] | None:
    """(file meta elements by element number, offset of the dataset) of a Part 10
    file's first bytes; None while more bytes are needed. Raises ValueError when
    the bytes are not a Part 10 file."""
    if len(buf) < 132:
        return None
    if buf[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file (no DICM prefix)")
    pos, meta = 132, {}
    while True:
        if len(buf) < pos + 8:
            return None
        group, elem = struct.unpack_from("<HH", buf, pos)
        if group != 0x0002:
            return meta, pos
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR"):
            if len(buf) < pos + 12:
                return None
            (length,), head = struct.unpack_from("<I", buf, pos + 8), 12
        else:
            (length,), head = struct.unpack_from("<H", buf, pos + 6), 8
        if length == 0xFFFFFFFF or pos + head + length > MAX_META_BYTES:
            raise ValueError("file meta group is malformed")
        if len(buf) < pos + head + length:
            return None
        meta[elem] = bytes(buf[pos + head:pos + head + length]).rstrip(b"\0 ").decode("ascii", "replace")
        pos += head + length


@dataclass
class ReceivedPart:
    """One multipart part. Once complete it is either a checked instance whose file
    is renamed into place but not yet journaled (``record``; a crash before the
    commit leaves that file to the start-up sweep), or its outcome is already
    known (``status``: dropped by the AE title's SOP class rules, or a failure),
    or it was not a DICOM part at all (``error``)."""

    index: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    record: InstanceRecord | None = None
    status: int | None = None
    error: str | None = None

    def discard(self) -> None:
        if self.record is not None:
            try:
                os.unlink(self.record.path)
            except FileNotFoundError:
                pass
            self.record = None


class PartWriter:
    """Streams one part through the C-STORE receive path (`Ingest.receive_instance`:
    storing, structural walk, SOP UID check): reads the client's file meta group
    from the first bytes for the UIDs and transfer syntax a C-STORE command would
    carry, then feeds the dataset bytes as they come."""

    def __init__(self, part: ReceivedPart, ingest: Ingest, route: Route):
        self.part = part
        self.ingest = ingest
        self.route = route
        self.head: bytearray | None = bytearray()
        self.incoming: Any = None  # incoming.IncomingInstance
        self.received = 0  # bytes of the part so far (also of a failed one: limits still apply)

    def feed(self, data: memoryview) -> None:
        self.received += len(data)
        if self.part.error:
            return
        if self.incoming is not None:
            self.incoming.feed(data)  # never raises; remembers a failure
            return
        self.head += data  # type: ignore[operator]
        try:
            parsed = parse_file_meta(self.head)  # type: ignore[arg-type]
        except ValueError as exc:
            self._fail(str(exc))
            return
        if parsed is None:
            if len(self.head) > MAX_META_BYTES + 132:  # type: ignore[arg-type]
                self._fail("file meta group too long")
            return
        meta, offset = parsed
        part = self.part
        part.sop_class_uid, part.sop_instance_uid = meta.get(0x0002, ""), meta.get(0x0003, "")
        transfer_syntax = meta.get(0x0010, "")
        if not (part.sop_class_uid and part.sop_instance_uid and transfer_syntax):
            self._fail("file meta group lacks the SOP class, SOP instance or transfer syntax UID")
            return
        head, self.head = memoryview(self.head)[offset:], None  # type: ignore[index]
        self.incoming = self.ingest.receive_instance(self.route, CALLING_AE, part.sop_class_uid,
                                                     part.sop_instance_uid, transfer_syntax)
        self.incoming.feed(head)

    def _fail(self, why: str) -> None:
        self.part.error = why
        self.head = None
        self.close()

    def finish(self) -> None:
        part = self.part
        if part.error:
            return
        if self.incoming is None:
            self._fail("part ends inside its file meta group" if self.head else "empty part")
            return
        outcome = self.incoming.finish()
        if not isinstance(outcome, int):
            outcome = self.incoming.finalize()  # renamed into place (fsync'ed if configured), fd closed
        if isinstance(outcome, int):
            part.status = outcome
        else:
            part.record = outcome
        self.incoming = None

    def close(self) -> None:
        if self.incoming is not None:
            self.incoming.discard()
            self.incoming = None


def _content_type(value: str) -> tuple[str, dict[str, str]]:
    msg = Message()
    msg["content-type"] = value
    params = {k.lower(): v for k, v in msg.get_params(failobj=[])[1:]}
    return msg.get_content_type(), params


class MultipartStream:
    """Parses a ``multipart/related`` body from a reader into :class:`ReceivedPart` files."""

    def __init__(self, boundary: str, ingest: Ingest, route: Route, max_part_bytes: int, max_body_bytes: int):
        from python_multipart.multipart import MultipartParser

        self.ingest = ingest
        self.route = route
        self.max_part_bytes = max_part_bytes
        self.max_body_bytes = max_body_bytes
        self.parts: list[ReceivedPart] = []
        self.writer: PartWriter | None = None
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self.parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end,
        }, max_header_count=16, max_header_size=8192)

    def read_from(self, reader: Any) -> None:
        from python_multipart.exceptions import MultipartParseError

        total = 0
        while True:
            data = reader.read(READ_SIZE)
            if not data:
                break
            total += len(data)
            if total > self.max_body_bytes:
                raise StowError(413, f"request body larger than {self.max_body_bytes} bytes")
            if self.ended:
                continue  # epilogue
            try:
                self.parser.write(data)
            except MultipartParseError as exc:
                raise StowError(400, f"malformed multipart body: {exc}") from None
        if not self.ended:
            raise StowError(400, "multipart body ends before its closing boundary")
        if not self.parts:
            raise StowError(400, "multipart body holds no parts")

    def discard(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for part in self.parts:
            part.discard()

    # -- python-multipart callbacks ---------------------------------------------
    def _part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise StowError(413, f"more than {MAX_PARTS} parts in one request")
        self._headers = {}
        self._field.clear()
        self._value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        part = ReceivedPart(index=len(self.parts))
        self.parts.append(part)
        ctype, _ = _content_type(self._headers.get("content-type", "application/dicom"))
        if ctype != "application/dicom":
            part.error = f"part content type {ctype} is not application/dicom"
        self.writer = PartWriter(part, self.ingest, self.route)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        writer = self.writer
        if writer is None:
            return
        writer.feed(memoryview(data)[start:end])
        if writer.received > self.max_part_bytes:
            raise StowError(413, f"an instance is larger than {self.max_part_bytes} bytes")

    def _part_end(self) -> None:
        if self.writer is not None:
            self.writer.finish()
            self.writer = None

    def _end(self) -> None:
        self._part_end()
        self.ended = True


# --------------------------------------------------------------------------- the service
def _uid(value: str) -> dict[str, Any]:
    return {"vr": "UI", "Value": [value]} if value else {"vr": "UI"}


class StowService:
    """Answers STOW-RS requests for the AE titles of one adapter."""

    def __init__(self, ingest: Ingest, token: str | None, metrics: Any = None,
                 max_instance_bytes: int = 2 * 1024**3, max_request_bytes: int = 64 * 1024**3):
        self.ingest = ingest
        self.token = token
        self.metrics = metrics
        self.max_instance_bytes = max_instance_bytes
        self.max_request_bytes = max_request_bytes
        self._idle = threading.Condition()
        self._active = 0
        self.accepting = True

    def stop_accepting(self) -> None:
        with self._idle:
            self.accepting = False

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the requests in progress (their instances are being journaled)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout)

    def _count(self, status: int) -> None:
        if self.metrics is not None and hasattr(self.metrics, "stow_requests"):
            self.metrics.stow_requests.labels(str(status)).inc()

    def handle(self, ae_title: str, study_uid: str | None, headers: Any, body: Callable[[], Any],
               client: str) -> StowAnswer:
        """Answer one request. ``body()`` returns a reader of the request body (only
        called once the request passed the checks that need no body)."""
        with log_context(aeTitle=ae_title):
            try:
                with self._idle:
                    if not self.accepting:
                        raise StowError(503, "the adapter is stopping", {"Retry-After": "10"})
                    self._active += 1
                try:
                    answer = self._handle(ae_title, study_uid, headers, body, client)
                finally:
                    with self._idle:
                        self._active -= 1
                        self._idle.notify_all()
            except StowError as exc:
                level = logging.INFO if exc.status < 500 else logging.WARNING
                log.log(level, "STOW-RS from %s to %s: %d %s", client, ae_title, exc.status, exc.message)
                answer = StowAnswer(exc.status, {"message": exc.message}, exc.headers)
            self._count(answer.status)
            return answer

    def check_token(self, authorization: str | None) -> None:
        if not self.token:
            raise StowError(404, "STOW-RS is off (no stowToken set)")
        scheme, _, credentials = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise StowError(401, "a bearer token is required", {"WWW-Authenticate": 'Bearer realm="clara-dicom"'})
        if not hmac.compare_digest(credentials.strip().encode(), self.token.encode()):
            raise StowError(403, "the bearer token is not valid")

    def _handle(self, ae_title: str, study_uid: str | None, headers: Any, body: Callable[[], Any],
                client: str) -> StowAnswer:
        self.check_token(headers.get("Authorization"))
        verdict = self.ingest.check_association(ae_title, CALLING_AE, client)
        if verdict is not None:
            rsd, why = verdict
            if rsd == REJECT_CALLED_AE:
                raise StowError(404, f"AE title {ae_title!r} is not served")
            if rsd == REJECT_BUSY:
                raise StowError(503, why, {"Retry-After": "60"})
            raise StowError(403, why)
        route = self.ingest.routes.get(ae_title)
        if route is None:  # removed between the check and now
            raise StowError(404, f"AE title {ae_title!r} is not served")
        ctype, params = _content_type(headers.get("Content-Type", ""))
        if ctype != "multipart/related":
            raise StowError(415, f"content type {ctype} is not multipart/related; type=\"application/dicom\"")
        part_type = params.get("type", "application/dicom").lower()
        if part_type != "application/dicom":
            raise StowError(415, f"multipart/related of {part_type} is not supported (only application/dicom)")
        boundary = params.get("boundary")
        if not boundary:
            raise StowError(400, "multipart/related without a boundary")
        stream = MultipartStream(boundary, self.ingest, route, self.max_instance_bytes, self.max_request_bytes)
        try:
            stream.read_from(body())
        except BaseException:
            stream.discard()
            raise
        return self._commit(route, stream.parts, study_uid, client)

    def _commit(self, route: Route, parts: list[ReceivedPart], study_uid: str | None, client: str) -> StowAnswer:
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        for part in parts:
            try:
                status = self._store(route, part, study_uid)
            finally:
                part.discard()  # a no-op once renamed into place
            item = {REFERENCED_SOP_CLASS: _uid(part.sop_class_uid),
                    REFERENCED_SOP_INSTANCE: _uid(part.sop_instance_uid)}
            if status == SUCCESS:
                stored.append(item)
            else:
                item[FAILURE_REASON] = {"vr": "US", "Value": [status]}
                failed.append(item)
                log.info("STOW-RS part %d to %s failed (0x%04X)%s", part.index, route.ae_title, status,
                         f": {part.error}" if part.error else "")
        body: dict[str, Any] = {}
        if stored:
            body[REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": stored}
        if failed:
            body[FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": failed}
        status = 200 if not failed else (202 if stored else 409)
        log.info("STOW-RS from %s to %s: %d stored, %d failed", client, route.ae_title, len(stored), len(failed),
                 extra=fields("stow.request"))
        return StowAnswer(status, body)

    def _store(self, route: Route, part: ReceivedPart, study_uid: str | None) -> int:
        """Commit one received part as `Ingest` commits a C-STORE; returns its DIMSE status."""
        metrics = self.ingest.metrics
        if part.error:
            metrics.store_failures.labels("unreadable").inc()
            return CANNOT_UNDERSTAND
        if part.status is not None:  # dropped (SUCCESS) or failed on the way (counted and logged there)
            return part.status
        record = part.record
        if record is None:
            return CANNOT_UNDERSTAND
        if study_uid and record.study_uid != study_uid:
            part.error = "its Study Instance UID is not the one of the request's URL"
            metrics.store_failures.labels("study_mismatch").inc()
            return CANNOT_UNDERSTAND
        part.record = None  # commit_instance owns the file from here
        return self.ingest.commit_instance(route, record)


def parse_path(path: str) -> tuple[str, str | None] | None:
    """(AE title, study UID or None) of a STOW-RS path, else None."""
    parts = path.strip("/").split("/")
    if len(parts) in (4, 5) and parts[0] == "dicomweb" and parts[1] == "aetitles" and parts[3] == "studies":
        from urllib.parse import unquote

        return unquote(parts[2]), (unquote(parts[4]) if len(parts) == 5 else None)
    return None

