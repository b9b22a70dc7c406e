"""The link between the receive coordinator and one receive worker: a Unix
stream socket carrying length-prefixed ``marshal`` frames of plain tuples.

Why not `multiprocessing.connection` with pickles: per instance it cost two
reads and a poll per message on each side and a pickled dataclass; here one
``recv`` takes every frame waiting, one ``sendall`` sends a batch, and
``marshal`` (plain tuples, lists, dicts, str, int, float, None, frozenset) is
several times cheaper than pickle. Both ends are our own processes, so
``marshal`` (like pickle before it) is not exposed to peer data.

The socket stays blocking (sends from several threads wait for room, as
before); reads use ``MSG_DONTWAIT`` so a reader takes only what is there.
"""
from __future__ import annotations

import marshal
import select
import socket
import struct
import threading
from typing import Any

HEADER = struct.Struct("!I")
CHUNK = 1 << 18
MAX_FRAME = 64 << 20  # a frame larger than this is a bug on the other side: the link is dropped


class LinkClosed(Exception):
    """The other end closed the link (or sent garbage)."""


class Link:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._send_lock = threading.Lock()
        self.at_eof = False  # the other end closed it (what came before is still returned)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, message: Any) -> None:
        data = marshal.dumps(message)
        frame = HEADER.pack(len(data)) + data
        with self._send_lock:
            self.sock.sendall(frame)

    def send_many(self, messages: list[Any]) -> None:
        """Several messages in one write."""
        parts = []
        for message in messages:
            data = marshal.dumps(message)
            parts.append(HEADER.pack(len(data)))
            parts.append(data)
        frame = b"".join(parts)
        with self._send_lock:
            self.sock.sendall(frame)

    def receive(self) -> list[Any]:
        """Every complete message waiting, without blocking (maybe none); at
        EOF ``at_eof`` turns True. LinkClosed on a broken link or frame."""
        buf = self._buf
        while True:
            try:
                chunk = self.sock.recv(CHUNK, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                raise LinkClosed(str(exc)) from None
            if not chunk:
                self.at_eof = True
                break
            buf += chunk
            if len(chunk) < CHUNK:  # drained: spare the read that would say EAGAIN
                break
        return self._frames()

    def receive_one(self, timeout: float) -> Any:
        """One message, waiting up to ``timeout`` seconds (start-up only);
        TimeoutError, or LinkClosed at EOF."""
        while True:
            messages = self._frames(limit=1)
            if messages:
                return messages[0]
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError("no message on the link")
            chunk = self.sock.recv(CHUNK)
            if not chunk:
                raise LinkClosed("end of link")
            self._buf += chunk

    def _frames(self, limit: int = 0) -> list[Any]:
        buf = self._buf
        out = []
        pos = 0
        size = len(buf)
        with memoryview(buf) as view:  # released before the buffer is trimmed
            while size - pos >= 4:
                (n,) = HEADER.unpack_from(view, pos)
                if n > MAX_FRAME:
                    raise LinkClosed(f"frame of {n} bytes")
                if size - pos - 4 < n:
                    break
                try:
                    out.append(marshal.loads(view[pos + 4:pos + 4 + n]))
                except (ValueError, EOFError, TypeError) as exc:
                    raise LinkClosed(f"bad frame: {exc}") from None
                pos += 4 + n
                if limit and len(out) >= limit:
                    break
        if pos:
            del buf[:pos]
        return out

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
