"""Writing received instances as DICOM Part 10 files, and the disk guard.

The dataset bytes are written exactly as received (no decode/re-encode): a
128-byte preamble, ``DICM``, a file meta group built from the negotiated
transfer syntax and the C-STORE UIDs, then the dataset. Files are written under
a temporary name and renamed, so a crash never leaves a half-written ``.dcm``.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

from pydicom.filereader import read_dataset

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1396.1"  # clara-dicom
IMPLEMENTATION_VERSION = "CLARA_DICOM_01"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
TMP_PREFIX = ".tmp-"


class DiskFull(Exception):
    """Storing would cross the disk guard (watermark or reserve)."""


def _element(tag_elem: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2sHI", 0x0002, tag_elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, tag_elem, vr, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def file_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble + DICM + explicit-VR-LE file meta group (PS3.10 §7.1)."""
    body = b"".join(
        (
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _ui(sop_class_uid)),
            _element(0x0003, b"UI", _ui(sop_instance_uid)),
            _element(0x0010, b"UI", _ui(transfer_syntax)),
            _element(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION)),
            _element(0x0016, b"AE", _text(source_ae.strip() or "UNKNOWN")),
        )
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\0" * 128 + b"DICM" + group_length + body


def read_tags(dataset: bytes | memoryview, transfer_syntax: str, tags: set[int]) -> dict[int, str]:
    """Values of a few top-level tags, reading no further than the largest one.

    Only the header is scanned (pixel data is never reached for the tags we
    group by), so this stays cheap on the C-STORE path.
    """
    if not tags:
        return {}
    data = bytes(dataset) if transfer_syntax != DEFLATED_LE else zlib.decompress(bytes(dataset), -zlib.MAX_WBITS)
    last = max(tags)
    fp = io.BytesIO(data)
    stopped = []

    def stop_when(tag: int, vr: object, length: object) -> bool:
        if tag > last:
            stopped.append(tag)
            return True
        return False

    ds = read_dataset(
        fp,
        is_implicit_VR=transfer_syntax == IMPLICIT_LE,
        is_little_endian=transfer_syntax != EXPLICIT_BE,
        stop_when=stop_when,
        specific_tags=sorted(tags),
    )
    # pydicom stops silently at a truncated element: the scan must end either
    # at a tag past the ones we need or exactly at the end of the data.
    if not stopped and fp.tell() != len(data):
        raise ValueError("dataset is truncated (an element is longer than the data)")
    for tag in tags:
        raw = ds.get_item(tag)
        if raw is not None and raw.length != 0xFFFFFFFF and raw.value is not None and len(raw.value) != raw.length:
            raise ValueError(f"element {tag:08X} is truncated")
    out: dict[int, str] = {}
    for tag in tags:
        if tag in ds:
            value = ds[tag].value
            if isinstance(value, bytes):
                value = value.decode("ascii", "replace")
            text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            out[tag] = text.strip(" \0")
    return out


@dataclass
class DiskGuard:
    """Clara's rule: refuse data when used ≥ watermark % or free < reserve."""

    path: Path
    watermark_percent: float = 85.0
    reserve_bytes: int = 5 * 1024**3

    def check(self, incoming: int = 0) -> str | None:
        """None when there is room for ``incoming`` more bytes, else why not."""
        st = os.statvfs(self.path)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        if total == 0:
            return None
        used_pct = 100.0 * (total - free + incoming) / total
        if used_pct >= self.watermark_percent:
            return f"disk {used_pct:.1f}% used (watermark {self.watermark_percent:g}%)"
        if free - incoming < self.reserve_bytes:
            return f"{(free - incoming) / 1024**3:.2f} GB free (reserve {self.reserve_bytes / 1024**3:g} GB)"
        return None


class InstanceStore:
    """Writes Part 10 files into the incoming folder."""

    def __init__(self, root: Path, guard: DiskGuard | None = None, fsync: bool = False):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.guard = guard
        self.fsync = fsync

    def write(self, header: bytes, dataset: memoryview) -> tuple[Path, int]:
        """Write header + dataset under a temporary name, then rename. Returns (path, size)."""
        size = len(header) + len(dataset)
        if self.guard is not None:
            problem = self.guard.check(size)
            if problem:
                raise DiskFull(problem)
        name = uuid.uuid4().hex
        tmp = self.root / f"{TMP_PREFIX}{name}"
        final = self.root / f"{name}.dcm"
        try:
            with open(tmp, "wb", buffering=0) as fh:
                fh.write(header)
                fh.write(dataset)
                if self.fsync:
                    os.fsync(fh.fileno())
            os.rename(tmp, final)
        except OSError as exc:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise DiskFull(os.strerror(exc.errno)) from exc
            raise
        return final, size

    def sync_directory(self) -> None:
        """fsync the incoming folder, so the renames into it survive a power loss
        (file contents are fsynced by ``write``; the commit path calls this once per batch)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sweep(self, keep: "set[Path] | set[str]") -> int:
        """Delete temporary files and files no journal record refers to
        (written but never acknowledged before a crash). Returns how many.

        Compared by file name (unique: a random hex per instance), never by the
        full path: the root may be spelled differently from run to run
        (relative, through a symlink) and a held file must never be taken for
        a stray one."""
        keep_names = {Path(p).name for p in keep}
        removed = 0
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and (entry.name.startswith(TMP_PREFIX)
                                                         or entry.name not in keep_names):
                os.unlink(entry.path)
                removed += 1
        return removed


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` at ``dst`` (same file system), else copy it."""
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError:
        tmp = dst.with_name(TMP_PREFIX + dst.name)
        shutil.copyfile(src, tmp)
        os.rename(tmp, dst)
