"""DIMSE command sets of the C-ECHO and C-STORE SCP (PS3.7 §9.3, §E).

A command set is a small group-0000 dataset, always Implicit VR Little Endian.
Requests are parsed into a dict of the few fields we use; responses are built
from prebuilt byte templates (only the UIDs, message ID and status vary).
"""
from __future__ import annotations

import struct

# Command Field values
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101

# C-STORE statuses (PS3.4 B.2.3)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
SOP_CLASS_NOT_SUPPORTED = 0x0122  # "Refused: SOP Class not supported"
DATASET_DOES_NOT_MATCH = 0xA900  # "Data Set does not match SOP Class" (also used for UID mismatch, as dcmtk does)
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110

AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID, DATASET_TYPE, AFFECTED_SOP_INSTANCE = (
    0x00000002, 0x00000100, 0x00000110, 0x00000800, 0x00001000)
MOVE_ORIGINATOR_AE = 0x00001030
_UI_FIELDS = (AFFECTED_SOP_CLASS, AFFECTED_SOP_INSTANCE)
_US_FIELDS = (COMMAND_FIELD, MESSAGE_ID, DATASET_TYPE)
MAX_COMMAND_SET = 64 * 1024

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<HHIH")


class CommandError(ValueError):
    """A command set that cannot be parsed."""


def parse_command(raw: bytes | bytearray) -> dict[int, object]:
    """The fields of a request command set we use (UIDs as str, US as int)."""
    out: dict[int, object] = {}
    pos, n = 0, len(raw)
    while pos < n:
        if n - pos < 8:
            raise CommandError("command set ends inside an element header")
        group, elem, length = _ELEMENT.unpack_from(raw, pos)
        pos += 8
        if group != 0x0000 or length > n - pos:
            raise CommandError("command set element out of bounds")
        tag = elem
        if tag in _UI_FIELDS or tag == MOVE_ORIGINATOR_AE:
            out[tag] = bytes(raw[pos:pos + length]).decode("ascii", "replace").rstrip("\0 ").lstrip(" ")
        elif tag in _US_FIELDS:
            if length != 2:
                raise CommandError("command field of the wrong length")
            out[tag] = raw[pos] | raw[pos + 1] << 8
        pos += length
    if COMMAND_FIELD not in out:
        raise CommandError("command set has no Command Field")
    return out


def _ui(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def _ui_element(elem: int, value: str) -> bytes:
    raw = _ui(value)
    return _ELEMENT.pack(0, elem, len(raw)) + raw


def _response(sop_class: str, command: int, message_id: int, status: int, sop_instance: str | None) -> bytes:
    body = b"".join((
        _ui_element(0x0002, sop_class),
        _US.pack(0, 0x0100, 2, command),
        _US.pack(0, 0x0120, 2, message_id),
        _NO_DATASET_ELEMENT,
        _US.pack(0, 0x0900, 2, status),
        _ui_element(0x1000, sop_instance) if sop_instance is not None else b"",
    ))
    return _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<I", len(body)) + body


_NO_DATASET_ELEMENT = _US.pack(0, 0x0800, 2, NO_DATASET)


def c_store_rsp(sop_class: str, sop_instance: str, message_id: int, status: int) -> bytes:
    return _response(sop_class, C_STORE_RSP, message_id, status, sop_instance)


def c_echo_rsp(sop_class: str, message_id: int, status: int = SUCCESS) -> bytes:
    return _response(sop_class, C_ECHO_RSP, message_id, status, None)
