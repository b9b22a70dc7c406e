"""C-STORE a task's files to one destination over one association (pynetdicom).

Presentation contexts come from the files themselves: one context per
(SOP class, stored transfer syntax), plus Explicit and Implicit VR Little Endian
for every SOP class as fallbacks, each context with a single transfer syntax so
we know exactly what the destination accepted. Then, per file:

* stored transfer syntax accepted -> the dataset bytes are streamed from the file
  as stored, never decoded (pynetdicom's chunked send);
* otherwise, an uncompressed context accepted -> the file is decoded with pydicom,
  decompressed if needed (a missing codec fails that file with the reason), and
  re-encoded;
* otherwise the file fails: the destination takes neither its SOP class nor an
  uncompressed form of it.

More than 128 contexts (a great many SOP classes) are split over consecutive
associations. TCP_NODELAY is set on the socket.
"""
from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.dsutils import split_dataset

from clara_dicom.models import ClaraDestinationSpec

log = logging.getLogger(__name__)

# send_c_store(path) streams the dataset bytes from the file instead of decoding it.
_config.STORE_SEND_CHUNKED_DATASET = True

MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
# C-STORE statuses: success and warnings (PS3.4 B.2.3 / PS3.7 C) count as sent.
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class DicomFile:
    uri: str
    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID
    offset: int = 0  # where the dataset starts in the file


@dataclass
class FileFailure:
    uri: str
    reason: str
    transient: bool = False


