"""The coordinator<->worker link (`worker_link.Link`) over a real Unix socket
pair: frames split at any byte arrive whole, several frames sent in one write
come out in order, what was sent before the other end closed is still
delivered, and a corrupt or oversized frame breaks the link instead of
allocating or crashing."""
from __future__ import annotations

import socket
import struct

import pytest

from clara_adapter.worker_link import MAX_FRAME, Link, LinkClosed

COMMIT = ("commit", [(7, 3, ".tmp-wabc-12-xyz", ("STORESCU", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.2",
                                                  "1.2.840.10008.1.2.1", "1.2.3", "1.2.3.1", "abc.dcm", 10240,
                                                  {0x0020000D: "1.2.3"}))])
ADMITTED = ("reply", 1, ("ok", 5, {"owner": "clara", "tags": frozenset({0x0020000D}),
                                   "allowed_sources": frozenset(), "ignored_sop_classes": frozenset({"1.2"})}))


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    yield Link(a), Link(b)
    a.close()
    b.close()


def test_a_batch_sent_in_one_write_arrives_whole_and_in_order(pair):
    left, right = pair
    left.send_many([COMMIT, ADMITTED, ("closed", 5)])
    assert right.receive() == [COMMIT, ADMITTED, ("closed", 5)]
    assert right.receive() == []  # nothing more waiting: no block


def test_a_frame_split_at_every_byte_is_delivered_once_complete(pair):
    left, right = pair
    import marshal

    data = marshal.dumps(COMMIT)
    frame = struct.pack("!I", len(data)) + data
    got = []
    for i in range(len(frame)):
        left.sock.sendall(frame[i:i + 1])
        got += right.receive()
        assert got == ([] if i < len(frame) - 1 else [COMMIT])


def test_messages_sent_before_the_peer_closed_are_still_read(pair):
    left, right = pair
    left.send(COMMIT)
    left.send(("closed", 3))
    left.sock.close()
    got = right.receive()
    got += right.receive()  # the socket stays readable at EOF: the next read sees it
    assert got == [COMMIT, ("closed", 3)]
    assert right.at_eof


def test_receive_one_waits_for_a_message_and_times_out(pair):
    left, right = pair
    with pytest.raises(TimeoutError):
        right.receive_one(0.05)
    left.send({"dicomPort": 104, "fsyncFiles": False})
    assert right.receive_one(1) == {"dicomPort": 104, "fsyncFiles": False}
    left.sock.close()
    with pytest.raises(LinkClosed):
        right.receive_one(1)


def test_an_oversized_frame_header_breaks_the_link_without_allocating(pair):
    left, right = pair
    left.sock.sendall(struct.pack("!I", MAX_FRAME + 1) + b"x" * 16)
    with pytest.raises(LinkClosed, match="frame of"):
        right.receive()


def test_a_corrupt_frame_breaks_the_link(pair):
    left, right = pair
    left.sock.sendall(struct.pack("!I", 3) + b"\xff\xff\xff")
    with pytest.raises(LinkClosed, match="bad frame"):
        right.receive()


def test_large_batches_pass_through_the_socket_buffer(pair):
    """More than one socket buffer of frames: the reader gets all of them, in order."""
    import select
    import threading

    left, right = pair
    batch = [("commit", [(i, 1, f".tmp-{i}", COMMIT[1][0][3])]) for i in range(5000)]
    sender = threading.Thread(target=left.send_many, args=(batch,))
    sender.start()
    got = []
    while len(got) < len(batch):
        assert select.select([right.sock], [], [], 5)[0], "the sender stalled"
        got += right.receive()
    sender.join(5)
    assert got == batch
