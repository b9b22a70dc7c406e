"""The receive path against hostile and broken peers (raw sockets), and its
bounds: oversize PDUs, idle connections, truncated or garbled datasets, aborts
at any byte, UID mismatches, shutdown with idle connections. Each test ends by
checking the adapter still serves a real dcmtk storescu."""
from __future__ import annotations

import os
import random
import signal
import socket
import struct
import time
import zlib
from pathlib import Path

import pytest

from local_setup import write_config
from peers import echoscu, metric_value, storescu, wait_for
from raw_dicom import (CT, EXPLICIT_LE, associate, associate_rq, c_store_bytes, c_store_command, connect, encode,
                        p_data, read_status, recv_pdu, release)

pytestmark = pytest.mark.dcmtk

HOLD = "pipelines: {seg: seg}\ntimeout: 3600"
MR = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"


def settings_file(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    return ["--settings", str(path)]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def incoming(adapter) -> list[Path]:
    return sorted((adapter.state / "incoming").iterdir())


def ct(sop: str = "1.2.3.4.5.6", study: str = "1.2.3", rows: int = 64):
    from clara_dicom.synthetic import ct_slice

    ds = ct_slice("PAT-H", study, study + ".1", 0, rows=rows, cols=rows)
    ds.SOPInstanceUID = sop
    return ds


def still_serves(adapter, files) -> None:
    assert adapter.alive()
    assert echoscu(adapter.dicom_port).returncode == 0
    storescu(files, adapter.dicom_port)


def test_oversize_pdu_is_aborted_without_allocating(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    storescu(ct_series[:1], adapter.dicom_port)  # warm up
    before = rss_bytes(adapter.proc.pid)
    for _ in range(8):
        # before association: an A-ASSOCIATE-RQ header announcing ~4 GiB
        with connect(adapter.dicom_port) as s:
            s.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0) + b"\0" * 64)
            pdu_type, body = recv_pdu(s)
            assert pdu_type == 0x07  # A-ABORT
        # inside an association: a P-DATA-TF announcing ~4 GiB
        with associate(adapter.dicom_port) as s:
            s.sendall(struct.pack(">BBI", 0x04, 0, 0xFFFFFFF0) + b"\0" * 64)
            assert recv_pdu(s)[0] == 0x07
    assert rss_bytes(adapter.proc.pid) - before < 32 * 1024**2
    still_serves(adapter, ct_series[1:2])


def test_idle_connections_hold_no_slot_and_are_closed_after_artim(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD),
                            extra=settings_file(tmp_path, "maxAssociations: 4\nartimTimeout: 2\n"))
    idle = [connect(adapter.dicom_port) for _ in range(40)]
    try:
        # far more idle connections than maxAssociations: a real modality still gets in
        storescu(ct_series[:3], adapter.dicom_port)
        assert len([p for p in incoming(adapter) if p.suffix == ".dcm"]) == 3
        # and the idle ones are closed by the ARTIM timer
        for s in idle:
            s.settimeout(15)
            assert s.recv(1) == b""
    finally:
        for s in idle:
            s.close()
    assert adapter.alive()


def test_idle_connections_beyond_the_cap_drop_the_oldest(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD),
                            extra=settings_file(tmp_path, "maxAssociations: 4\nartimTimeout: 300\n"))
    idle = []
    try:
        for _ in range(80):  # the cap is max(64, 4 x maxAssociations) = 64
            idle.append(connect(adapter.dicom_port))
        for s in idle[:16]:  # the 16 oldest are dropped long before ARTIM
            s.settimeout(10)
            assert s.recv(1) == b""
        storescu(ct_series[:1], adapter.dicom_port)  # its connection counted too: idle[16] was dropped for it
        for s in idle[17:]:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)  # still open
    finally:
        for s in idle:
            s.close()


