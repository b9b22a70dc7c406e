"""The structural dataset walker and the PDU framing, fed in arbitrary fragments.

Real-peer behaviour (dcmtk storescu, raw sockets) is in test_receive_hostile.py;
these pin the logic at every byte boundary."""
from __future__ import annotations

import random
import struct
import zlib

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from clara_dicom.synthetic import ct_slice

from clara_adapter.dataset_walk import DatasetWalker, MalformedDataset, walk
from clara_adapter.dul_pdu import PduError, PduStream
from raw_dicom import encode

STUDY, PATIENT, ROWS, SOP = 0x0020000D, 0x00100020, 0x00280010, 0x00080018
SYNTAXES = [("1.2.840.10008.1.2", True, True), ("1.2.840.10008.1.2.1", False, True),
            ("1.2.840.10008.1.2.2", False, False)]


def dataset(undefined_sequence: bool = True) -> Dataset:
    ds = ct_slice("PAT 7", "1.2.3", "1.2.3.4", 0, rows=8, cols=8)
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator = "X", "Y"
    nested = Dataset()
    nested.CodeMeaning = "inner"
    item.ConceptNameCodeSequence = Sequence([nested])
    ds.ProcedureCodeSequence = Sequence([item, item])
    ds["ProcedureCodeSequence"].is_undefined_length = undefined_sequence
    return ds


def feed_in_pieces(data: bytes, ts: str, rng: random.Random, capture=()) -> dict[int, str]:
    walker = DatasetWalker(ts, capture)
    view = memoryview(data)
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 17)
        walker.feed(view[pos:pos + step])
        pos += step
    return walker.finish()


@pytest.mark.parametrize("ts, implicit, little", SYNTAXES)
def test_walk_captures_top_level_tags_in_any_fragmentation(ts, implicit, little):
    raw = encode(dataset(), implicit, little)
    expected = {STUDY: "1.2.3", PATIENT: "PAT 7", ROWS: "8"}
    assert walk(raw, ts, expected) == expected
    rng = random.Random(1)
    for _ in range(30):
        assert feed_in_pieces(raw, ts, rng, expected) == expected


@pytest.mark.parametrize("undefined_sequence", [True, False], ids=["undefined-length", "defined-length"])
@pytest.mark.parametrize("ts, implicit, little", SYNTAXES)
def test_every_cut_inside_a_value_header_or_sequence_is_detected(ts, implicit, little, undefined_sequence):
    ds = dataset(undefined_sequence)
    raw = encode(ds, implicit, little)
    # top-level element boundaries, from encoding each element on its own
    boundaries, offset = {0}, 0
    for elem in ds:
        single = Dataset()
        single.add(elem)
        offset += len(encode(single, implicit, little))
        boundaries.add(offset)
    assert offset == len(raw)
    for cut in range(len(raw)):
        if cut in boundaries:
            walk(raw[:cut], ts)  # a dataset cut between top-level elements is structurally whole
        else:
            with pytest.raises(MalformedDataset):
                walk(raw[:cut], ts)


def test_cut_inside_the_undefined_length_sequence_is_never_whole():
    raw = encode(dataset())
    start = raw.index(struct.pack("<HH", 0x0008, 0x1032))
    end = raw.index(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) + 8
    for cut in range(start + 1, end):
        with pytest.raises(MalformedDataset):
            walk(raw[:cut], "1.2.840.10008.1.2.1")


def test_encapsulated_pixel_data_is_walked_fragment_by_fragment():
    ds = dataset()
    ds.PixelData = encapsulate([b"\x01" * 100, b"\x02" * 64])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta = Dataset()
    raw = encode(ds)
    ts = "1.2.840.10008.1.2.4.70"
    assert walk(raw, ts, {STUDY}) == {STUDY: "1.2.3"}
    with pytest.raises(MalformedDataset):
        walk(raw[:-8], ts)  # no sequence delimiter
    with pytest.raises(MalformedDataset):
        walk(raw[:-30], ts)  # inside the last fragment


