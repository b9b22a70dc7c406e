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
associations. The association itself is :mod:`.association` (our own blocking
socket loop, TLS when the destination asks for it).
"""
from __future__ import annotations

import io
import logging
import ssl
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import encode, split_dataset

from clara_adapter.export.association import AssociationError, StoreAssociation
from clara_dicom.models import ClaraDestinationSpec

log = logging.getLogger(__name__)

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
    association_permanent: bool = False  # e.g. TLS certificate not trusted: retrying cannot help
    transcoded: int = 0

    @property
    def attempted(self) -> int:
        return self.sent + len(self.failed)


class NotDicom(Exception):
    pass


_META = struct.Struct("<HH2s")
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_META_KEYWORDS = {0x0002: "MediaStorageSOPClassUID", 0x0003: "MediaStorageSOPInstanceUID", 0x0010: "TransferSyntaxUID"}


def read_header(uri: str, path: Path) -> DicomFile:
    """The file meta of a DICOM Part 10 file; NotDicom when the file is not one
    (no ``DICM`` prefix); other exceptions for a DICOM file we cannot use.

    The file meta group is always Explicit VR Little Endian (PS3.10 7.1): it is
    parsed here from the first 4 KiB (pydicom takes ~0.5 ms a file, ~0.15 s
    before the first byte of a 300-slice study goes out); anything unusual
    goes to pydicom."""
    with open(path, "rb") as fp:
        head = fp.read(4096)
    if len(head) < 132 or head[128:132] != b"DICM":
        raise NotDicom(uri)
    meta: dict[str, str] = {}
    pos = 132
    try:
        while pos + 8 <= len(head):
            group, elem, vr = _META.unpack_from(head, pos)
            if group != 0x0002:
                break
            if vr in _LONG_VRS:
                length = struct.unpack_from("<I", head, pos + 8)[0]
                pos += 12
            else:
                length = struct.unpack_from("<H", head, pos + 6)[0]
                pos += 8
            if pos + length > len(head):
                raise ValueError("file meta longer than expected")
            if elem in _META_KEYWORDS:
                meta[_META_KEYWORDS[elem]] = head[pos:pos + length].decode("ascii").strip(" \0")
            pos += length
        else:
            raise ValueError("file meta longer than expected")
    except (ValueError, struct.error, UnicodeDecodeError):
        return _read_header_pydicom(uri, path)
    missing = [kw for kw in _META_KEYWORDS.values() if not meta.get(kw)]
    if missing:
        return _read_header_pydicom(uri, path)
    return DicomFile(uri, path, UID(meta["MediaStorageSOPClassUID"]), UID(meta["MediaStorageSOPInstanceUID"]),
                     UID(meta["TransferSyntaxUID"]), pos)


def _read_header_pydicom(uri: str, path: Path) -> DicomFile:
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
        self._active: set[StoreAssociation] = set()
        self._lock = threading.Lock()
        self._closing = False

    # -- lifecycle ------------------------------------------------------------
    def abort_all(self) -> None:
        """Abort every association in progress (at shutdown, after the grace period)."""
        with self._lock:
            self._closing = True
            active = list(self._active)
        for assoc in active:
            assoc.abort()

    # -- sending --------------------------------------------------------------
    def send(self, dest: ClaraDestinationSpec, files: list[tuple[str, Path]],
             ssl_context: ssl.SSLContext | None = None) -> SendReport:
        """C-STORE ``files`` to ``dest``; over TLS with ``ssl_context`` (see :mod:`.tls`)."""
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
            if not self._send_batch(dest, batch, todo, report, ssl_context):
                break
        return report

    def _send_batch(self, dest: ClaraDestinationSpec, contexts: list[tuple[UID, UID]], files: list[DicomFile],
                    report: SendReport, ssl_context: ssl.SSLContext | None) -> bool:
        """Send ``files`` over one association; False when the association failed."""
        with self._lock:
            if self._closing:
                report.association_error = "the agent is stopping"
                return False
        try:
            assoc = StoreAssociation.connect(
                dest.host, dest.port, dest.aeTitle, self.calling_ae, contexts, ssl_context=ssl_context,
                server_name=dest.tls.serverName if dest.tls is not None else None,
                connection_timeout=self.connection_timeout, acse_timeout=self.acse_timeout,
                dimse_timeout=self.dimse_timeout, network_timeout=self.network_timeout, max_pdu=self.max_pdu)
        except AssociationError as exc:
            report.association_error = str(exc)
            report.association_permanent = exc.permanent
            return False
        with self._lock:
            self._active.add(assoc)
        try:
            accepted: dict[UID, set[UID]] = {}
            for sop, ts in assoc.accepted:
                accepted.setdefault(sop, set()).add(ts)
            for f in files:
                syntaxes = accepted.get(f.sop_class, set())
                try:
                    if f.transfer_syntax in syntaxes:
                        response = _store_file(assoc, assoc.accepted[(f.sop_class, f.transfer_syntax)], f)
                    elif syntaxes & set(UNCOMPRESSED):
                        response = _store_transcoded(assoc, f, syntaxes)
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
                except AssociationError as exc:
                    report.association_error = (f"{exc} (after {report.attempted} of {report.dicom_files} "
                                                f"files)")
                    return False
                except Exception as exc:  # noqa: BLE001 - encoding problems fail that file only
                    if not assoc.open:
                        report.association_error = (f"association with {dest.aeTitle} lost after "
                                                    f"{report.attempted} of {report.dicom_files} files")
                        return False
                    report.failed.append(FileFailure(f.uri, f"cannot send: {_first_line(exc)}"))
                    continue
                code = response.status
                if code == 0x0000 or code in WARNING_STATUSES:
                    report.sent += 1
                else:
                    transient = 0xA700 <= code <= 0xA7FF
                    why = f"C-STORE status 0x{code:04X}" + (f" ({response.error_comment})"
                                                           if response.error_comment else "")
                    report.failed.append(FileFailure(f.uri, why, transient))
            assoc.release()
            return True
        finally:
            with self._lock:
                self._active.discard(assoc)
            assoc.abort()


def _store_file(assoc: StoreAssociation, context_id: int, f: DicomFile) -> Any:
    """C-STORE ``f`` with its dataset bytes streamed from the file, as stored."""
    with open(f.path, "rb") as fh:  # before anything is sent: a vanished file fails alone
        size = fh.seek(0, 2) - f.offset
        fh.seek(f.offset)
        return assoc.store(context_id, f.sop_class, f.sop_instance, fh, size)


def _store_transcoded(assoc: StoreAssociation, f: DicomFile, syntaxes: set[UID]) -> Any:
    """C-STORE ``f`` decoded (and decompressed) and re-encoded in an accepted uncompressed syntax."""
    ds = load_uncompressed(f.path)
    ts = ds.file_meta.TransferSyntaxUID
    if ts not in syntaxes:
        ts = next(t for t in UNCOMPRESSED if t in syntaxes)
    data = encode(ds, ts.is_implicit_VR, True)
    if data is None:
        raise TranscodeError(f"cannot encode the dataset as {ts.name}")
    return assoc.store(assoc.accepted[(f.sop_class, ts)], f.sop_class, f.sop_instance, io.BytesIO(data), len(data))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
