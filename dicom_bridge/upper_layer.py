"""The DICOM Upper Layer (PS3.8 section 9) for our Storage SCP and our C-GET SCU.

pynetdicom runs every association on two threads that poll each other through queues; for a
C-STORE that costs more CPU than receiving and writing the instance (docs/performance.md). An
acceptor that only stores needs far less: read a PDU (PS3.8 9.3.1), answer the A-ASSOCIATE-RQ
once, then turn P-DATA-TF PDUs into DIMSE messages (PS3.8 9.3.5, Annex E) until the peer
releases or aborts. A C-GET requestor is the same loop from the other end. The association
negotiation itself, the one complex and rare part, is pynetdicom's: its PDU classes encode and
decode the A-ASSOCIATE PDUs, and its ``negotiate_unrestricted`` picks the presentation contexts,
as in pynetdicom's own SCP.
"""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol, cast

from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_unrestricted

from dicom_bridge import command_set
from dicom_bridge.command_set import Command

# PDU types (PS3.8 9.3.1).
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = range(1, 8)
#: PS3.7 Annex A.2.1: the only application context name of DICOM.
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: The maximum length of a P-DATA-TF's variable field we announce (PS3.8 D.1): 4 MiB, so a large
#: image comes in few PDUs. A PDU twice as long is refused (some peers count the length their own
#: way); an A-ASSOCIATE-RQ is a few kB even with 128 presentation contexts.
MAX_PDU = 1 << 22
MAX_ASSOCIATE_RQ = 1 << 20
# Message Control Header of a PDV (PS3.8 E.2): bit 0 command/data set, bit 1 last fragment.
COMMAND, LAST = 0x01, 0x02

# A-ASSOCIATE-RJ (result, source, reason/diag.) of PS3.8 9.3.4 and A-ABORT (source, reason) of 9.3.8.
REJECT_APPLICATION_CONTEXT = (1, 1, 2)
REJECT_PROTOCOL_VERSION = (1, 2, 2)
REJECT_TOO_MANY = (2, 3, 2)
REJECT_CALLING_AE = (1, 1, 3)
#: A-ABORT (source, reason), PS3.8 9.3.8: ours, as the service-user (reason not significant).
ABORT_BY_US = (0, 0)
ABORT_UNRECOGNIZED_PDU = (2, 1)
ABORT_UNEXPECTED_PDU = (2, 2)
ABORT_INVALID_PARAMETER = (2, 6)


class ProtocolError(Exception):
    """The peer broke PS3.8: the association is aborted with ``abort`` (source, reason)."""

    def __init__(self, message: str, abort: tuple[int, int] = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.abort = abort


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class Deadline:
    """Reads from ``sock`` until ``seconds`` from now, in all: the ARTIM timer of PS3.8 9.1.5.

    A socket timeout counts per ``recv``, so a peer sending a byte now and then would never meet
    it; this one ends the whole read, however the bytes come. Past it, :class:`TimeoutError`.
    """

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock, self.end = sock, time.monotonic() + seconds

    def handshake(self) -> None:
        """The TLS handshake, within the deadline, when the socket speaks TLS (PS3.15 B.9)."""
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(max(self.end - time.monotonic(), 0.001))
            self.sock.do_handshake()

    def read(self, size: int, /) -> bytes:
        """Up to ``size`` bytes; fewer only at the end of the stream."""
        data = bytearray()
        while len(data) < size:
            left = self.end - time.monotonic()
            if left <= 0:
                raise TimeoutError("no A-ASSOCIATE-RQ in time (ARTIM)")
            self.sock.settimeout(left)
            chunk = self.sock.recv(min(size - len(data), 1 << 16))
            if not chunk:
                break
            data += chunk
        return bytes(data)


def read_pdu(stream: Readable, limit: int = 2 * MAX_PDU) -> tuple[int, bytes] | None:
    """The next PDU's type and body (the bytes after its 6-byte header); None at the end of the stream."""
    head = stream.read(6)
    if not head:
        return None
    if len(head) < 6:
        raise ProtocolError("the connection closed inside a PDU header", ABORT_UNRECOGNIZED_PDU)
    kind, length = struct.unpack(">B1xI", head)
    if not ASSOCIATE_RQ <= kind <= ABORT:
        raise ProtocolError(f"not a DICOM PDU (type 0x{kind:02X})", ABORT_UNRECOGNIZED_PDU)
    if length > limit:
        raise ProtocolError(f"a PDU of {length} bytes, over the {limit} we take")
    body = stream.read(length)
    if len(body) < length:
        raise ProtocolError("the connection closed inside a PDU", ABORT_UNRECOGNIZED_PDU)
    return kind, body


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">B1xI", kind, len(body)) + body


def abort(source: int, reason: int) -> bytes:
    return pdu(ABORT, bytes((0, 0, source, reason)))


def reject(result: int, source: int, reason: int) -> bytes:
    return pdu(ASSOCIATE_RJ, bytes((0, result, source, reason)))