def test_deflated_is_inflated_while_walked():
    raw = encode(dataset())
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(raw) + comp.flush()
    ts = "1.2.840.10008.1.2.1.99"
    rng = random.Random(3)
    for _ in range(20):
        assert feed_in_pieces(deflated, ts, rng, {STUDY}) == {STUDY: "1.2.3"}
    assert walk(deflated + b"\0", ts, {STUDY}) == {STUDY: "1.2.3"}  # one pad byte is allowed
    for bad in (deflated[:-3], deflated + b"\0\0\0", b"\xff" * 50):
        with pytest.raises(MalformedDataset):
            walk(bad, ts)


def test_deflated_input_is_inflated_within_a_budget_and_the_rest_drained_later():
    """With a budget, a feed inflates about that much and keeps the rest (`backlog`) for
    `drain`; fed on while a backlog waits, the bytes queue behind it; the walk comes out the
    same as in one go (the receive loop inflates a zip bomb a slice per turn this way)."""
    ds = dataset()
    ds.PixelData = b"\0" * (4 * 1024 * 1024)
    ds[0x7FE00010].VR = "OB"
    raw = encode(ds)
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(raw) + comp.flush()
    walker = DatasetWalker("1.2.840.10008.1.2.1.99", {STUDY})
    half = len(deflated) // 2
    first = walker.feed(deflated[:half], budget=1024 * 1024)
    assert walker.backlog and 1024 * 1024 <= first < len(raw)
    assert walker.feed(deflated[half:], budget=0) == 0 and walker.backlog
    inflated = first
    while walker.backlog:
        step = walker.drain(1024 * 1024)
        assert 0 < step <= 2 * 1024 * 1024
        inflated += step
    assert inflated == len(raw)
    assert walker.finish() == {STUDY: "1.2.3"}


@pytest.mark.parametrize("ts, implicit, little", SYNTAXES)
def test_defined_length_sequences_walk_whole_in_any_fragmentation(ts, implicit, little):
    raw = encode(dataset(undefined_sequence=False), implicit, little)
    expected = {STUDY: "1.2.3", PATIENT: "PAT 7", ROWS: "8"}
    assert walk(raw, ts, expected) == expected
    rng = random.Random(2)
    for _ in range(30):
        assert feed_in_pieces(raw, ts, rng, expected) == expected


def test_inside_a_defined_length_sequence_garbage_and_overruns_are_refused():
    ts = "1.2.840.10008.1.2.1"
    raw = encode(dataset(undefined_sequence=False), False, True)
    walk(raw, ts)
    start = raw.index(struct.pack("<HH", 0x0008, 0x1032) + b"SQ")  # ProcedureCodeSequence, defined length
    vr = raw.index(b"SH", start)  # CodeValue in its first item: every length around it still adds up
    with pytest.raises(MalformedDataset):  # read as an implicit VR item (below), it overruns its item
        walk(raw[:vr] + b"\x01\x02" + raw[vr + 2:], ts)
    # an item declared longer than its sequence; a nested element running past its item
    item_too_long = (struct.pack("<HH2sHI", 0x0008, 0x1032, b"SQ", 0, 16)
                     + struct.pack("<HHI", 0xFFFE, 0xE000, 100) + b"\0" * 8)
    element_past_item = (struct.pack("<HH2sHI", 0x0008, 0x1032, b"SQ", 0, 18)
                         + struct.pack("<HHI", 0xFFFE, 0xE000, 10)
                         + struct.pack("<HH2sH", 0x0008, 0x0100, b"SH", 4) + b"ABCD")
    for bad in (item_too_long, element_past_item):
        with pytest.raises(MalformedDataset):
            walk(bad, ts)
    # delimiters belong to undefined lengths only
    delimited = (struct.pack("<HH2sHI", 0x0008, 0x1032, b"SQ", 0, 16)
                 + struct.pack("<HHI", 0xFFFE, 0xE000, 8) + struct.pack("<HHI", 0xFFFE, 0xE00D, 0))
    with pytest.raises(MalformedDataset):
        walk(delimited, ts)


