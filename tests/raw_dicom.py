"""A raw-socket DICOM requestor for hostile-peer tests: it builds exactly the
bytes a peer would send (A-ASSOCIATE-RQ with pynetdicom's PDU classes, P-DATA
by hand) so a test can cut, corrupt or stall them at any byte."""
from __future__ import annotations

import socket
import struct

from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


def encode(ds, implicit: bool = False, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = little, implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def associate_rq(called: str = "CLARA", calling: str = "STORESCU",
                 contexts: list[tuple[str, list[str]]] | None = None, max_pdu: int = 16384) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = calling, called
    cxs = []
    for i, (abstract, syntaxes) in enumerate(contexts or [(CT, [EXPLICIT_LE])]):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * i + 1
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.3.4.5"
    prim.user_information = [ml, ic]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def recv_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """(PDU type, body); (0, b'') when the peer closed the connection."""
    head = recv_exact(sock, 6)
    if len(head) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBI", head)
    return pdu_type, recv_exact(sock, length)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        try:
            chunk = sock.recv(n - len(out))
        except ConnectionResetError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def connect(port: int, timeout: float = 10) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def associate(port: int, **kwargs) -> socket.socket:
    sock = connect(port)
    sock.sendall(associate_rq(**kwargs))
    pdu_type, body = recv_pdu(sock)
    assert pdu_type == 0x02, f"expected A-ASSOCIATE-AC, got PDU type {pdu_type} {body!r}"
    return sock


def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode()
    return raw + b"\0" if len(raw) % 2 else raw


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    body = b"".join((
        _element(0x0002, _ui(sop_class)),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", 0)),
        _element(0x0800, struct.pack("<H", 0x0000)),
        _element(0x1000, _ui(sop_instance)),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


def p_data(context_id: int, data: bytes, command: bool, pdv_max: int = 16000) -> bytes:
    out = []
    for start in range(0, max(len(data), 1), pdv_max):
        piece = data[start:start + pdv_max]
        last = start + pdv_max >= len(data)
        control = (1 if command else 0) | (2 if last else 0)
        pdv = struct.pack(">IBB", len(piece) + 2, context_id, control) + piece
        out.append(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)
    return b"".join(out)


def c_store_bytes(sop_class: str, sop_instance: str, dataset: bytes, context_id: int = 1,
                  message_id: int = 1) -> bytes:
    """The P-DATA-TF PDUs of one C-STORE-RQ (command, then dataset)."""
    return (p_data(context_id, c_store_command(sop_class, sop_instance, message_id), True)
            + p_data(context_id, dataset, False))


def read_status(sock: socket.socket) -> int | None:
    """The Status of the next C-STORE/C-ECHO response, None if the peer aborted or closed."""
    command = b""
    while True:
        pdu_type, body = recv_pdu(sock)
        if pdu_type != 0x04:
            return None
        pos = 0
        last = False
        while pos < len(body):
            length, _, control = struct.unpack_from(">IBB", body, pos)
            command += body[pos + 6:pos + 4 + length]
            last = bool(control & 2)
            pos += 4 + length
        if last:
            break
    pos = 0
    while pos < len(command):
        _, elem, length = struct.unpack_from("<HHI", command, pos)
        if elem == 0x0900:
            return struct.unpack_from("<H", command, pos + 8)[0]
        pos += 8 + length
    return None


def release(sock: socket.socket) -> int:
    sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + b"\0" * 4)
    pdu_type, _ = recv_pdu(sock)
    return pdu_type
