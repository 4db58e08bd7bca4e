"""Order intake: one inbound v2 message → stored, mapped, written, acknowledged.

A new order (ORC-1 NW) becomes a case (``mappings.orders``), a change order (XO) replaces the
order of its case; CA/DC revoke the order and cancel
its Task, HD/RL hold and release both, SC records ORC-5 as the Task's business status
(``mappings.order_control``); an order control for an unknown placer number is answered AE
with ERR 204 (unknown key identifier) at ORC-2.

The message row, the resources its Bundle makes and the ACK are committed in one database
transaction, and the ACK goes back only after that commit (v2.5.1 §2.9.2: the receiver
acknowledges what it has safely stored). A message's key is what identifies its sender (MSH-3,
or MSH-3 and MSH-4: ``mappings.sender.sender_identity``) with MSH-10. A message whose key is
already stored and whose content is the same (``resend_form``) is a resend: it gets the stored
ACK again and changes nothing. One with the same key and other content is not a resend: it is
stored as refused, naming the first, and answered AE with ERR 207 at MSH-10; the first stays as
it was. A message that cannot be parsed is stored as rejected and answered AR (keyed, and so
deduplicated, when its MSH can be read: ``mappings.v2.header``); one whose MSH-3, MSH-4, MSH-9,
MSH-10 or ORC-2 its column cannot hold is answered AE with ERR 102 naming the field
(``store.too_long``); one of a type Overread does not map is stored with its error and answered
AR (ERR 200 or 201); one that cannot be mapped, or whose Bundle the FHIR store refuses, is stored
with its error and answered AE; its resources are not written. A message its sender may not send
from the connection it came on (``refusal``: the allow-lists of docs/security.md) is stored as
refused, without a key, and answered AR with ERR 207. Any other failure is stored by
``failed`` and answered AR with ERR 207, or by ``last_resort`` when nothing can be stored.

An ORU^R01 (the original report from the source RIS) goes the same way, without order control:
its DiagnosticReport is written and answered AA (ACK^R01); the store links it to its case
(``cases.task``).
"""

import logging
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
from sqlalchemy import Connection, Insert, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite

from cases.task import control_case
from fhir_server import conditional, dates
from fhir_server.errors import FhirError
from fhir_server.executor import Executor
from fhir_server.repository import Hook, Repository, Stored
from fhir_server.transaction import transaction
from hl7_bridge.ack import ack_code, acknowledge
from hl7_bridge.store import (
    ERROR,
    KEY_FIELDS,
    PROCESSED,
    RECEIVED,
    REFUSED,
    REJECTED,
    InboundMessage,
    sender_key,
    storable,
    too_long,
)
from mappings.errors import DATA_TYPE_ERROR, INTERNAL_ERROR, UNKNOWN_KEY, MappingError
from mappings.order_control import OrderControl, order_control
from mappings.orders import RESULTS, check_supported, map_message
from mappings.patient import merged
from mappings.sender import SenderConfig, sender_identity, sender_settings
from mappings.sender import Senders as Senders  # api and the results queue take it from here
from mappings.v2 import MAX_SEGMENTS, Message, header, parse
from mappings.vocabulary import ORDER_STATUS

log = logging.getLogger(__name__)
#: Why a message of MSH-3 and MSH-4 is refused from the connection it came on; None: admitted.
Refusal = Callable[[str, str], str | None]
#: The base the Bundle's entries are resolved against: HL7 messages reach no HTTP base.
BASE = "urn:overread:hl7"
_KEY = ("sender_key", "control_id")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# The statements every message runs, built once (building them cost more than running them).
_CLAIM: dict[str, Insert] = {
    name: dialect.insert(InboundMessage).on_conflict_do_nothing(index_elements=_KEY).returning(InboundMessage.pk)
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
}
_OUTCOME = update(InboundMessage).where(InboundMessage.pk == bindparam("message_pk"))


