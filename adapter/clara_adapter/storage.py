"""Writing received instances as DICOM Part 10 files, and the disk guard.

The dataset bytes are written exactly as received (no decode/re-encode): a
128-byte preamble, ``DICM``, a file meta group built from the negotiated
transfer syntax and the C-STORE UIDs, then the dataset. Files are written under
a temporary name and renamed, so a crash never leaves a half-written ``.dcm``.

Streaming (the C-STORE receive path, STOW-RS parts)::

    writer = store.open(file_header(...))   # disk guard checked; temp file created
    writer.write(chunk)                       # as the bytes arrive; DiskFull on ENOSPC
    path, size = writer.finalize()            # fsync (if set), rename into place
    # or writer.discard()                     # delete the temp file (failure, abort)
"""
from __future__ import annotations

import errno
import itertools
import os
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, ClassVar
from pathlib import Path

from clara_adapter.dataset_walk import walk

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1396.1"  # clara-dicom
IMPLEMENTATION_VERSION = "CLARA_DICOM_01"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_LE = "1.2.840.10008.1.2.1.99"
TMP_PREFIX = ".tmp-"
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # a new temporary file, never an existing one


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
    """Values of a few top-level tags of a dataset held in memory.

    The whole dataset is walked structurally (`dataset_walk`), so a truncated
    or garbled dataset raises `MalformedDataset` (a ValueError)."""
    return walk(dataset, transfer_syntax, tags)


@dataclass
class DiskGuard:
    """Clara's rule: refuse data when used ≥ watermark % or free < reserve.

    ``statvfs`` is asked at most every ``RECHECK_SECONDS`` while the disk was
    at least ``HEADROOM_BYTES`` away from both limits (more than can be
    written in that time), and on every check nearer to them, so the rule
    stays exact where it matters without a system call per instance."""

    path: Path
    watermark_percent: float = 85.0
    reserve_bytes: int = 5 * 1024**3
    clock: Callable[[], float] = time.monotonic
    RECHECK_SECONDS: ClassVar[float] = 1.0
    HEADROOM_BYTES: ClassVar[int] = 2 * 1024**3
    _asked: float = field(default=float("-inf"), init=False, repr=False)  # when statvfs last answered
    _headroom: int = field(default=0, init=False, repr=False)  # bytes it left before the nearer limit

    def check(self, incoming: int = 0) -> str | None:
        """None when there is room for ``incoming`` more bytes, else why not."""
        now = self.clock()
        if now - self._asked < self.RECHECK_SECONDS and self._headroom - incoming >= self.HEADROOM_BYTES:
            return None
        st = os.statvfs(self.path)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        if total == 0:
            return None
        self._asked = now
        self._headroom = int(min(free - self.reserve_bytes, free - total * (1 - self.watermark_percent / 100)))
        used_pct = 100.0 * (total - free + incoming) / total
        if used_pct >= self.watermark_percent:
            return f"disk {used_pct:.1f}% used (watermark {self.watermark_percent:g}%)"
        if free - incoming < self.reserve_bytes:
            return f"{(free - incoming) / 1024**3:.2f} GB free (reserve {self.reserve_bytes / 1024**3:g} GB)"
        return None


