"""Our Storage SCP (PS3.4 Annex B) on OVERREAD_DICOM_PORT as OVERREAD_DICOM_AE_TITLE.

It is the destination of our own C-MOVEs and accepts unsolicited pushes (a modality or a
PACS sending a study by itself). Every instance lands in the image store; when an
association ends, however it ends, ``on_received`` hears which studies (Study Instance UID,
accession number) it brought, so a case waiting for one of them can be linked at once.

Each association is served on a thread of its own by :mod:`dicom_bridge.upper_layer`, which
blocks on the socket instead of polling as pynetdicom's two threads per association do
(docs/performance.md, "DICOM: our own upper layer"). Like pynetdicom, a failure to keep one
instance is a failure status for that C-STORE (PS3.4 B.2.3), never the end of the
association; a peer that breaks the protocol gets an A-ABORT saying why.

What it takes at once is bounded (:class:`Limits`): a connection is an association from its
A-ASSOCIATE-RQ on, not from its TCP connect, so idle sockets cannot fill the associations; until
then it has the ARTIM timeout (PS3.8 9.1.5) and a place among a capped number of waiting
connections. One peer address holds only so many of the associations, and an association lasts
only so long: past its time it is aborted wherever it waits. Data sets are held in memory within
one :class:`~dicom_bridge.upper_layer.Budget` shared by all associations, and the image store keeps
a free-space floor: past either, a C-STORE fails with 0xA700 (PS3.4 B.2.3) and nothing grows.

With a TLS context it speaks DICOM TLS (PS3.15 B.9, BCP 195): the handshake counts within the ARTIM
timeout. With ``admits``, a calling AE it does not admit from the peer's address is rejected
(rejected-permanent, calling AE title not recognized: PS3.8 9.3.4).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import socketserver
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from dicom_bridge import audit, command_set
from dicom_bridge.audit import Transfer
from dicom_bridge.command_set import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    CANNOT_UNDERSTAND,
    OUT_OF_RESOURCES,
    RESPONSE,
    SUCCESS,
)
from dicom_bridge.image_store import ImageStore, StoreFull
from dicom_bridge.part10 import Header
from dicom_bridge.upper_layer import (
    ABORT,
    ABORT_BY_US,
    ABORT_UNEXPECTED_PDU,
    ASSOCIATE_RQ,
    MAX_ASSOCIATE_RQ,
    P_DATA_TF,
    REJECT_CALLING_AE,
    REJECT_TOO_MANY,
    RELEASE_RESPONSE,
    RELEASE_RQ,
    Association,
    Budget,
    Deadline,
    Message,
    Messages,
    ProtocolError,
    Readable,
    abort,
    accept,
    read_pdu,
    reject,
    response_pdu,
)
from fhir_server import dates
from fhir_server.audit_log import Pending

log = logging.getLogger(__name__)
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO (PS3.4 Annex A)

#: (Study Instance UID, Accession Number) of each study an association brought.
Received = Callable[[set[tuple[str, str]]], None]
#: Where the SCP's AuditEvents go (``fhir_server.audit_log.AuditLog.record``).
Audit = Callable[[Pending], None]
#: Whether a calling AE title may associate from a peer address.
Admits = Callable[[str, str], bool]


@dataclass(frozen=True)
class Limits:
    """What one Storage SCP takes at once (docs/reliability.md, "DICOM"); the defaults are Settings'."""

    #: Associations at once, counted from their A-ASSOCIATE-RQ; the next is rejected as transient.
    max_associations: int = 32
    #: Connections that have not sent their A-ASSOCIATE-RQ yet; a new one closes the oldest.
    max_pending: int = 64
    #: Seconds a connection has to send its whole A-ASSOCIATE-RQ (ARTIM, PS3.8 9.1.5).
    associate_timeout: float = 10.0
    #: Seconds without a PDU that end an association.
    idle_timeout: float = 60.0
    #: Bytes of one data set held while it arrives; past it the C-STORE fails with 0xA700.
    max_data_set: int = 512 << 20
    #: Bytes of data sets held by all associations together; likewise.
    max_buffered: int = 1 << 30
    #: Associations of one peer address at once, so that one host cannot take them all; likewise rejected.
    max_associations_per_address: int = 16
    #: Seconds an association may last, however busy; then it is aborted.
    max_association_time: float = 3600.0


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
        limits: Limits = Limits(),
        audit: Audit | None = None,
        tls: ssl.SSLContext | None = None,
        admits: Admits | None = None,
    ) -> None:
        self.ae_title, self.address, self.store, self.on_received = ae_title, (host, port), store, on_received
        self.limits, self.audit, self.tls, self.admits = limits, audit, tls, admits
        self.budget = Budget(limits.max_data_set, limits.max_buffered)
        # Connections in the order they came, until their A-ASSOCIATE-RQ; then associations, by peer address.
        self._pending: dict[socket.socket, None] = {}
        self._associations: dict[socket.socket, str] = {}
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
        tls = " (TLS)" if self.tls else ""
        log.info("DICOM Storage SCP %s on %s:%s%s", self.ae_title, self.address[0], self.port, tls)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._server = None
        with self._lock:  # the connections still open end as if their peers had gone
            for sock in [*self._pending, *self._associations]:
                _quietly(sock.shutdown, socket.SHUT_RDWR)

    def __enter__(self) -> StorageScp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def admit(self, sock: socket.socket) -> None:
        """A new connection waits for its A-ASSOCIATE-RQ; over ``max_pending`` the oldest waiting one is closed.

        The oldest rather than the newest: a peer that means to associate sends its A-ASSOCIATE-RQ at
        once, so idle sockets cannot keep it out; they can only shorten each other's wait.
        """
        with self._lock:
            self._pending[sock] = None
            if len(self._pending) <= self.limits.max_pending:
                return
            oldest = next(iter(self._pending))
            del self._pending[oldest]
        _quietly(oldest.shutdown, socket.SHUT_RDWR)

    def forget(self, sock: socket.socket) -> None:
        """``sock`` is closed or about to be: neither waiting nor an association."""
        with self._lock:
            self._pending.pop(sock, None)
            self._associations.pop(sock, None)

    def serve(self, sock: socket.socket, host: str, port: int) -> None:
        """One connection, from its A-ASSOCIATE-RQ to its release, abort or lost connection."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, int(self.nodelay))
        studies: set[tuple[str, str]] = set()
        peer = f"{host}:{port}"
        transfer = Transfer("", host)
        try:
            self._associate(sock, host, peer, studies, transfer)
        except ProtocolError as exc:
            log.warning("DICOM peer %s broke the protocol: %s; association aborted", peer, exc)
            _quietly(sock.sendall, abort(*exc.abort))
        except ssl.SSLError as exc:  # one OSError worth a line: a peer without the certificate we ask for
            log.info("DICOM peer %s: TLS failed (%s)", peer, exc.reason or exc)
        except OSError as exc:  # a timeout, a reset: the peer is gone, and so is the association
            # Before an association there is nothing to tell, and idle sockets may come by the thousand.
            level = logging.INFO if sock in self._associations else logging.DEBUG
            log.log(level, "DICOM peer %s: the connection ended (%s)", peer, exc)
        finally:
            self.forget(sock)
            self._ended(studies)
            if self.audit is not None and (transfer.kept or transfer.failed):
                self.audit(partial(transfer.event, dates.now()))

    def _associate(
        self, sock: socket.socket, host: str, peer: str, studies: set[tuple[str, str]], transfer: Transfer
    ) -> None:
        artim = Deadline(sock, self.limits.associate_timeout)
        artim.handshake()
        first = read_pdu(artim, MAX_ASSOCIATE_RQ)
        if first is None:
            return  # a port probe, or a connection closed for a newer one (admit)
        if first[0] != ASSOCIATE_RQ:
            raise ProtocolError(f"PDU type 0x{first[0]:02X} before an A-ASSOCIATE-RQ", ABORT_UNEXPECTED_PDU)
        sock.settimeout(self.limits.idle_timeout)  # not what was left of the ARTIM, for the answer too
        association, answer = accept(first[1], [VERIFICATION])
        transfer.calling_ae = calling_ae(first[1])  # also of an A-ASSOCIATE-RQ we could not accept
        refusal = None if association is not None else "the A-ASSOCIATE-RQ was not acceptable (PS3.8 9.3.4)"
        if association is not None and not self._admitted(association.calling_ae, host):
            log.warning("DICOM association of %s from %s rejected: not on the allow-list", association.calling_ae, peer)
            association, answer = None, reject(*REJECT_CALLING_AE)
            refusal = "the calling AE title is not on the allow-list from this address"
        if association is not None and (full := self._associated(sock, host)):
            log.warning("DICOM association of %s from %s rejected: %s", association.calling_ae, peer, full)
            association, answer, refusal = None, reject(*REJECT_TOO_MANY), full
        if self.audit is not None:
            self.audit(partial(audit.association, transfer.calling_ae, host, refusal, dates.now()))
        sock.sendall(answer)
        if association is None:
            return
        stream, messages = sock.makefile("rb"), Messages(association.contexts, self.budget)
        expired = threading.Event()
        timer = threading.Timer(self.limits.max_association_time, _expire, (sock, expired))
        timer.daemon = True
        timer.start()
        try:
            self._exchange(sock, stream, association, messages, studies, transfer)
        except (ProtocolError, OSError):
            if not expired.is_set():
                raise
        finally:  # a data set cut off by an abort or a lost connection holds the budget no longer
            timer.cancel()
            messages.release()
        if expired.is_set():
            limit = self.limits.max_association_time
            log.warning("DICOM association of %s from %s aborted: open for %s s", association.calling_ae, peer, limit)
            _quietly(sock.sendall, abort(*ABORT_BY_US))

    def _admitted(self, calling_ae: str, host: str) -> bool:
        return self.admits is None or self.admits(calling_ae, host)

    def _associated(self, sock: socket.socket, host: str) -> str | None:
        """Count ``sock`` as an association of ``host``, if there is room for one more; else the limit
        it would pass, and it is rejected (PS3.8 9.3.4)."""
        with self._lock:
            self._pending.pop(sock, None)
            if len(self._associations) >= self.limits.max_associations:
                return f"{self.limits.max_associations} associations at once"
            if sum(other == host for other in self._associations.values()) >= self.limits.max_associations_per_address:
                return f"{self.limits.max_associations_per_address} associations of {host} at once"
            self._associations[sock] = host
            return None

    def _exchange(
        self,
        sock: socket.socket,
        stream: Readable,
        association: Association,
        messages: Messages,
        studies: set[tuple[str, str]],
        transfer: Transfer,
    ) -> None:
        """The DIMSE messages of an association, until the peer releases or aborts it."""
        while (pdu := read_pdu(stream)) is not None:
            kind, body = pdu
            if kind == P_DATA_TF:
                for message in messages.feed(body):
                    if (status := self._status(association, message, studies, transfer)) is not None:
                        sock.sendall(response_pdu(message, status))
            elif kind == RELEASE_RQ:
                sock.sendall(RELEASE_RESPONSE)
                return
            elif kind == ABORT:
                return
            else:
                raise ProtocolError(f"PDU type 0x{kind:02X} inside an association", ABORT_UNEXPECTED_PDU)

    def _status(
        self, association: Association, message: Message, studies: set[tuple[str, str]], transfer: Transfer
    ) -> int | None:
        """The status to answer ``message`` with (PS3.7 9.1), or None for what has no answer."""
        command = message.command
        if command.field == C_STORE_RQ and (message.data is not None or message.too_large):
            _, syntax = association.contexts[message.context_id]
            status, found = c_store(self.store, message, syntax, association.calling_ae)
            if found is not None:
                studies.add((found.study_uid, found.accession))
                transfer.kept[found.study_uid] += 1
            else:
                transfer.failed += 1
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


def calling_ae(associate_rq: bytes) -> str:
    """The Calling AE Title of an A-ASSOCIATE-RQ's body (PS3.8 9.3.2: its bytes 21-36)."""
    return associate_rq[20:36].decode("ascii", "replace").strip()