def test_max_associations_counts_negotiated_associations(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD),
                            extra=settings_file(tmp_path, "maxAssociations: 2\n"))
    held = [associate(adapter.dicom_port) for _ in range(2)]
    proc = storescu(ct_series[:1], adapter.dicom_port, check=False)
    assert proc.returncode != 0 and "Rejected Transient" in proc.stderr
    assert metric_value(adapter.metrics(), "clara_associations_active") == 2
    for s in held:
        assert release(s) == 0x06
        s.close()
    wait_for(lambda: adapter.status()["activeAssociations"] == 0, 10, what="slots freed")
    storescu(ct_series[:1], adapter.dicom_port)


def test_truncated_dataset_fails_and_reaches_no_job(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor="pipelines: {seg: seg}\ntimeout: 5"))
    whole = encode(ct("1.2.3.4.5.1", study="9.9.1"))
    with associate(adapter.dicom_port) as s:
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.1", whole[:-100]))  # ends inside Pixel Data
        assert read_status(s) == 0xC000
        good = encode(ct("1.2.3.4.5.2", study="9.9.2"))
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.2", good, message_id=2))
        assert read_status(s) == 0x0000
        assert release(s) == 0x06
    jobs = wait_for(lambda: adapter.jobs(), 20, what="the good study's job")
    assert len(jobs) == 1 and jobs[0]["spec"]["payload"]["instances"] == 1
    assert not [p for p in incoming(adapter) if p.name.startswith(".tmp-")]
    assert metric_value(adapter.metrics(), "clara_store_failures_total", reason="unreadable") == 1


def test_overrunning_and_garbled_datasets_fail(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    whole = encode(ct("1.2.3.4.5.3"))
    bad_length = whole[:6] + b"\xf0\xff" + whole[8:]  # the first element's length points past the end
    deflated_garbage = zlib.compress(b"x" * 1000)[:40]
    with associate(adapter.dicom_port) as s:
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.3", bad_length))
        assert read_status(s) == 0xC000
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.3", whole + b"\x08\x00"))  # a stray partial header at the end
        assert read_status(s) == 0xC000
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.3", os.urandom(5000)))
        assert read_status(s) == 0xC000
        release(s)
    with associate(adapter.dicom_port, contexts=[(CT, ["1.2.840.10008.1.2.1.99"])]) as s:
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.3", deflated_garbage))
        assert read_status(s) == 0xC000
        release(s)
    assert not incoming(adapter)
    still_serves(adapter, ct_series[:1])


def test_deflated_dataset_is_inflated_while_walked_and_stored_as_received(local_adapter, tmp_path):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = comp.compress(encode(ct("1.2.3.4.5.4"))) + comp.flush()
    with associate(adapter.dicom_port, contexts=[(CT, ["1.2.840.10008.1.2.1.99"])]) as s:
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.4", deflated))
        assert read_status(s) == 0x0000
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.5", deflated[:-7], message_id=2))
        assert read_status(s) == 0xC000
        release(s)
    (stored,) = incoming(adapter)
    assert stored.read_bytes().endswith(deflated)


def test_sop_instance_uid_mismatch_is_refused_a900(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    data = encode(ct("1.2.3.4.5.6"))
    with associate(adapter.dicom_port, contexts=[(CT, [EXPLICIT_LE]), (MR, [EXPLICIT_LE])]) as s:
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.999", data))  # the command names another instance
        assert read_status(s) == 0xA900
        s.sendall(c_store_bytes(MR, "1.2.3.4.5.6", data, context_id=3, message_id=2))  # another class
        assert read_status(s) == 0xA900
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.6", data, message_id=3))
        assert read_status(s) == 0x0000
        release(s)
    assert len(incoming(adapter)) == 1
    assert metric_value(adapter.metrics(), "clara_store_failures_total", reason="uid_mismatch") == 2


def test_garbage_bytes_are_aborted_and_the_server_stays_up(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    rng = random.Random(14)
    for _ in range(20):
        with connect(adapter.dicom_port) as s:
            try:
                s.sendall(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000))))
                s.shutdown(socket.SHUT_WR)
                recv_pdu(s)
            except OSError:
                pass
    for _ in range(10):  # garbage inside an association
        with associate(adapter.dicom_port) as s:
            try:
                s.sendall(struct.pack(">BBI", 0x04, 0, 300) + os.urandom(300))
                assert recv_pdu(s)[0] in (0x07, 0)
            except OSError:
                pass
    assert not incoming(adapter)
    still_serves(adapter, ct_series[:2])