def receive_in(
    conn: Connection,
    raw: bytes,
    senders: Senders | None = None,
    hooks: Sequence[Hook] = (),
    max_segments: int = MAX_SEGMENTS,
    refusal: Refusal | None = None,
) -> bytes:
    """Store, map and write one message in the caller's unit of work; the ACK to send.

    The MLLP listener runs it as a unit of its executor (on SQLite, a savepoint of a write group).
    ``senders`` gives the mapping settings of a sending application and facility (MSH-3, MSH-4);
    ``max_segments``: a message with more is refused (AR) before it is mapped; ``refusal``: one
    from a sender not allowed on this connection is refused (AR) before anything else.
    """
    started = time.perf_counter()
    refused: MappingError | None = None
    try:
        message = parse(raw, max_segments)
    except MappingError as exc:
        head = header(raw)
        if head is None:  # not even its MSH can be read: nothing to key or to echo
            return _reject(conn, raw, exc, started)
        message, refused = head, exc
    if refusal is not None and (reason := refusal(message.msh.field(3).value, message.msh.field(4).value)):
        return _not_allowed(conn, raw, message, reason, started)
    row = _row(raw, message)
    unstorable = too_long(row)
    if unstorable is not None and unstorable[0] in KEY_FIELDS:
        return _reject(conn, raw, _too_long(unstorable), started, message)  # no key to hold it by
    config = sender_settings(message, senders)
    key = sender_key(sender_identity(message, config))
    pk = _claim(conn, storable(row), key)
    if pk is None:
        return _key_taken(conn, raw, message, key, started)
    error = refused or (_too_long(unstorable) if unstorable is not None else None)
    if error is not None:
        return _record(conn, pk, message, REJECTED if refused else ERROR, error, started)
    return _process(Repository(conn, hooks), pk, message, config, started)


def failed(conn: Connection, raw: bytes, exc: Exception) -> bytes:
    """Store a message whose intake failed unexpectedly, with the reason, and return its AR (ERR 207).

    Run in a transaction of its own after the failed one rolled back. The row has no key: the
    failure is the receiver's, so a resend is processed anew rather than answered from this row.
    """
    return _reject(conn, raw, _internal(exc), time.perf_counter(), header(raw))


def last_resort(raw: bytes, exc: Exception) -> bytes:
    """The AR (ERR 207) for a message nothing could be stored for: MSA-2 echoes its MSH-10 when readable."""
    return _ack(header(raw), _internal(exc))


def oversize(head: bytes, limit: int) -> bytes:
    """The AE (ERR 102) for a message larger than the MLLP limit, from its first bytes: MSA-2 echoes its MSH-10.

    Not stored: only its head arrived whole, and the connection drops the rest.
    """
    error = MappingError(DATA_TYPE_ERROR, "", f"The message is larger than {limit} bytes, the most accepted")
    return _ack(header(head.split(b"\r", 1)[0]), error)


def _internal(exc: Exception) -> MappingError:
    # The exception's text may be a database's, with values of other messages: only its type goes out.
    text = f"The message could not be processed ({type(exc).__name__}); it may be sent again"
    return MappingError(INTERNAL_ERROR, "", text, rejects=True)


def _too_long(problem: tuple[str, str]) -> MappingError:
    location, text = problem
    return MappingError(DATA_TYPE_ERROR, location, text)


def _record(conn: Connection, pk: int, message: Message, status: str, error: MappingError, started: float) -> bytes:
    """The outcome of a keyed message refused before its mapping: its status, ACK and reason."""
    ack = _ack(message, error)
    conn.execute(
        _OUTCOME,
        {
            "message_pk": pk, "status": status, "bundle": None, "response": None, "ack": ack,
            "ack_code": ack_code(message, error), "error": str(error),
            "processing_ms": (time.perf_counter() - started) * 1000,
        },
    )  # fmt: skip
    return ack


def replay(executor: Executor, pk: int, senders: Senders | None = None, hooks: Sequence[Hook] = ()) -> bytes | None:
    """Process a stored message again (after its sender's configuration or its case changed).

    The row keeps its key and records the new outcome; the new ACK is returned, not sent:
    the sender had its answer. None when there is no such message.
    """
    started = time.perf_counter()
    with executor.begin() as conn:
        raw = conn.scalar(select(InboundMessage.raw).where(InboundMessage.pk == pk).with_for_update())
        if raw is None:
            return None
        try:
            message = parse(raw)
        except MappingError as exc:
            return _ack(None, exc)
        return _process(Repository(conn, hooks), pk, message, sender_settings(message, senders), started)