@pytest.mark.parametrize("undefined_sequence", [True, False], ids=["undefined-length", "defined-length"])
def test_implicit_vr_items_in_an_explicit_vr_dataset_are_read_as_pydicom_reads_them(undefined_sequence):
    from io import BytesIO

    from pydicom.filereader import read_dataset

    item = Dataset()
    item.CodeValue, item.CodeMeaning = "X1", "written implicit"
    body = encode(item, True, True)
    items = struct.pack("<HHI", 0xFFFE, 0xE000, len(body)) + body
    if undefined_sequence:
        sequence = (struct.pack("<HH2sHI", 0x0008, 0x1032, b"SQ", 0, 0xFFFFFFFF) + items
                    + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    else:
        sequence = struct.pack("<HH2sHI", 0x0008, 0x1032, b"SQ", 0, len(items)) + items
    after = Dataset()
    after.PatientID = "PAT 8"
    raw = sequence + encode(after, False, True)
    read = read_dataset(BytesIO(raw), is_implicit_VR=False, is_little_endian=True)
    assert read.ProcedureCodeSequence[0].CodeMeaning == "written implicit" and read.PatientID == "PAT 8"
    assert walk(raw, "1.2.840.10008.1.2.1", {PATIENT}) == {PATIENT: "PAT 8"}
    with pytest.raises(MalformedDataset):
        walk(raw[:-3], "1.2.840.10008.1.2.1")


def test_garbage_and_misplaced_delimiters_are_refused():
    for bad in (struct.pack("<HHI", 0xFFFE, 0xE00D, 0),  # item delimiter at the top level
                struct.pack("<HH2sH", 0x0010, 0x0010, b"\x01\x02", 2) + b"AB",  # no VR
                struct.pack("<HH2sH", 0x0010, 0x0010, b"PN", 50) + b"short"):  # value overruns the data
        with pytest.raises(MalformedDataset):
            walk(bad, "1.2.840.10008.1.2.1")


class Recorder:
    def __init__(self):
        self.events = []

    def control_pdu(self, pdu_type, body):
        self.events.append(("pdu", pdu_type, body))

    def pdv_begin(self, context_id, is_command, is_last):
        self.events.append(("begin", context_id, is_command, is_last))

    def pdv_data(self, data):
        self.events.append(("data", bytes(data)))

    def pdv_end(self):
        self.events.append(("end",))


def joined(events):
    """Events with consecutive data pieces merged (fragmentation-independent)."""
    out = []
    for e in events:
        if e[0] == "data" and out and out[-1][0] == "data":
            out[-1] = ("data", out[-1][1] + e[1])
        else:
            out.append(e)
    return out


def test_pdu_stream_delivers_the_same_events_in_any_fragmentation():
    pdv1 = struct.pack(">IBB", 2 + 5, 1, 0x03) + b"hello"
    pdv2 = struct.pack(">IBB", 2 + 300, 1, 0x00) + b"x" * 300
    stream = (struct.pack(">BBI", 0x04, 0, len(pdv1 + pdv2)) + pdv1 + pdv2
              + struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)
    whole = Recorder()
    PduStream(whole, 16384).feed(memoryview(stream))
    rng = random.Random(5)
    for _ in range(50):
        rec = Recorder()
        parser = PduStream(rec, 16384)
        pos = 0
        while pos < len(stream):
            step = rng.randint(1, 40)
            parser.feed(memoryview(stream)[pos:pos + step])
            pos += step
        assert joined(rec.events) == joined(whole.events)
    assert joined(whole.events)[-1] == ("pdu", 0x05, b"\0" * 4)


def test_pdu_stream_refuses_oversize_and_inconsistent_lengths_before_reading_them():
    for bad in (struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0),  # P-DATA over the maximum
                struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0),  # A-ASSOCIATE-RQ over the control-PDU limit
                struct.pack(">BBI", 0x04, 0, 10) + struct.pack(">IBB", 100, 1, 3),  # PDV longer than its PDU
                struct.pack(">BBI", 0x09, 0, 4)):  # unknown PDU type
        with pytest.raises(PduError):
            PduStream(Recorder(), 16384).feed(memoryview(bad))