def test_abort_at_any_byte_stores_nothing(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    message = c_store_bytes(CT, "1.2.3.4.5.7", encode(ct("1.2.3.4.5.7", rows=128)))
    rng = random.Random(7)
    offsets = sorted({0, 1, 5, 6, 7, 11, len(message) - 1} | {rng.randrange(len(message)) for _ in range(40)})
    for i, cut in enumerate(offsets):
        s = associate(adapter.dicom_port)
        s.sendall(message[:cut])
        if i % 2:
            s.sendall(struct.pack(">BBI", 0x07, 0, 4) + b"\0\0\0\0")  # A-ABORT
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # TCP RST
        s.close()
    wait_for(lambda: adapter.status()["activeAssociations"] == 0, 10, what="aborted associations gone")
    assert not incoming(adapter)  # neither files nor temporary files
    assert adapter.status()["instancesHeld"] == 0
    still_serves(adapter, ct_series[:2])
    assert len(incoming(adapter)) == 2


def test_stalled_peer_does_not_block_others(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    message = c_store_bytes(CT, "1.2.3.4.5.8", encode(ct("1.2.3.4.5.8")))
    stalled = associate(adapter.dicom_port)
    stalled.sendall(message[:len(message) // 2])  # then nothing
    try:
        storescu(ct_series[:5], adapter.dicom_port)
        assert len([p for p in incoming(adapter) if p.suffix == ".dcm"]) == 5
    finally:
        stalled.close()


def test_sigterm_drain_ignores_idle_connections_and_waits_for_associations(local_adapter, tmp_path):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD),
                            extra=settings_file(tmp_path, "artimTimeout: 120\n"))
    idle = connect(adapter.dicom_port)
    busy = associate(adapter.dicom_port)
    adapter.signal(signal.SIGTERM)
    # the idle connection is dropped at once, while the association is still served
    idle.settimeout(10)
    assert idle.recv(1) == b""
    busy.sendall(c_store_bytes(CT, "1.2.3.4.5.9", encode(ct("1.2.3.4.5.9"))))
    assert read_status(busy) == 0x0000
    assert adapter.alive()
    assert release(busy) == 0x06
    start = time.monotonic()
    adapter.proc.wait(20)
    assert time.monotonic() - start < 20
    assert adapter.proc.returncode == 0


def test_silent_association_is_aborted_after_the_network_timeout(local_adapter, tmp_path, ct_series):
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD),
                            extra=settings_file(tmp_path, "networkTimeout: 1\n"))
    message = c_store_bytes(CT, "1.2.3.4.5.10", encode(ct("1.2.3.4.5.10")))
    with associate(adapter.dicom_port) as s:
        s.sendall(message[:len(message) // 2])  # then silence, inside a C-STORE
        s.settimeout(15)
        assert recv_pdu(s)[0] == 0x07  # A-ABORT
    wait_for(lambda: adapter.status()["activeAssociations"] == 0, 10, what="slot freed")
    assert not incoming(adapter)
    still_serves(adapter, ct_series[:1])


def echo_request(message_id: int) -> bytes:
    """The P-DATA-TF of one C-ECHO-RQ (Verification on presentation context 1)."""
    body = b"".join((struct.pack("<HHI", 0, 0x0002, 18) + b"1.2.840.10008.1.1\0",
                     struct.pack("<HHIH", 0, 0x0100, 2, 0x0030), struct.pack("<HHIH", 0, 0x0110, 2, message_id),
                     struct.pack("<HHIH", 0, 0x0800, 2, 0x0101)))
    return p_data(1, struct.pack("<HHII", 0, 0x0000, 4, len(body)) + body, True)


def rss_of_tree(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return sum(rss_bytes(p) for p in [pid, *map(int, children)])


def test_peer_that_never_reads_its_answers_is_not_read_either_then_aborted(local_adapter, tmp_path, ct_series):
    """A requestor that sends C-ECHO-RQs as fast as it can and never reads a C-ECHO-RSP: the
    adapter must stop reading it once its answers are not taken (not buffer them without
    bound), then abort it after networkTimeout and free its slot although the peer still
    reads nothing (closing must not wait forever for the unsent answers)."""
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD),
                            extra=settings_file(tmp_path, "networkTimeout: 3\n"))
    storescu(ct_series[:1], adapter.dicom_port)  # warm up
    before = rss_of_tree(adapter.proc.pid)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.settimeout(10)
    sock.connect(("127.0.0.1", adapter.dicom_port))
    sock.sendall(associate_rq(contexts=[("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]))
    assert recv_pdu(sock)[0] == 0x02
    batch = b"".join(echo_request(i % 60000 + 1) for i in range(1000))  # ~80 KB
    sent, limit = 0, 64 * 1024**2
    sock.settimeout(2)
    try:
        while sent < limit:
            sock.sendall(batch)
            sent += len(batch)
    except (socket.timeout, ConnectionResetError, BrokenPipeError):
        pass
    try:
        # what the kernel buffers on both sides takes, and no more
        assert sent < limit, "the adapter kept reading a peer that reads none of its answers"
        assert rss_of_tree(adapter.proc.pid) - before < 48 * 1024**2
        wait_for(lambda: adapter.status()["activeAssociations"] == 0, 20, what="the stalled peer's slot freed")
    finally:
        sock.close()
    still_serves(adapter, ct_series[1:2])


def test_c_store_of_a_sop_class_its_context_was_not_negotiated_for_is_refused_0122(local_adapter, tmp_path,
                                                                                    ct_series):
    """PS3.7 9.1.1.1: a C-STORE's Affected SOP Class is its presentation context's abstract
    syntax. A CT sent on the Verification context, or an MR on the CT context, would bypass the
    negotiation (which refuses non-storage classes, and keeps each class's own transfer
    syntax): answered 0x0122 (SOP Class not supported), its dataset read and dropped."""
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    with associate(adapter.dicom_port, contexts=[(CT, [EXPLICIT_LE]), (VERIFICATION, ["1.2.840.10008.1.2"])]) as s:
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.11", encode(ct("1.2.3.4.5.11"), implicit=True), context_id=3))
        assert read_status(s) == 0x0122
        mr = ct("1.2.3.4.5.12")
        mr.SOPClassUID = MR
        s.sendall(c_store_bytes(MR, "1.2.3.4.5.12", encode(mr), message_id=2))
        assert read_status(s) == 0x0122
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.13", encode(ct("1.2.3.4.5.13")), message_id=3))
        assert read_status(s) == 0x0000  # the association goes on
        assert release(s) == 0x06
    assert len(incoming(adapter)) == 1
    assert metric_value(adapter.metrics(), "clara_store_failures_total", reason="sop_class_not_negotiated") == 2
    still_serves(adapter, ct_series[:1])


def test_refused_instances_are_logged_by_hashed_uid_only(local_adapter, tmp_path):
    """SOP Instance UIDs identify a patient's images: a log line names an instance by
    `short_hash` of its UID, never by the UID."""
    from clara_dicom.logs import short_hash

    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    truncated, other = "1.2.3.4.5.77.1234567", "1.2.3.4.5.77.7654321"
    whole = encode(ct(truncated))
    with associate(adapter.dicom_port) as s:
        s.sendall(c_store_bytes(CT, truncated, whole[:-100]))
        assert read_status(s) == 0xC000
        s.sendall(c_store_bytes(CT, other, whole, message_id=2))  # the dataset names another instance
        assert read_status(s) == 0xA900
        assert release(s) == 0x06
    text = adapter.log()
    assert "malformed dataset" in text and "differ from the command" in text
    assert short_hash(truncated) in text and short_hash(other) in text
    assert "1234567" not in text and "7654321" not in text


def test_pdus_coalesced_with_the_associate_rq_are_served_not_dropped(local_adapter, tmp_path, ct_series):
    """A-ASSOCIATE-RQ, a C-STORE and the A-RELEASE-RQ in one TCP segment (a requestor that does
    not wait for the A-ASSOCIATE-AC): what follows the RQ is served once the association is
    accepted, as when it arrives in a later segment, not silently dropped (the peer would then
    wait for an answer until networkTimeout)."""
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    data = encode(ct("1.2.3.4.5.14"))
    with connect(adapter.dicom_port) as s:
        s.sendall(associate_rq() + c_store_bytes(CT, "1.2.3.4.5.14", data)
                  + struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)
        assert recv_pdu(s)[0] == 0x02
        assert read_status(s) == 0x0000
        assert recv_pdu(s)[0] == 0x06  # A-RELEASE-RP
    assert len(incoming(adapter)) == 1
    still_serves(adapter, ct_series[:1])


def with_context_ids(rq: bytes, ids: list[int]) -> bytes:
    """An A-ASSOCIATE-RQ with its presentation context items renumbered ``ids`` in order."""
    out, pos, ids = bytearray(rq), 6 + 68, list(ids)
    while pos < len(out):
        item_type, length = out[pos], struct.unpack_from(">H", out, pos + 2)[0]
        if item_type == 0x20:
            out[pos + 4] = ids.pop(0)
        pos += 4 + length
    return bytes(out)


def test_duplicate_presentation_context_ids_are_aborted(local_adapter, tmp_path, ct_series):
    """PS3.8 9.3.2.2: each proposed presentation context has its own id. Two with one id
    (here CT in explicit and in implicit VR) cannot both be answered unambiguously: which
    transfer syntax would the data on that id be in? A-ABORT, no slot held."""
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    rq = associate_rq(contexts=[(CT, [EXPLICIT_LE]), (CT, ["1.2.840.10008.1.2"])])
    with connect(adapter.dicom_port) as s:
        s.sendall(with_context_ids(rq, [1, 1]))
        assert recv_pdu(s)[0] == 0x07
    with connect(adapter.dicom_port) as s:  # distinct ids, the same request: accepted
        s.sendall(with_context_ids(rq, [1, 3]))
        assert recv_pdu(s)[0] == 0x02
        assert release(s) == 0x06
    still_serves(adapter, ct_series[:1])


def deflate_bomb(sop: str, pixel_bytes: int) -> bytes:
    """A structurally valid CT dataset, deflated, whose Pixel Data is ``pixel_bytes`` zeros:
    ~1000 times smaller on the wire than inflated."""
    ds = ct(sop, rows=16)
    del ds.PixelData
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [comp.compress(encode(ds) + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes))]
    zeros = b"\0" * (16 * 1024**2)
    for _ in range(pixel_bytes // len(zeros)):
        out.append(comp.compress(zeros))
    out.append(comp.flush())
    return b"".join(out)


def test_a_deflate_bomb_does_not_stall_other_associations(local_adapter, tmp_path):
    """A deflated dataset inflates up to ~1000:1: 2 MB on the wire are 2 GiB to walk, seconds
    of CPU. It is walked a slice per event-loop turn, so an association on the same loop keeps
    being answered meanwhile (the longest C-ECHO round trip is a small part of the bomb's
    time), and the bomb itself is still walked to its end and stored."""
    import threading

    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    bomb = c_store_bytes(CT, "1.2.3.4.5.15", deflate_bomb("1.2.3.4.5.15", 2 * 1024**3))
    echoing = associate(adapter.dicom_port, contexts=[(VERIFICATION, ["1.2.840.10008.1.2"])])
    bombing = associate(adapter.dicom_port, contexts=[(CT, ["1.2.840.10008.1.2.1.99"])])
    bombing.settimeout(120)
    outcome: dict = {}

    def send_bomb() -> None:
        start = time.monotonic()
        bombing.sendall(bomb)
        outcome["status"] = read_status(bombing)
        outcome["seconds"] = time.monotonic() - start

    sender = threading.Thread(target=send_bomb)
    sender.start()
    round_trips = []
    echoing.settimeout(120)
    while sender.is_alive():
        start = time.monotonic()
        echoing.sendall(echo_request(len(round_trips) % 60000 + 1))
        assert read_status(echoing) == 0x0000
        round_trips.append(time.monotonic() - start)
    sender.join()
    print(f"bomb {outcome}, {len(round_trips)} C-ECHO round trips meanwhile, longest {max(round_trips):.3f} s")
    assert outcome["status"] == 0x0000
    assert len(round_trips) > 10 and max(round_trips) < outcome["seconds"] / 5, (max(round_trips), outcome)
    assert release(echoing) == 0x06 and release(bombing) == 0x06
    echoing.close()
    bombing.close()


def raw_associate_rq(contexts: list[tuple[int, bytes, list[bytes]]], calling: bytes = b"STORESCU") -> bytes:
    """An A-ASSOCIATE-RQ built byte by byte (pynetdicom's classes refuse the bad values tried here)."""
    def item(item_type: int, value: bytes) -> bytes:
        return struct.pack(">BBH", item_type, 0, len(value)) + value

    items = item(0x10, b"1.2.840.10008.3.1.1.1")
    for context_id, abstract, syntaxes in contexts:
        items += item(0x20, bytes((context_id, 0, 0, 0)) + item(0x30, abstract)
                      + b"".join(item(0x40, ts) for ts in syntaxes))
    items += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.3.4"))
    body = struct.pack(">HH", 1, 0) + b"CLARA".ljust(16) + calling.ljust(16) + b"\0" * 32 + items
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def context_results(ac_body: bytes) -> dict[int, int]:
    """{presentation context id: result} of an A-ASSOCIATE-AC body."""
    out, pos = {}, 68
    while pos < len(ac_body):
        item_type, length = ac_body[pos], struct.unpack_from(">H", ac_body, pos + 2)[0]
        if item_type == 0x21:
            out[ac_body[pos + 4]] = ac_body[pos + 6]
        pos += 4 + length
    return out


def test_a_storage_context_without_a_valid_transfer_syntax_uid_is_not_accepted(local_adapter, tmp_path, ct_series):
    """The proposed transfer syntax is kept, so it must be one: an empty or non-UID name would
    go into the file meta of what a pipeline reads. Such a context is answered "transfer
    syntaxes not supported" (4); a valid UID after it is taken; nothing sent on it is stored."""
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    with connect(adapter.dicom_port) as s:
        s.sendall(raw_associate_rq([(1, CT.encode(), [b""]), (3, CT.encode(), [b"explicit-le"]),
                                    (5, CT.encode(), [b"", EXPLICIT_LE.encode()])]))
        pdu_type, body = recv_pdu(s)
        assert pdu_type == 0x02
        assert context_results(body) == {1: 4, 3: 4, 5: 0}
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.16", encode(ct("1.2.3.4.5.16")), context_id=5))
        assert read_status(s) == 0x0000
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.17", encode(ct("1.2.3.4.5.17")), context_id=1, message_id=2))
        assert read_status(s) is None  # aborted: not an accepted context
    (stored,) = [p for p in incoming(adapter) if p.suffix == ".dcm"]
    import pydicom

    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == EXPLICIT_LE
    still_serves(adapter, ct_series[:1])


def test_a_command_uid_that_is_not_ascii_is_refused_c000_without_an_internal_error(local_adapter, tmp_path,
                                                                                   ct_series):
    """Found by tools/fuzz_receive.py: a C-STORE-RQ whose Affected SOP Instance UID has a
    non-ASCII byte could not be written into the file meta: an internal error, a traceback
    in the log and an A-ABORT. It is a request we cannot understand: 0xC000, association on."""
    adapter = local_adapter(write_config(tmp_path / "cfg", processor=HOLD))
    command = c_store_command(CT, "1.2.3.4.5.18").replace(b"1.2.3.4.5.18", b"1.2.3.4.5\xe918")
    with associate(adapter.dicom_port) as s:
        s.sendall(p_data(1, command, True) + p_data(1, encode(ct("1.2.3.4.5.18")), False))
        assert read_status(s) == 0xC000
        s.sendall(c_store_bytes(CT, "1.2.3.4.5.19", encode(ct("1.2.3.4.5.19")), message_id=2))
        assert read_status(s) == 0x0000
        assert release(s) == 0x06
    assert len(incoming(adapter)) == 1
    assert "Traceback" not in adapter.log()
    still_serves(adapter, ct_series[:1])
