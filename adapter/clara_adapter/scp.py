"""The DICOM SCP on pynetdicom: C-ECHO, C-STORE for every storage SOP class and
any proposed transfer syntax, association acceptance by our own rules.

pynetdicom is adjusted in three places, all at import of this module:

* acceptance: before pynetdicom negotiates, our policy may reject with the
  exact A-ASSOCIATE-RJ result/source/reason (pynetdicom only knows one AE title);
* TCP_NODELAY on every accepted socket (without it each response waits ~40 ms
  for the peer's delayed ACK);
* socket reads fill one preallocated buffer with ``recv_into`` instead of
  concatenating 4 KiB chunks (the largest cost of receiving big PDUs).
"""
from __future__ import annotations

import logging
import socket
import ssl
import threading
from typing import Any, Callable

from pynetdicom import AE, _config, evt
from pynetdicom.acse import ACSE
from pynetdicom.transport import AssociationSocket
from pynetdicom.sop_class import Verification

from clara_adapter.ingest import CANNOT_UNDERSTAND, Ingest, Route

log = logging.getLogger(__name__)

# Accept every storage SOP class (also private/unknown ones) with the proposed transfer syntax.
_config.UNRESTRICTED_STORAGE_SERVICE = True
# Hand C-STORE handlers the raw dataset bytes; we never decode the pixel data.
_config.STORE_RECV_CHUNKED_DATASET = False

_original_negotiate = ACSE._negotiate_as_acceptor


def _negotiate_as_acceptor(self: ACSE) -> None:
    policy = getattr(self.assoc.ae, "association_policy", None)
    if policy is not None:
        rq = self.requestor.primitive
        self.requestor.ae_title = rq.calling_ae_title
        verdict = policy(self.assoc, rq.called_ae_title, rq.calling_ae_title, self.assoc.requestor.address)
        if verdict is not None:
            self.send_reject(*verdict)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
    _original_negotiate(self)


ACSE._negotiate_as_acceptor = _negotiate_as_acceptor


def _recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    buf = bytearray(nr_bytes)
    view = memoryview(buf)
    got = 0
    sock = self.socket
    while got < nr_bytes:
        n = sock.recv_into(view[got:], nr_bytes - got)
        if not n:
            del view
            return buf[:got]
        got += n
    return buf


AssociationSocket.recv = _recv


class StorageSCP:
    """Binds the DICOM port and routes associations to `Ingest`."""

    def __init__(self, ingest: Ingest, settings: Any, on_association: Callable[[str], None] | None = None):
        self.ingest = ingest
        self.settings = settings
        self.on_association = on_association or (lambda result: None)
        self.server: Any = None
        self._active = 0
        self._lock = threading.Lock()
        ae = self.ae = AE(ae_title="CLARA")
        ae.add_supported_context(Verification)
        ae.maximum_associations = settings.maxAssociations
        ae.maximum_pdu_size = settings.maxPduSize
        ae.acse_timeout = settings.acseTimeout
        ae.dimse_timeout = settings.dimseTimeout
        ae.network_timeout = settings.networkTimeout
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.association_policy = self._policy

    def _policy(self, assoc: Any, called: str, calling: str, address: str) -> tuple[int, int, int] | None:
        verdict = self.ingest.check_association(called, calling, address)
        if verdict is not None:
            rsd, why = verdict
            log.info("association from %s (%s) to %s refused: %s", calling.strip(), address, called.strip(), why)
            self.on_association("rejected")
            return rsd
        assoc.clara_route = self.ingest.routes[called.strip()]
        self.on_association("accepted")
        return None

    # -- event handlers -------------------------------------------------------
    def _on_open(self, event: Any) -> None:
        sock = event.assoc.dul.socket.socket
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with self._lock:
            self._active += 1

    def _on_close(self, event: Any) -> None:
        with self._lock:
            self._active -= 1

    def _on_echo(self, event: Any) -> int:
        return 0x0000

    def _on_store(self, event: Any) -> int:
        route: Route | None = getattr(event.assoc, "clara_route", None)
        if route is None:
            return CANNOT_UNDERSTAND
        rq = event.request
        ts = event.context.transfer_syntax
        dataset = rq.DataSet.getbuffer()
        try:
            return self.ingest.store_instance(
                route, event.assoc.requestor.ae_title, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID, ts,
                dataset,
            )
        finally:
            dataset.release()

    # -- lifecycle ------------------------------------------------------------
    @property
    def active_associations(self) -> int:
        return self._active

    def start(self, host: str, port: int) -> None:
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_OPEN, self._on_open),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        ssl_context = None
        if self.settings.tlsCertFile:
            ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_context.load_cert_chain(self.settings.tlsCertFile, self.settings.tlsKeyFile)
            if self.settings.tlsCaFile:
                ssl_context.load_verify_locations(self.settings.tlsCaFile)
                ssl_context.verify_mode = ssl.CERT_REQUIRED
        self.server = self.ae.start_server((host, port), block=False, evt_handlers=handlers,
                                           ssl_context=ssl_context)

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in progress continue."""
        if self.server is not None:
            self.server.shutdown()  # stops serve_forever and closes the listening socket

    def wait_idle(self, timeout: float) -> bool:
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not [a for a in self.ae.active_associations if a.is_alive()]:
                return True
            time.sleep(0.05)
        return False

    def abort_all(self) -> None:
        for assoc in self.ae.active_associations:
            assoc.abort()