def _process(repo: Repository, pk: int, message: Message, config: SenderConfig | None, started: float) -> bytes:
    """Map and write ``message`` in the caller's transaction and record the outcome on its row."""
    mapped: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    error: MappingError | None = None
    # Everything the message writes, in a savepoint: on an error only its row stays.
    savepoint = repo.conn.begin_nested()
    try:
        check_supported(message)  # before order control reads an ORC an ADT never has
        # A result (ORU^R01: the original report) has no order control; it is mapped like a new order.
        control = None if message.message_type in RESULTS else order_control(message, config)
        if control is None or control.code == "XO":
            if control is not None:
                _find_order(repo, control)  # a change order needs its order
            mapped = map_message(message, config)
            _correct_patient(repo, mapped)
            # In the savepoint above, which any error rolls back: the Bundle needs none of its own.
            response = transaction(repo, mapped, BASE, savepoint=False)
        else:
            response = _change_case(repo, control)
        repo.complete()
        savepoint.commit()
    except MappingError as exc:
        savepoint.rollback()
        error = exc
    except FhirError as exc:  # the store refused what the message says: its content is at fault
        savepoint.rollback()
        error = MappingError(DATA_TYPE_ERROR, "", f"The order does not make valid FHIR: {exc}")
    ack = _ack(message, error)
    repo.conn.execute(
        _OUTCOME,
        {
            "message_pk": pk,
            "status": ERROR if error else PROCESSED,
            "bundle": _json(mapped),
            "response": _json(response),
            "ack": ack,
            "ack_code": ack_code(message, error),
            "error": str(error) if error else None,
            "processing_ms": (time.perf_counter() - started) * 1000,
        },
    )
    return ack


def _correct_patient(repo: Repository, mapped: dict[str, Any]) -> None:
    """A patient already stored under the message's patient id is updated by it (demographic corrections,
    ``mappings.patient.merged``: identifiers are only added): its conditional create becomes an update
    of that patient, unless nothing would change, so a resent message still writes nothing."""
    entry = next((e for e in mapped["entry"] if e["resource"]["resourceType"] == "Patient"), None)
    if entry is None or "ifNoneExist" not in entry["request"]:
        return
    found = repo.search("Patient", [*parse_qsl(entry["request"]["ifNoneExist"]), ("_count", "2")])
    if len(found) != 1:
        return  # none: the conditional create makes it; several: the store refuses the ambiguity as before
    # Locked as Repository.update locks (key, then row): two messages correcting one patient at once must
    # not drop each other's identifiers, nor deadlock with an update that takes the same locks.
    repo.lock(f"Patient/{found[0].id}")
    stored = repo.current("Patient", found[0].id, for_update=True)
    if stored is None or stored.content is None:
        return  # deleted meanwhile: the conditional create makes a new one
    update = merged(stored.resource, entry["resource"])
    if update != stored.resource:
        entry["resource"] = update
        entry["request"] = {"method": "PUT", "url": f"Patient/{stored.id}"}


def _change_case(repo: Repository, control: OrderControl) -> dict[str, Any]:
    """Apply CA/DC/HD/RL/SC to the order's ServiceRequest, and through ``control_case`` to its case."""
    order = _find_order(repo, control)
    request_status, task_status = control.statuses
    changed = {}
    if request_status:
        updated, _ = repo.update("ServiceRequest", order.id, {**order.resource, "status": request_status}, order.etag)
        changed["ServiceRequest"] = f"ServiceRequest/{updated.id}/_history/{updated.version}"
    code = control.order_status  # table 0038: where the placer says the order stands
    placer_status = {"coding": [{"system": ORDER_STATUS, "code": code}]} if code else None
    changed |= control_case(repo, order.id, task_status, placer_status)
    return {"orderControl": control.code, "changed": changed}


def _find_order(repo: Repository, control: OrderControl) -> Stored:
    """The ServiceRequest of the message's placer number, or AE 204 (unknown key identifier)."""
    placer = f"{control.placer['system']}|{control.placer['value']}"
    orders = conditional.matches(repo, "ServiceRequest", urlencode({"identifier": placer}))
    if not orders:
        raise MappingError(UNKNOWN_KEY, "ORC-2", f"No order with placer number {control.placer['value']} is known")
    return orders[0]


def _claim(conn: Connection, row: dict[str, Any], key: str) -> int | None:
    """Insert the message's row, or return None when its key is taken (a resend or a conflict).

    ON CONFLICT DO NOTHING: on PostgreSQL a concurrent transaction holding the same key makes
    this one wait for its outcome, so two copies of one message never both go on. A message
    without MSH-10 has no key to take (NULL), so it is never taken for another.
    """
    pk: int | None = conn.execute(_CLAIM[conn.dialect.name], {**row, "sender_key": key, "status": RECEIVED}).scalar()
    return pk


def _row(raw: bytes, message: Message | None) -> dict[str, Any]:
    """The columns every row has; those read from the message only when its MSH could be read."""
    if message is None:
        return {"received_at": dates.now(), "raw": raw}
    msh, orc = message.msh, message.segment("ORC") or message.segment("OBR")
    return {
        "received_at": dates.now(),
        "sending_application": msh.field(3).value,
        "sending_facility": msh.field(4).value,
        "control_id": msh.field(10).value or None,
        "message_type": message.message_type,
        "placer_number": orc.field(2).value if orc is not None else None,
        "raw": raw,
    }


