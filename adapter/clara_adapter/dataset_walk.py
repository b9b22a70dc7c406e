"""Structural walk of a DICOM dataset fed in fragments, as it arrives.

The walk checks that the bytes form a complete dataset in their transfer
syntax: element headers, defined lengths (values are skipped, never decoded),
undefined lengths with their item and sequence delimiters, encapsulated pixel
data fragments; inside sequences and items of defined length too (explicit VR:
their elements must end exactly where the container does). A deflated transfer syntax is inflated incrementally while
walking (bounded: at most ``INFLATE_CHUNK`` bytes of output at a time; with a
``budget`` a feed stops after about that many and leaves the rest in `backlog`
for `drain`, so one event loop never inflates a whole zip bomb at once). On the
way it captures the raw values of a few top-level tags (for routing and for
checking the SOP Class/Instance UIDs against the command).

We walk ourselves rather than with pydicom because pydicom reads a whole
dataset from a file-like object and stops silently at a truncated element;
here the bytes arrive in PDV fragments and must never be held whole.

Usage (also for STOW-RS parts)::

    walker = DatasetWalker(transfer_syntax, capture={0x0020000D})
    for chunk in fragments:
        walker.feed(chunk)        # raises MalformedDataset as soon as the structure is wrong
    tags = walker.finish()        # raises MalformedDataset if the dataset ended early
    # tags: {tag: str} for the captured tags present at the top level

Memory per walker is bounded: a header under construction (≤ 12 bytes), the
captured values (each ≤ ``max_capture`` bytes), and a stack of open
sequences/items (≤ ``MAX_DEPTH``).
"""
from __future__ import annotations

import struct
import zlib
from typing import Iterable

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"})  # deflated LE, JPIP deflate

SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018

# VRs whose explicit header has 2 reserved bytes and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
MAX_DEPTH = 64
INFLATE_CHUNK = 1 << 20

_TEXT_DECODE = {b"US": "H", b"SS": "h", b"UL": "I", b"SL": "i", b"FL": "f", b"FD": "d", b"AT": "I",
                b"UV": "Q", b"SV": "q"}

# Frame kinds of the stack of open containers.
_DATASET, _SEQUENCE, _ITEM, _FRAGMENTS = 0, 1, 2, 3


class MalformedDataset(ValueError):
    """The bytes are not a complete, well-formed dataset (truncated, overrunning or garbled)."""