@dataclass
class SendReport:
    """What happened to a task's files. ``association_error`` is set when the
    destination could not be reached or the association was lost: the files not
    attempted are then neither sent nor failed."""

    sent: int = 0
    failed: list[FileFailure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    dicom_files: int = 0
    association_error: str | None = None
    transcoded: int = 0

    @property
    def attempted(self) -> int:
        return self.sent + len(self.failed)


class NotDicom(Exception):
    pass


def read_header(uri: str, path: Path) -> DicomFile:
    """The file meta of a DICOM Part 10 file; NotDicom when the file is not one
    (no ``DICM`` prefix); other exceptions for a DICOM file we cannot use."""
    with open(path, "rb") as fp:
        head = fp.read(132)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise NotDicom(uri)
    meta, offset = split_dataset(path)
    missing = [kw for kw in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
               if not str(meta.get(kw, "") or "").strip()]
    if missing:
        raise ValueError(f"file meta lacks {', '.join(missing)}")
    return DicomFile(uri, path, UID(str(meta.MediaStorageSOPClassUID).strip()),
                     UID(str(meta.MediaStorageSOPInstanceUID).strip()), UID(str(meta.TransferSyntaxUID).strip()),
                     offset)


def plan_contexts(files: Iterable[DicomFile]) -> list[list[tuple[UID, UID]]]:
    """Batches of (SOP class, transfer syntax) contexts, each batch ≤ 128 contexts.

    Per SOP class: its stored transfer syntaxes (most frequent first), then the
    uncompressed fallbacks it does not already have.
    """
    by_class: OrderedDict[UID, dict[UID, int]] = OrderedDict()
    for f in files:
        counts = by_class.setdefault(f.sop_class, {})
        counts[f.transfer_syntax] = counts.get(f.transfer_syntax, 0) + 1
    batches: list[list[tuple[UID, UID]]] = [[]]
    for sop_class, counts in by_class.items():
        stored = sorted(counts, key=lambda ts: -counts[ts])
        syntaxes = stored + [ts for ts in UNCOMPRESSED if ts not in counts]
        if len(syntaxes) > MAX_CONTEXTS:  # absurd, but stay within the protocol
            syntaxes = syntaxes[: MAX_CONTEXTS - 2] + list(UNCOMPRESSED)
        if len(batches[-1]) + len(syntaxes) > MAX_CONTEXTS:
            batches.append([])
        batches[-1].extend((sop_class, ts) for ts in syntaxes)
    return [b for b in batches if b]


def load_uncompressed(path: Path) -> Any:
    """The file decoded, pixel data decompressed when stored compressed; its
    file meta transfer syntax says how it is now encoded (for pynetdicom)."""
    ds = dcmread(path)
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # noqa: BLE001 - pydicom raises various types for missing codecs
            text = " ".join(line.strip() for line in str(exc).strip().splitlines()) or type(exc).__name__
            raise TranscodeError(f"destination does not accept {ts.name} and it cannot be decompressed "
                                 f"here: {text}") from None
    elif ts.is_deflated:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = ds.file_meta.TransferSyntaxUID.is_implicit_VR, ds.file_meta.TransferSyntaxUID.is_little_endian
    if not little:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    return ds


class TranscodeError(Exception):
    pass


class StoreSCU:
    """Sends files to destinations; one instance shared by the agent's workers."""

    def __init__(self, calling_ae: str, *, acse_timeout: float = 30, dimse_timeout: float = 60,
                 network_timeout: float = 60, connection_timeout: float = 10, max_pdu: int = 0):
        self.calling_ae = calling_ae
        self.acse_timeout = acse_timeout
        self.dimse_timeout = dimse_timeout
        self.network_timeout = network_timeout
        self.connection_timeout = connection_timeout
        self.max_pdu = max_pdu
        self._active: set[Any] = set()
        self._lock = threading.Lock()
        self._closing = False

    # -- lifecycle ------------------------------------------------------------
    def abort_all(self) -> None:
        """Abort every association in progress (at shutdown, after the grace period)."""
        with self._lock:
            self._closing = True
            active = list(self._active)
        for assoc in active:
            try:
                assoc.abort()
            except Exception:  # noqa: BLE001
                pass

    def _ae(self, contexts: list[tuple[UID, UID]]) -> AE:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = self.acse_timeout
        ae.dimse_timeout = self.dimse_timeout
        ae.network_timeout = self.network_timeout
        ae.connection_timeout = self.connection_timeout
        ae.maximum_pdu_size = self.max_pdu
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in contexts]
        return ae

    @staticmethod
    def _on_open(event: Any) -> None:
        try:
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass

    # -- sending --------------------------------------------------------------
    def send(self, dest: ClaraDestinationSpec, files: list[tuple[str, Path]]) -> SendReport:
        report = SendReport()
        dicom: list[DicomFile] = []
        for uri, path in files:
            try:
                dicom.append(read_header(uri, path))
            except NotDicom:
                report.skipped.append(uri)
            except FileNotFoundError:
                report.failed.append(FileFailure(uri, "file not found"))
            except IsADirectoryError:
                report.skipped.append(uri)
            except OSError as exc:
                report.failed.append(FileFailure(uri, f"cannot read: {exc.strerror or exc}"))
            except Exception as exc:  # noqa: BLE001 - a broken DICOM file fails alone
                report.failed.append(FileFailure(uri, f"unreadable DICOM file: {_first_line(exc)}"))
        report.dicom_files = len(dicom) + len(report.failed)
        if not dicom:
            return report
        for batch in plan_contexts(dicom):
            wanted = {sop for sop, _ in batch}
            todo = [f for f in dicom if f.sop_class in wanted]
            if not self._send_batch(dest, batch, todo, report):
                break
        return report

    def _send_batch(self, dest: ClaraDestinationSpec, contexts: list[tuple[UID, UID]], files: list[DicomFile],
                    report: SendReport) -> bool:
        """Send ``files`` over one association; False when the association failed."""
        ae = self._ae(contexts)
        with self._lock:
            if self._closing:
                report.association_error = "the agent is stopping"
                return False
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.aeTitle,
                                 evt_handlers=[(evt.EVT_CONN_OPEN, self._on_open)])
        except Exception as exc:  # noqa: BLE001 - e.g. name resolution inside pynetdicom
            report.association_error = f"cannot associate with {dest.aeTitle}@{dest.host}:{dest.port}: " \
                                       f"{_first_line(exc)}"
            return False
        if not assoc.is_established:
            if assoc.is_rejected:
                why = "association rejected"
            elif assoc.is_aborted:
                why = "association aborted during negotiation"
            else:
                why = "destination unreachable"
            report.association_error = f"{why} ({dest.aeTitle}@{dest.host}:{dest.port})"
            return False
        _guard_responses(assoc)
        with self._lock:
            self._active.add(assoc)
        try:
            accepted: dict[UID, set[UID]] = {}
            contexts_by_key: dict[tuple[UID, UID], int] = {}
            for cx in assoc.accepted_contexts:
                if not cx.as_scu:
                    continue
                sop, ts = UID(cx.abstract_syntax), UID(cx.transfer_syntax[0])
                accepted.setdefault(sop, set()).add(ts)
                contexts_by_key.setdefault((sop, ts), int(cx.context_id))
            msg_id = 0
            for f in files:
                if not assoc.is_established:
                    report.association_error = (f"association with {dest.aeTitle} lost after "
                                                f"{report.attempted} of {report.dicom_files} files")
                    return False
                msg_id = msg_id % 65535 + 1
                syntaxes = accepted.get(f.sop_class, set())
                try:
                    if f.transfer_syntax in syntaxes:
                        status = _store_raw(assoc, contexts_by_key[(f.sop_class, f.transfer_syntax)], msg_id, f)
                    elif syntaxes & set(UNCOMPRESSED):
                        ds = load_uncompressed(f.path)
                        status = assoc.send_c_store(ds, msg_id=msg_id)
                        report.transcoded += 1
                    else:
                        report.failed.append(FileFailure(
                            f.uri, f"destination accepts neither {f.transfer_syntax.name} nor an uncompressed "
                                   f"transfer syntax for {f.sop_class.name}"))
                        continue
                except TranscodeError as exc:
                    report.failed.append(FileFailure(f.uri, str(exc)))
                    continue
                except FileNotFoundError:
                    report.failed.append(FileFailure(f.uri, "file vanished"))
                    continue
                except ConnectionLost:
                    break
                except Exception as exc:  # noqa: BLE001 - encoding problems fail that file only
                    if not assoc.is_established:
                        break
                    report.failed.append(FileFailure(f.uri, f"cannot send: {_first_line(exc)}"))
                    continue
                code = getattr(status, "Status", None)
                if code is None:  # no answer: timeout, abort, connection lost
                    break
                if code == 0x0000 or code in WARNING_STATUSES:
                    report.sent += 1
                else:
                    transient = 0xA700 <= code <= 0xA7FF
                    report.failed.append(FileFailure(f.uri, f"C-STORE status 0x{code:04X}", transient))
            else:
                assoc.release()
                return True
            report.association_error = (f"association with {dest.aeTitle} lost after {report.attempted} of "
                                        f"{report.dicom_files} files")
            if assoc.is_established:
                assoc.abort()
            return False
        finally:
            with self._lock:
                self._active.discard(assoc)
            if assoc.is_established:
                assoc.abort()