class InstanceStore:
    """Writes Part 10 files into the incoming folder."""

    def __init__(self, root: Path, guard: DiskGuard | None = None, fsync: bool = False, tmp_tag: str = ""):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.guard = guard
        self.fsync = fsync
        self.tmp_prefix = TMP_PREFIX + tmp_tag  # a receive worker's tag: its leftovers can be found by name

    def open(self, header: bytes, expected_size: int = 0) -> "InstanceWriter":
        """A new temporary file (``header`` goes out with its first write); raises
        DiskFull when the guard refuses (``expected_size``: bytes still to come, if known)."""
        if self.guard is not None:
            problem = self.guard.check(len(header) + expected_size)
            if problem:
                raise DiskFull(problem)
        # the header is written with the first dataset bytes (InstanceWriter)
        return InstanceWriter(self.root, self.fsync, self.tmp_prefix, header)

    def write(self, header: bytes, dataset: bytes | memoryview) -> tuple[Path, int]:
        """Write header + dataset under a temporary name, then rename. Returns (path, size)."""
        writer = self.open(header, len(dataset))
        try:
            writer.write(dataset)
            return writer.finalize()
        except BaseException:
            writer.discard()
            raise

    def sync_directory(self) -> None:
        """fsync the incoming folder, so the renames into it survive a power loss
        (file contents are fsynced by ``write``; the commit path calls this once per batch)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def sweep(self, keep: "set[Path] | set[str]", min_age: float = 0.0) -> int:
        """Delete temporary files and files no journal record refers to
        (written but never acknowledged before a crash). Returns how many.
        ``min_age``: spare files modified less than this many seconds ago (replicas
        sharing the folder are writing them, or committing them right now).

        Compared by file name (unique: a random hex per instance), never by the
        full path: the root may be spelled differently from run to run
        (relative, through a symlink) and a held file must never be taken for
        a stray one."""
        keep_names = {Path(p).name for p in keep}
        removed = 0
        newest = time.time() - min_age
        for entry in os.scandir(self.root):
            if entry.is_file(follow_symlinks=False) and (entry.name.startswith(TMP_PREFIX)
                                                         or entry.name not in keep_names):
                try:
                    if min_age and entry.stat(follow_symlinks=False).st_mtime > newest:
                        continue
                    os.unlink(entry.path)
                except FileNotFoundError:  # another replica committed-and-released or swept it
                    continue
                removed += 1
        return removed


def _draw_name_prefix() -> None:
    global _name_prefix, _name_counter
    _name_prefix, _name_counter = uuid.uuid4().hex[:24], itertools.count()


_draw_name_prefix()
os.register_at_fork(after_in_child=_draw_name_prefix)  # a forked process must not repeat its parent's names


def unique_name() -> str:
    """A file name never used before, on any replica sharing the folder: 24 hex
    digits drawn at random once per process and a counter. The same uniqueness
    as a uuid4 per file, without a getrandom system call per instance."""
    return f"{_name_prefix}{next(_name_counter):08x}"


class InstanceWriter:
    """One Part 10 file being written as its bytes arrive, under a temporary name.

    ``write`` appends (raises DiskFull on ENOSPC/EDQUOT, OSError otherwise);
    ``finalize`` closes, fsyncs if asked and renames to ``<unique name>.dcm``;
    ``discard`` closes and deletes the temporary file. Not thread-safe: one
    owner at a time (the receive loop writes, a worker thread may finalize).

    ``header`` (the preamble and file meta) goes out with the first dataset
    bytes in one ``writev``: one system call per small instance, not two."""

    __slots__ = ("_tmp", "final", "size", "_fd", "_fsync", "_header")

    def __init__(self, root: Path, fsync: bool = False, tmp_prefix: str = TMP_PREFIX,
                 header: bytes = b""):
        self._fsync = fsync
        name = unique_name()
        self._tmp = os.path.join(root, tmp_prefix + name)
        self._fd: int | None = os.open(self._tmp, _CREATE, 0o644)
        self.final = root / f"{name}.dcm"
        self._header = header
        self.size = len(header)

    @property
    def tmp(self) -> Path:
        return Path(self._tmp)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        fd = self._fd
        if fd is None:
            raise ValueError("writer is closed")
        total = len(data)
        try:
            if self._header:
                self._write_all(fd, self._header, data)
                self._header = b""
            else:
                done = os.write(fd, data)
                if done < total:  # regular files write fully unless the disk is full
                    self._write_all(fd, memoryview(data)[done:])
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(os.strerror(exc.errno)) from exc
            raise
        self.size += total

    @staticmethod
    def _write_all(fd: int, *pieces: bytes | bytearray | memoryview) -> None:
        views = [memoryview(p).cast("B") for p in pieces if len(p)]
        while views:
            done = os.writev(fd, views)
            while views and done >= len(views[0]):
                done -= len(views.pop(0))
            if views and done:
                views[0] = views[0][done:]

    def close(self) -> None:
        """fsync (if set) and close, leaving the file under its temporary name
        (a receive worker hands it over; the coordinator renames it)."""
        fd, self._fd = self._fd, None
        if fd is None:
            raise ValueError("writer is closed")
        try:
            if self._header:  # nothing followed it
                self._write_all(fd, self._header)
                self._header = b""
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self._unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(os.strerror(exc.errno)) from exc
            raise
        os.close(fd)

    def finalize(self) -> tuple[Path, int]:
        self.close()
        try:
            os.rename(self._tmp, self.final)
        except OSError:
            self._unlink()
            raise
        return self.final, self.size

    def discard(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
            self._unlink()

    def _unlink(self) -> None:
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


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