class DatasetWalker:
    def __init__(self, transfer_syntax: str, capture: Iterable[int] = (), max_capture: int = 1024):
        self.transfer_syntax = transfer_syntax
        self.little = transfer_syntax != EXPLICIT_BE
        implicit = transfer_syntax == IMPLICIT_LE
        self._hh = struct.Struct("<HH" if self.little else ">HH")
        self._u32 = struct.Struct("<I" if self.little else ">I")
        self._u16 = struct.Struct("<H" if self.little else ">H")
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if transfer_syntax in DEFLATED_SYNTAXES else None
        self._capture = frozenset(capture)
        self._max_capture = max_capture
        # stack of (kind, implicit, end): end is the offset where a defined-length sequence or item
        # ends, None for undefined lengths; the bottom frame is the top-level dataset
        self._stack: list[tuple[int, bool, int | None]] = [(_DATASET, implicit, None)]
        self._at = 0  # offset (in the walked bytes) of the value of the element being handled
        self._pending = b""  # start of an element header split across fragments
        self._skip = 0  # bytes of the current value still to come
        self._capturing: tuple[int, bytes | None] | None = None
        self._captured_value = bytearray()
        self.raw: dict[int, tuple[bytes | None, bytes]] = {}  # tag -> (VR or None if implicit, raw value)
        self.walked = 0  # dataset bytes walked (inflated for deflate)
        self._backlog = b""  # deflated input not inflated yet (a budget ran out)

    # -- feeding ----------------------------------------------------------------
    def feed(self, data: bytes | bytearray | memoryview, budget: int | None = None) -> int:
        """Walk ``data``. Deflated: inflate about ``budget`` bytes now at most (None: all);
        the rest waits in `backlog` for `drain` (a deflate stream inflates up to ~1000:1, so an
        event loop walks a peer's zip bomb a slice at a time, between other connections).
        Returns the bytes inflated."""
        if self._inflater is None:
            self._walk(data)
            return 0
        if self._backlog or (budget is not None and budget <= 0):
            self._backlog += bytes(data)
            return self.drain(budget) if budget is None or budget > 0 else 0
        return self._inflate(data, budget)

    @property
    def backlog(self) -> bool:
        """Deflated input is waiting to be inflated (`drain`)."""
        return bool(self._backlog)

    def drain(self, budget: int | None = None) -> int:
        """Inflate and walk the backlog (about ``budget`` bytes of it); returns the bytes inflated."""
        if not self._backlog:
            return 0
        backlog, self._backlog = self._backlog, b""
        return self._inflate(backlog, budget)

    def _inflate(self, data: bytes | bytearray | memoryview, budget: int | None) -> int:
        inflater = self._inflater
        try:
            out = inflater.decompress(data, INFLATE_CHUNK)
            produced = len(out)
            self._walk(out)
            while inflater.unconsumed_tail and not inflater.eof:
                if budget is not None and produced >= budget:
                    self._backlog = bytes(inflater.unconsumed_tail)
                    return produced
                out = inflater.decompress(inflater.unconsumed_tail, INFLATE_CHUNK)
                produced += len(out)
                self._walk(out)
        except zlib.error as exc:
            raise MalformedDataset(f"deflated data is corrupt ({exc})") from None
        if len(inflater.unused_data) > 1:  # one pad byte may follow the deflate stream (PS3.5 A.5)
            raise MalformedDataset("data after the end of the deflated dataset")
        return produced

    def finish(self) -> dict[int, str]:
        """Check that the dataset ended exactly at an element boundary of the
        top level; returns the captured tags as text."""
        if self._inflater is not None:
            self.drain()
            try:
                self._walk(self._inflater.flush())
            except zlib.error as exc:
                raise MalformedDataset(f"deflated data is corrupt ({exc})") from None
            if not self._inflater.eof:
                raise MalformedDataset("deflated dataset ends early")
            if len(self._inflater.unused_data) > 1:
                raise MalformedDataset("data after the end of the deflated dataset")
        if self._skip:
            raise MalformedDataset(f"dataset ends {self._skip} bytes inside a value")
        if self._pending:
            raise MalformedDataset("dataset ends inside an element header")
        if len(self._stack) > 1:
            raise MalformedDataset("dataset ends inside a sequence or item")
        return self.tags()

    def tags(self) -> dict[int, str]:
        return {tag: decode_value(tag, vr, raw, self.little) for tag, (vr, raw) in self.raw.items()}

    # -- the walk -----------------------------------------------------------------
    def _walk(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        base = self.walked
        self.walked += n
        pos = 0
        if self._skip:
            pos = self._take_value(data, 0, n)
            if self._skip:
                return
            if self._stack[-1][2] is not None:
                self._leave_defined(base + pos)
            if pos >= n:
                return
        if self._pending:
            # complete a header split across fragments: at most 12 bytes are needed
            have = len(self._pending)
            joined = self._pending + bytes(data[pos:pos + 12 - have])
            parsed = self._header(joined, 0, len(joined))
            if parsed is None:
                if len(joined) - have + pos >= n:  # all of data used and still short
                    self._pending = joined
                    return
                raise MalformedDataset("element header garbled")
            consumed = parsed[0]
            pos += consumed - have
            self._pending = b""
            self._at = base + pos
            self._element(*parsed[1:])
            if self._skip:
                pos = self._take_value(data, pos, n)
            if not self._skip and self._stack[-1][2] is not None:
                self._leave_defined(base + pos)
        header = self._header
        element = self._element
        stack = self._stack
        while pos < n:
            parsed = header(data, pos, n)
            if parsed is None:
                self._pending = bytes(data[pos:n])
                return
            pos += parsed[0]
            self._at = base + pos
            element(parsed[1], parsed[2], parsed[3])
            if self._skip:
                pos = self._take_value(data, pos, n)
            if stack[-1][2] is not None and not self._skip:
                self._leave_defined(base + pos)

    def _leave_defined(self, at: int) -> None:
        """At offset ``at``, after an element: close the defined-length containers that end here."""
        stack = self._stack
        while stack[-1][2] is not None:
            end = stack[-1][2]
            if at < end:
                return
            if at > end:
                raise MalformedDataset("an element overruns the sequence or item of defined length it is in")
            stack.pop()

    def _take_value(self, data, pos: int, n: int) -> int:
        take = min(self._skip, n - pos)
        if self._capturing is not None:
            self._captured_value += data[pos:pos + take]
        self._skip -= take
        if not self._skip and self._capturing is not None:
            tag, vr = self._capturing
            self.raw[tag] = (vr, bytes(self._captured_value))
            self._capturing = None
            self._captured_value = bytearray()
        return pos + take

    def _header(self, buf, pos: int, end: int) -> tuple[int, int, bytes | None, int] | None:
        """(header length, tag, VR or None, value length), or None if ``buf`` ends first."""
        if end - pos < 8:
            return None
        group, elem = self._hh.unpack_from(buf, pos)
        tag = group << 16 | elem
        if group == 0xFFFE or self._stack[-1][1]:  # item tags, or implicit VR
            return 8, tag, None, self._u32.unpack_from(buf, pos + 4)[0]
        vr = bytes(buf[pos + 4:pos + 6])
        if vr in LONG_VRS:
            if end - pos < 12:
                return None
            return 12, tag, vr, self._u32.unpack_from(buf, pos + 8)[0]
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            kind, _, end = self._stack[-1]
            if kind == _ITEM:
                # Some writers put implicit VR items into explicit VR datasets; pydicom reads
                # them so, and so does the walk (the rest of the item, and what it nests)
                self._stack[-1] = (kind, True, end)
                return 8, tag, None, self._u32.unpack_from(buf, pos + 4)[0]
            raise MalformedDataset(f"element ({group:04X},{elem:04X}) has no valid VR")
        return 8, tag, vr, self._u16.unpack_from(buf, pos + 6)[0]

    def _element(self, tag: int, vr: bytes | None, length: int) -> None:
        stack = self._stack
        kind, implicit, end = stack[-1]
        if kind == _SEQUENCE or kind == _FRAGMENTS:
            if tag == ITEM:
                if length == UNDEFINED:
                    if kind == _FRAGMENTS:
                        raise MalformedDataset("pixel data fragment of undefined length")
                    self._push(_ITEM, implicit)
                elif kind == _SEQUENCE and length:
                    self._push(_ITEM, implicit, self._at + length)  # its elements walked too
                else:
                    self._skip = length
            elif tag == SEQUENCE_END:
                if length:
                    raise MalformedDataset("sequence delimiter with a length")
                if end is not None:
                    raise MalformedDataset("sequence delimiter in a sequence of defined length")
                stack.pop()
            else:
                raise MalformedDataset(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) where an item was expected")
            return
        if tag >> 16 == 0xFFFE:
            if tag == ITEM_END and kind == _ITEM and end is None:
                if length:
                    raise MalformedDataset("item delimiter with a length")
                stack.pop()
                return
            raise MalformedDataset(f"delimiter ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of place")
        if length == UNDEFINED:
            if vr is None or vr == b"SQ":
                self._push(_SEQUENCE, implicit)
            elif vr == b"UN":
                self._push(_SEQUENCE, True)  # PS3.5 6.2.2: an undefined-length UN is implicit VR LE inside
            elif vr in (b"OB", b"OW"):
                self._push(_FRAGMENTS, implicit)
            else:
                raise MalformedDataset(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) of undefined length")
            return
        if vr == b"SQ" and length:  # explicit VR (implicit VR names no SQ: its value is skipped)
            self._push(_SEQUENCE, implicit, self._at + length)
            return
        self._skip = length
        if kind == _DATASET and len(stack) == 1 and tag in self._capture and length <= self._max_capture:
            if length:
                self._capturing = (tag, vr)
            else:
                self.raw[tag] = (vr, b"")

    def _push(self, kind: int, implicit: bool, end: int | None = None) -> None:
        if len(self._stack) > MAX_DEPTH:
            raise MalformedDataset("sequences nested too deep")
        if end is not None and self._stack[-1][2] is not None and end > self._stack[-1][2]:
            raise MalformedDataset("a sequence or item is longer than the sequence or item it is in")
        self._stack.append((kind, implicit, end))


def decode_value(tag: int, vr: bytes | None, raw: bytes, little: bool = True) -> str:
    """A captured value as text (numbers as decimal, several values joined by '\\')."""
    if vr is None:
        from pydicom.datadict import dictionary_VR

        try:
            vr = dictionary_VR(tag).encode("ascii")[:2]
        except KeyError:
            vr = b"UN"
    code = _TEXT_DECODE.get(vr)
    if code is not None:
        size = struct.calcsize(code)
        count = len(raw) // size
        values = struct.unpack(("<" if little else ">") + code * count, raw[:count * size])
        return "\\".join(str(v) for v in values)
    return raw.decode("utf-8", "replace").strip(" \0")


def walk(dataset: bytes | memoryview, transfer_syntax: str, capture: Iterable[int] = ()) -> dict[int, str]:
    """Walk a whole dataset held in memory; returns the captured tags."""
    walker = DatasetWalker(transfer_syntax, capture)
    walker.feed(dataset)
    return walker.finish()