RELEASE_REQUEST, RELEASE_RESPONSE = pdu(RELEASE_RQ, bytes(4)), pdu(RELEASE_RP, bytes(4))


def command_pdu(context_id: int, command: bytes) -> bytes:
    """A P-DATA-TF of one PDV: a whole command set (PS3.8 9.3.5, E.2), e.g. a response."""
    return pdu(P_DATA_TF, struct.pack(">IBB", len(command) + 2, context_id, COMMAND | LAST) + command)


def response_pdu(request: Message, status: int) -> bytes:
    """The response to a DIMSE request, with ``status`` and no data set, on the request's context."""
    return command_pdu(request.context_id, command_set.response(request.command, status))


@dataclass(frozen=True)
class Association:
    """What an association agreed: who called, and the transfer syntax of each accepted context."""

    calling_ae: str
    contexts: dict[int, tuple[str, UID]]  # context ID -> (abstract syntax, transfer syntax)


def accept(body: bytes, supported: list[str]) -> tuple[Association | None, bytes]:
    """Negotiate an A-ASSOCIATE-RQ's body (PS3.8 9.3.2): the association and the AC, or None and the RJ.

    Every storage SOP class (listed, private or unknown) is accepted in the first transfer
    syntax proposed, so the bytes are kept as the peer sent them; ``supported`` are the other
    abstract syntaxes taken, in any transfer syntax pynetdicom knows.
    """
    request = A_ASSOCIATE_RQ()
    primitive = _decoded(request, ASSOCIATE_RQ, body)
    if not request.protocol_version & 1:
        return None, reject(*REJECT_PROTOCOL_VERSION)
    if request.application_context_name != APPLICATION_CONTEXT:
        return None, reject(*REJECT_APPLICATION_CONTEXT)
    user = primitive.user_information or []
    roles = {
        UID(str(i.sop_class_uid)): (i.scu_role, i.scp_role)
        for i in user
        if isinstance(i, SCP_SCU_RoleSelectionNegotiation)
    }
    contexts, reply_roles = negotiate_unrestricted(
        primitive.presentation_context_definition_list, [build_context(uid) for uid in supported], roles
    )
    answer = A_ASSOCIATE()
    answer.application_context_name = UID(APPLICATION_CONTEXT)
    answer.calling_ae_title, answer.called_ae_title = primitive.calling_ae_title, primitive.called_ae_title
    answer.result, answer.result_source = 0x00, 0x01
    answer.presentation_context_definition_results_list = contexts
    answer.user_information = [_maximum_length(MAX_PDU), *_implementation(), *reply_roles]
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(answer)
    accepted = {cast(int, cx.context_id): _syntaxes(cx) for cx in contexts if cx.result == 0x00}
    return Association(str(primitive.calling_ae_title), accepted), ac.encode()


def request(
    calling_ae: str,
    called_ae: str,
    contexts: list[PresentationContext],
    roles: list[SCP_SCU_RoleSelectionNegotiation],
) -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) proposing ``contexts`` (with their IDs set), with SCP/SCU ``roles``."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = UID(APPLICATION_CONTEXT)
    primitive.calling_ae_title, primitive.called_ae_title = calling_ae, called_ae
    primitive.presentation_context_definition_list = contexts
    primitive.user_information = [_maximum_length(MAX_PDU), *_implementation(), *roles]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return rq.encode()


def accepted(body: bytes, proposed: list[PresentationContext]) -> tuple[Association, int]:
    """The association an A-ASSOCIATE-AC's body agrees to, and the peer's maximum PDU length (0: none)."""
    primitive = _decoded(A_ASSOCIATE_AC(), ASSOCIATE_AC, body)
    abstract = {cx.context_id: str(cx.abstract_syntax) for cx in proposed}
    contexts = {
        cast(int, cx.context_id): (abstract.get(cx.context_id, ""), UID(cx.transfer_syntax[0]))
        for cx in primitive.presentation_context_definition_results_list
        if cx.result == 0x00 and cx.context_id in abstract and cx.transfer_syntax
    }
    user = primitive.user_information or []
    limit = next((i.maximum_length_received for i in user if isinstance(i, MaximumLengthNotification)), 0)
    return Association(str(primitive.calling_ae_title), contexts), int(limit or 0)


def data_pdus(context_id: int, data: bytes, max_pdu: int) -> Iterator[bytes]:
    """A data set as P-DATA-TF PDUs of one PDV each, within the peer's maximum length (PS3.8 D.1)."""
    step = max(max_pdu - 6, 1) if max_pdu else max(len(data), 1)  # 6: the PDV item's length and header
    for start in range(0, max(len(data), 1), step):
        fragment = data[start : start + step]
        control = LAST if start + step >= len(data) else 0
        yield pdu(P_DATA_TF, struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment)


