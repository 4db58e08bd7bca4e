"""Our Storage SCP (PS3.4 Annex B) on OVERREAD_DICOM_PORT as OVERREAD_DICOM_AE_TITLE.

It is the destination of our own C-MOVEs and accepts unsolicited pushes (a modality or a
PACS sending a study by itself). Every instance lands in the image store; when an
association ends, however it ends, ``on_received`` hears which studies (Study Instance UID,
accession number) it brought, so a case waiting for one of them can be linked at once.

Each association is served on a thread of its own by :mod:`dicom_bridge.upper_layer`, which
blocks on the socket instead of polling as pynetdicom's two threads per association do: that
cut the CPU of a C-MOVE to a third (docs/performance.md). Like pynetdicom, a failure to keep one
instance is a failure status for that C-STORE (PS3.4 B.2.3), never the end of the
association; a peer that breaks the protocol gets an A-ABORT saying why.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from collections.abc import Callable

from dicom_bridge import command_set
from dicom_bridge.command_set import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    RESPONSE,
    SUCCESS,
)
from dicom_bridge.image_store import ImageStore
from dicom_bridge.part10 import Header
from dicom_bridge.upper_layer import (
    ABORT,
    ABORT_UNEXPECTED_PDU,
    ASSOCIATE_RQ,
    MAX_ASSOCIATE_RQ,
    P_DATA_TF,
    REJECT_TOO_MANY,
    RELEASE_RESPONSE,
    RELEASE_RQ,
    Association,
    Message,
    Messages,
    ProtocolError,
    abort,
    accept,
    read_pdu,
    reject,
    response_pdu,
)

log = logging.getLogger(__name__)
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO (PS3.4 Annex A)

#: (Study Instance UID, Accession Number) of each study an association brought.
Received = Callable[[set[tuple[str, str]]], None]


class StorageScp:
    #: TCP_NODELAY on every association (see :mod:`dicom_bridge.tuning`); off only to measure what it buys.
    nodelay = True

    def __init__(
        self,
        ae_title: str,
        host: str,
        port: int,
        store: ImageStore,
        on_received: Received | None = None,
        *,
        timeout: float = 60.0,
        max_associations: int = 32,
    ) -> None:
        self.ae_title, self.address, self.store, self.on_received = ae_title, (host, port), store, on_received
        self.timeout, self.max_associations = timeout, max_associations
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> StorageScp:
        self._server = _Server(self.address, self)
        name = f"storage-scp-{self.port}"
        # Polled every 50 ms for stop(): socketserver's 0.5 s would be the slowest part of a test.
        threading.Thread(target=self._server.serve_forever, args=(0.05,), name=name, daemon=True).start()
        log.info("DICOM Storage SCP %s on %s:%s", self.ae_title, self.address[0], self.port)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:  # the associations still open end as if their peers had gone
            for sock in self._open:
                _quietly(sock.shutdown, socket.SHUT_RDWR)

    def __enter__(self) -> StorageScp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve(self, sock: socket.socket, peer: str) -> None:
        """One association, from its A-ASSOCIATE-RQ to its release, abort or lost connection."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.nodelay))
        sock.settimeout(self.timeout)
        with self._lock:
            self._open.add(sock)
            busy = len(self._open) > self.max_associations
        studies: set[tuple[str, str]] = set()
        try:
            self._associate(sock, busy, studies)
        except ProtocolError as exc:
            log.warning("DICOM peer %s broke the protocol: %s; association aborted", peer, exc)
            _quietly(sock.sendall, abort(*exc.abort))
        except OSError as exc:  # a timeout, a reset: the peer is gone, and so is the association
            log.info("DICOM peer %s: the connection ended (%s)", peer, exc)
        finally:
            with self._lock:
                self._open.discard(sock)
            self._ended(studies)

    def _associate(self, sock: socket.socket, busy: bool, studies: set[tuple[str, str]]) -> None:
        stream = sock.makefile("rb")
        first = read_pdu(stream, MAX_ASSOCIATE_RQ)
        if first is None:
            return  # a port probe
        if first[0] != ASSOCIATE_RQ:
            raise ProtocolError(f"PDU type 0x{first[0]:02X} before an A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU)
        association, answer = accept(first[1], [VERIFICATION])
        if association is not None and busy:
            association, answer = None, reject(*REJECT_TOO_MANY)
        sock.sendall(answer)
        if association is None:
            return
        messages = Messages(association.contexts)
        while (pdu := read_pdu(stream)) is not None:
            kind, body = pdu
            if kind == P_DATA_TF:
                for message in messages.feed(body):
                    if (status := self._status(association, message, studies)) is not None:
                        sock.sendall(response_pdu(message, status))
            elif kind == RELEASE_RQ:
                sock.sendall(RELEASE_RESPONSE)
                return
            elif kind == ABORT:
                return
            else:
                raise ProtocolError(f"PDU type 0x{kind:02X} inside an association", ABORT_UNEXPECTED_PDU)

    def _status(self, association: Association, message: Message, studies: set[tuple[str, str]]) -> int | None:
        """The status to answer ``message`` with (PS3.7 9.1), or None for what has no answer."""
        command = message.command
        if command.field == C_STORE_RQ and message.data is not None:
            _, syntax = association.contexts[message.context_id]
            status, found = c_store(self.store, message, syntax, association.calling_ae)
            if found is not None:
                studies.add((found.study_uid, found.accession))
            return status
        if command.field == C_ECHO_RQ:
            return SUCCESS
        if command.field == C_CANCEL_RQ or command.field & RESPONSE:
            return None  # nothing of ours to cancel or to be answered
        return command_set.UNRECOGNIZED_OPERATION

    def _ended(self, studies: set[tuple[str, str]]) -> None:
        if studies and self.on_received is not None:
            try:
                self.on_received(studies)
            except Exception:  # a failed wake-up must not take the SCP down; the job retries anyway
                log.exception("could not wake the cases waiting for %s", sorted(studies))


def c_store(store: ImageStore, message: Message, syntax: str, peer: str) -> tuple[int, Header | None]:
    """Keep a C-STORE-RQ's instance in ``store``: the status to answer (PS3.4 B.2.3) and its header."""
    command = message.command
    try:
        return SUCCESS, store.keep(message.data or b"", command.sop_class, command.sop_instance, syntax)
    except ValueError as exc:
        log.warning("C-STORE of %r from %s refused: %s", command.sop_instance, peer, exc)
        return CANNOT_UNDERSTAND, None
    except Exception:
        log.exception("could not store %r from %s", command.sop_instance, peer)
        return OUT_OF_RESOURCES, None


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False  # stop() ends the open associations itself

    def __init__(self, address: tuple[str, int], scp: StorageScp) -> None:
        self.scp = scp
        super().__init__(address, _Handler)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        host, port = self.client_address[:2]
        self.server.scp.serve(self.request, f"{host}:{port}")


def _quietly(call: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(OSError):  # the socket is gone already
        call(*args)