def c_store(store: ImageStore, message: Message, syntax: str, peer: str) -> tuple[int, Header | None]:
    """Keep a C-STORE-RQ's instance in ``store``: the status to answer (PS3.4 B.2.3) and its header."""
    command = message.command
    if message.too_large:
        log.warning("C-STORE of %r from %s refused: its data set is over the bytes we hold", command.sop_instance, peer)
        return OUT_OF_RESOURCES, None
    try:
        return SUCCESS, store.keep(message.data or b"", command.sop_class, command.sop_instance, syntax)
    except ValueError as exc:
        log.warning("C-STORE of %r from %s refused: %s", command.sop_instance, peer, exc)
        return CANNOT_UNDERSTAND, None
    except StoreFull as exc:
        log.warning("C-STORE of %r from %s refused: %s", command.sop_instance, peer, exc)
        return OUT_OF_RESOURCES, None
    except Exception:
        log.exception("could not store %r from %s", command.sop_instance, peer)
        return OUT_OF_RESOURCES, None


#: accept() errors of a process (or system) out of descriptors or memory: they pass when connections close.
STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
STARVED_PAUSE = 0.1


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False  # stop() ends the open associations itself
    request_queue_size = 128  # a C-MOVE of many series may open associations in a burst
    starved = False  # accept() is failing for want of file descriptors

    def __init__(self, address: tuple[str, int], scp: StorageScp) -> None:
        self.scp = scp
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, object]:
        """The next connection; out of descriptors, a pause and one log line rather than a busy loop.

        socketserver drops a failed accept() silently and selects again at once: with no descriptor left
        the listening socket stays readable, so its thread would spin until one is freed.
        """
        try:
            sock, address = super().get_request()
        except OSError as exc:
            if exc.errno in STARVED:
                self._starving(exc)
            raise
        if self.starved:
            self.starved = False
            log.warning("DICOM Storage SCP accepts connections again")
        if self.scp.tls is not None:  # the handshake waits for the connection's own thread (serve)
            try:
                sock = self.scp.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            except OSError:
                sock.close()
                raise
        return sock, address

    def _starving(self, exc: OSError) -> None:
        if not self.starved:
            self.starved = True
            log.warning("DICOM Storage SCP cannot accept a connection (%s); trying every %s s", exc, STARVED_PAUSE)
        time.sleep(STARVED_PAUSE)

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        self.scp.admit(request)  # before its thread: the cap holds however fast connections come
        super().process_request(request, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        """A connection that could not be served (no thread to start): one line, not a traceback each."""
        log.warning("DICOM Storage SCP could not serve %s: %s", client_address, sys.exc_info()[1])
        if isinstance(request, socket.socket):
            self.scp.forget(request)


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        host, port = self.client_address[:2]
        self.server.scp.serve(self.request, host, port)


def _expire(sock: socket.socket, expired: threading.Event) -> None:
    """An association past its time: the thread serving it finds the end of its stream, wherever it
    waits (a socket timeout counts per read, and a busy peer never meets one), and aborts it."""
    expired.set()
    _quietly(sock.shutdown, socket.SHUT_RD)


def _quietly(call: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(OSError):  # the socket is gone already
        call(*args)