class ConnectionLost(Exception):
    pass


_PDV_HEADER = struct.Struct(">BBIIBB")  # P-DATA-TF type, reserved, PDU length; PDV length, context, control
RAW_CHUNK = 1 << 20  # PDV size when the peer sets no limit


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def c_store_rq(msg_id: int, sop_class: str, sop_instance: str, priority: int = 2) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1), Implicit VR Little Endian, with a dataset.

    Built directly: going through pydicom datasets costs ~1.5 ms per message, more
    than everything else the sender does per instance."""
    body = b"".join((
        _element(0x0002, _uid(sop_class)),                      # Affected SOP Class UID
        _element(0x0100, struct.pack("<H", 0x0001)),            # Command Field: C-STORE-RQ
        _element(0x0110, struct.pack("<H", msg_id)),            # Message ID
        _element(0x0700, struct.pack("<H", priority)),          # Priority
        _element(0x0800, struct.pack("<H", 0x0001)),            # Command Data Set Type: present
        _element(0x1000, _uid(sop_instance)),                   # Affected SOP Instance UID
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _store_raw(assoc: Any, context_id: int, msg_id: int, f: DicomFile) -> Any:
    """C-STORE ``f`` with its dataset bytes streamed from the file, as stored.

    Like pynetdicom's chunked ``send_c_store``, but the P-DATA-TF PDUs are written to
    the socket by this thread instead of being queued one by one through the DUL
    reactor thread (which costs more CPU per PDU than the rest of the export; peers
    like Orthanc take 16 KiB PDUs, 33 per CT slice). The DUL thread keeps reading:
    responses, A-ABORT and A-RELEASE still go through pynetdicom. Returns the
    response primitive's status Dataset-like object (``.Status``) or None when no
    response came (timeout, abort).
    """
    command = c_store_rq(msg_id, f.sop_class, f.sop_instance)
    offset = f.offset
    max_pdu = int(assoc.acceptor.maximum_length or 0)
    chunk = max_pdu - 6 if max_pdu > 6 else RAW_CHUNK
    sock = assoc.dul.socket.socket
    if sock is None:
        raise ConnectionLost()

    def pdv(data: bytes | memoryview, control: int) -> None:
        n = len(data)
        header = _PDV_HEADER.pack(0x04, 0, n + 6, n + 2, context_id, control)
        sent = sock.sendmsg([header, data])  # one system call per PDU
        if sent < len(header) + n:
            rest = (header + bytes(data))[sent:]
            sock.sendall(rest)

    fh = open(f.path, "rb")  # before anything is sent: a vanished file fails alone
    try:
        remaining = fh.seek(0, 2) - offset
        fh.seek(offset)
        for start in range(0, len(command), chunk):
            last = start + chunk >= len(command)
            pdv(command[start:start + chunk], 0x03 if last else 0x01)
        view = memoryview(bytearray(chunk))
        while True:
            want = min(chunk, remaining)
            got = fh.readinto(view[:want]) if want else 0
            if got != want:
                raise OSError(f"{f.uri} changed while being sent")
            remaining -= got
            pdv(view[:got], 0x00 if remaining else 0x02)
            if not remaining:
                break
    except OSError as exc:
        if isinstance(exc, (ConnectionError, BrokenPipeError, TimeoutError)) or not assoc.is_established:
            raise ConnectionLost() from exc
        assoc.abort()  # half a message on the wire: the association cannot continue
        raise ConnectionLost() from exc
    finally:
        fh.close()
    _, rsp = assoc.dimse.get_msg(block=True)
    if rsp is None or getattr(rsp, "MessageIDBeingRespondedTo", msg_id) != msg_id:
        return None
    return rsp


def _guard_responses(assoc: Any) -> None:
    """Keep pynetdicom's association reactor off our C-STORE responses.

    The reactor polls ``dimse.get_msg(block=False)`` for requests to serve; its pause
    handshake with ``send_c_store`` can race (the reactor thread preempted between
    passing its checkpoint and clearing its "paused" flag), and it then swallows the
    C-STORE response: "Received unexpected C-STORE service message", and the sender
    waits for the DIMSE timeout. A pure SCU serves no requests, so the reactor gets
    nothing; ``send_c_store`` reads responses with ``block=True``.
    """
    original = assoc.dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return original(block=True) if block else (None, None)

    assoc.dimse.get_msg = get_msg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