def _decoded(item: A_ASSOCIATE_RQ | A_ASSOCIATE_AC, kind: int, body: bytes) -> A_ASSOCIATE:
    """The primitive of an A-ASSOCIATE-RQ or -AC body, decoded into ``item`` by pynetdicom."""
    try:
        item.decode(pdu(kind, body))
        return item.to_primitive()
    except Exception as exc:  # pynetdicom's decoders raise whatever the bytes provoke
        name = "A-ASSOCIATE-RQ" if kind == ASSOCIATE_RQ else "A-ASSOCIATE-AC"
        raise ProtocolError(f"an {name} that does not decode: {exc}") from exc


def _syntaxes(context: PresentationContext) -> tuple[str, UID]:
    return str(context.abstract_syntax), UID(context.transfer_syntax[0])


def _maximum_length(size: int) -> MaximumLengthNotification:
    item = MaximumLengthNotification()
    item.maximum_length_received = size
    return item


def _implementation() -> tuple[ImplementationClassUIDNotification, ImplementationVersionNameNotification]:
    uid, version = ImplementationClassUIDNotification(), ImplementationVersionNameNotification()
    uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
    return uid, version


#: A command set is a handful of elements (PS3.7 E.1); one this long is not one.
MAX_COMMAND = 1 << 16


class Budget:
    """Bytes of data sets held in memory while they arrive: at most ``per_message`` for one message,
    ``total`` for all the messages sharing this budget (every association of a Storage SCP)."""

    def __init__(self, per_message: int, total: int) -> None:
        self.per_message, self.total = per_message, total
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.total:
                return False
            self.used += size
            return True

    def give(self, size: int) -> None:
        with self._lock:
            self.used -= size


#: What a requestor of our own (C-GET) takes from the PACS it chose: no limit.
UNLIMITED = Budget(1 << 62, 1 << 62)


@dataclass
class Message:
    """A DIMSE message: its command and, when it has one, its data set (still encoded).

    ``too_large``: the data set went over the :class:`Budget`; its fragments were dropped as they
    came, and ``data`` is None.
    """

    context_id: int
    command: Command
    data: bytes | None = None
    too_large: bool = False


@dataclass
class Messages:
    """Reassembles DIMSE messages from the PDVs of P-DATA-TF PDUs (PS3.8 9.3.5, Annex E).

    A message is its command fragments, then, when the command says one follows (PS3.7 E.1,
    Command Data Set Type), its data set fragments, all on one presentation context. The data set
    is held within ``budget``; past it, the rest of its fragments are read and dropped, and the
    message comes out ``too_large`` (answered with a failure status, not memory without end).
    A message's bytes count against the budget until the consumer has handled it.
    """

    contexts: dict[int, tuple[str, UID]]
    budget: Budget = UNLIMITED
    _command: bytearray = field(default_factory=bytearray)
    _data: list[bytes] = field(default_factory=list)
    _pending: Message | None = None  # a complete command whose data set is still arriving
    _held: int = 0  # bytes taken from the budget for the message arriving or being handled

    @property
    def buffered(self) -> int:
        """Bytes of data set fragments held now."""
        return sum(len(f) for f in self._data)

    def feed(self, body: bytes) -> Iterator[Message]:
        """The messages a P-DATA-TF body completes."""
        position = 0
        while position < len(body):
            if position + 6 > len(body):
                raise ProtocolError("a PDV item cut short")
            length, context_id, control = struct.unpack_from(">IBB", body, position)
            end = position + 4 + length
            if length < 2 or end > len(body):
                raise ProtocolError(f"a PDV item of length {length} in a PDU of {len(body)} bytes")
            if context_id not in self.contexts:
                raise ProtocolError(f"a PDV on presentation context {context_id}, which was not accepted")
            fragment = body[position + 6 : end]
            position = end
            if message := self._fragment(context_id, control, fragment):
                try:
                    yield message
                finally:  # the consumer is done with it (or gone): its bytes are free
                    self.release()

    def release(self) -> None:
        """Give back what the current message took from the budget."""
        self.budget.give(self._held)
        self._held = 0

    def _fragment(self, context_id: int, control: int, fragment: bytes) -> Message | None:
        if control & COMMAND:
            if self._pending is not None:
                raise ProtocolError("a command arrived before the data set of the previous one")
            self._command += fragment
            if len(self._command) > MAX_COMMAND:
                raise ProtocolError(f"a command set over {MAX_COMMAND} bytes")
            if not control & LAST:
                return None
            try:
                message = Message(context_id, command_set.decode(self._command))
            except ValueError as exc:
                raise ProtocolError(str(exc)) from exc
            self._command = bytearray()
            if not message.command.has_data:
                return message
            self._pending = message
            return None
        if self._pending is None or self._pending.context_id != context_id:
            raise ProtocolError("a data set fragment without its command")
        self._hold(self._pending, fragment)
        if not control & LAST:
            return None
        message, self._pending = self._pending, None
        if not message.too_large:
            message.data, self._data = b"".join(self._data), []
        return message

    def _hold(self, message: Message, fragment: bytes) -> None:
        if message.too_large:
            return
        size = len(fragment)
        if self._held + size <= self.budget.per_message and self.budget.take(size):
            self._held += size
            self._data.append(fragment)
            return
        message.too_large, self._data = True, []
        self.release()