def _not_allowed(conn: Connection, raw: bytes, message: Message, reason: str, started: float) -> bytes:
    """Store a message its sender may not send from here as refused, with ``reason``; its AR (ERR 207).

    Without a key: the same message from where its sender may send is processed, not taken for a
    resend. The ACK says only that the sender is not allowed; where it came from is the operator's.
    """
    error = MappingError(INTERNAL_ERROR, "MSH-3", "The sender is not allowed on this connection", rejects=True)
    ack = _reject(conn, raw, error, started, message, status=REFUSED, stored=f"not allowed: {reason}")
    log.warning("HL7 message refused: %s", reason)
    return ack


def _key_taken(conn: Connection, raw: bytes, message: Message, key: str, started: float) -> bytes:
    """A resend gets the first message's ACK and changes nothing; other content under its key is refused.

    v2.5.1 §2.10.1 lets the receiver drop a duplicate, but a message with the same key and other
    content is no duplicate: dropping it would lose an order. It is stored as refused and answered
    AE with ERR 207 (table 0357, application internal error) at MSH-10: resent unchanged it
    would be refused again; the sender needs a new MSH-10.
    """
    m = InboundMessage
    first = conn.execute(
        select(m.pk, m.raw, m.ack, m.received_at).where(
            m.sender_key == key, m.control_id == message.msh.field(10).value
        )
    ).one()
    if resend_form(first.raw) == resend_form(raw):
        return first.ack or b""
    error = MappingError(
        INTERNAL_ERROR,
        "MSH-10",
        f"MSH-10 {message.msh.field(10).value} was already used by message #{first.pk} received at "
        f"{first.received_at:%Y-%m-%dT%H:%M:%S}Z with other content",
        rejects=False,
    )
    ack = _ack(message, error)
    conn.execute(
        insert(m).values(
            **storable(_row(raw, message)), status=REFUSED, conflict_of=first.pk, ack=ack,
            ack_code=ack_code(message, error), error=str(error), processing_ms=(time.perf_counter() - started) * 1000,
        )
    )  # fmt: skip
    return ack


def resend_form(raw: bytes) -> list[bytes]:
    """A message as compared with the stored one of its key: a resend when the two are equal.

    What may legitimately change when a sender (or an interface engine in between) sends the
    same message again is left out: the segment terminators (CR, LF or CRLF) and blank lines,
    a UTF-8 byte order mark, spaces, tabs and empty fields at the end of a segment, and MSH-7
    (date/time of message, which engines stamp anew on each send). Everything else counts byte
    for byte (another escape, character set or field value is other content): mistaking new
    content for a resend would silently lose it, which is worse than refusing a resend.
    """
    segments = [s.rstrip(b" \t") for s in _LINE_END.split(raw.removeprefix(b"\xef\xbb\xbf"))]
    segments = [s for s in segments if s]
    if not segments or not segments[0].startswith(b"MSH") or len(segments[0]) < 4:
        return segments
    separator = segments[0][3:4]
    msh = segments[0].split(separator)
    if len(msh) > 6:
        msh[6] = b""  # MSH-7: MSH-1 is the separator itself, so MSH-n is item n - 1
    segments[0] = separator.join(msh)
    return [s.rstrip(separator + b" \t") for s in segments]


def _reject(
    conn: Connection,
    raw: bytes,
    error: MappingError,
    started: float,
    message: Message | None = None,
    status: str = REJECTED,
    stored: str | None = None,
) -> bytes:
    """Store a message without a key (its MSH unreadable, a key field unstorable, its sender refused) and answer it.

    The ACK echoes what of the MSH could be read; the row keeps only the values its columns hold, and
    ``stored`` as its error when the operator is owed more than the ACK says.
    """
    ack = _ack(message, error)
    conn.execute(
        insert(InboundMessage).values(
            **storable(_row(raw, message)), status=status, ack=ack, ack_code=ack_code(message, error),
            error=stored or str(error), processing_ms=(time.perf_counter() - started) * 1000,
        )
    )  # fmt: skip
    return ack


def _ack(message: Message | None, error: MappingError | None) -> bytes:
    """An ACK with a control id (MSH-10) of its own."""
    return acknowledge(message, error, control_id=uuid.uuid4().hex[:20], now=dates.now())


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else orjson.dumps(value).decode()
