"""A hostile A-ASSOCIATE-RQ costs one log line, not a dozen: while the acceptor decodes a
peer's request, what pynetdicom and pydicom would log or warn about it (an ERROR with a
traceback per undecodable AE title, a warning per bad UID) is dropped; the acceptor's own
one-line warning says what happened. Outside the decode, their logging is untouched."""
from __future__ import annotations

import logging
import struct
import warnings

import pytest

from clara_adapter.dul_pdu import decode_associate_rq, ignore_pydicom_value_warnings


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq_body(called: bytes, calling: bytes, abstract: bytes, context: bytes = b"1.2.840.10008.3.1.1.1") -> bytes:
    presentation = bytes([1, 0, 0, 0]) + _item(0x30, abstract) + _item(0x40, b"1.2.840.10008.1.2")
    user = _item(0x51, struct.pack(">I", 16384))
    return (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, context) + _item(0x20, presentation) + _item(0x50, user))


def test_a_well_formed_request_decodes():
    rq = decode_associate_rq(associate_rq_body(b"CLARA", b"MODALITY", b"1.2.840.10008.5.1.4.1.1.2"))
    assert (rq.called_ae, rq.calling_ae, rq.max_pdu_length) == ("CLARA", "MODALITY", 16384)
    assert [(c.context_id, c.abstract_syntax) for c in rq.contexts] == [(1, "1.2.840.10008.5.1.4.1.1.2")]


@pytest.mark.parametrize("called, calling, abstract, context", [
    (b"CL\xd3RA", b"MOD\xffLITY", b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.3.1.1.1"),  # names
    (b"CLARA", b"MODALITY", b"1.2.840.10008/5.1.4,1.1.2", b"1.2.840&10008.3.1.1.1"),  # UIDs
])
def test_garbled_names_and_uids_are_decoded_without_third_party_noise(caplog, called, calling, abstract, context):
    hostile = associate_rq_body(called, calling, abstract, context)
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        ignore_pydicom_value_warnings()  # as StorageSCP.start does
        try:
            decode_associate_rq(hostile)
        except Exception as exc:  # PduError is the acceptor's to log; anything is fine but noise
            assert type(exc).__name__ == "PduError", exc
    noisy = [r for r in caplog.records if r.name.startswith(("pynetdicom", "pydicom"))]
    assert noisy == [], [r.getMessage() for r in noisy]
    assert [str(w.message) for w in caught if "pydicom" in w.filename] == []


def test_outside_the_decode_their_logging_is_untouched(caplog):
    caplog.set_level(logging.WARNING)
    logging.getLogger("pynetdicom.utils").warning("still heard")
    assert [r.getMessage() for r in caplog.records] == ["still heard"]
