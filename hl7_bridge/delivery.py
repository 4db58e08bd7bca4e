"""Results delivered as ORU^R01 over MLLP, reliably (docs/delivery.md).

Two kinds of worker share the outbound message store (``hl7_bridge.outbound``):

- **Queueing** claims the ``result`` outbox rows that second-opinion reports leave
  (``fhir_server.results``), gathers the report version's ORU context, chooses the destinations
  (those of the ordering facility, MSH-4 of the order, else the default ones: ``sending_facility``
  ""), builds one ORU^R01 per destination with a fresh MSH-10, stores it ``queued`` and completes
  the outbox row: one transaction. The unique key (destination, report, version, sequence) means a
  second run for the same version (a crash, another server process) builds nothing twice. A version
  waits while an earlier version of the same report is still to be queued (being retried, or in
  another process), so the queue has a report's versions in order.
- **Sending**, one loop per destination, sends that destination's queue strictly oldest first:
  the head of the queue is leased (compare-and-set on ``available_at``, so two processes never
  send at once), sent over MLLP outside any transaction, and its ACK judged: AA (or CA) = sent;
  AE, AR, a malformed ACK, no ACK within ``ack_timeout_seconds``, a refused or dropped connection
  = ``error``, tried again after a backoff (the same row, the same MSH-10, so a receiver can tell a
  resend) until ``max_attempts``, then ``dead``: the dead-letter list. The queue waits behind a
  message that is being retried (order is kept); a dead one no longer holds it up.

Nothing is dropped in silence: a result that cannot become a message (no usable PID-3, a mapping
error, a deleted report) is a ``failed`` row per destination with the reason, and one that no
destination wants (none configured for its facility, no default) a ``failed`` row for
``NO_DESTINATION``; ``replay`` rebuilds a failed row from the data as it is now.

Each outcome is one transaction that also shows the delivery on the case: the Task gets a
``result-delivery`` extension per destination and report version, updated only when it changes,
and once the case is completed, a businessStatus that follows delivery (``case_delivery_status``).

A sender that dies after the receiver's ACK but before recording it sends the message again, with
the same MSH-10, when its lease runs out: at least once on the wire, once per MSH-10 at a receiver
that drops duplicates (v2.5.1 §2.10.1), as ours does.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import orjson
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from fhir_server import cases, dates, outbox, search
from fhir_server.db import Database
from fhir_server.errors import FhirError
from fhir_server.outbox import Backoff
from fhir_server.repository import Hook, Repository
from fhir_server.results import RESULT
from fhir_server.schema import OutboxRow
from hl7_bridge import mllp
from hl7_bridge.intake import Senders
from hl7_bridge.oru_context import load_context
from hl7_bridge.outbound import DEAD, ERROR, FAILED, NO_DESTINATION, PENDING, QUEUED, SENT, OutboundMessage
from mappings.bundle_builder import message_sender
from mappings.errors import MappingError
from mappings.oru_r01 import RESULT_STATUS, Envelope, OruContext, oru_r01
from mappings.v2 import parse

log = logging.getLogger(__name__)

ORU_R01 = "ORU^R01"
#: The Task extension that shows each delivery of the case's results.
DELIVERY_EXTENSION = "https://overread.org/fhir/StructureDefinition/result-delivery"
ACCEPTED = ("AA", "CA")
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")


class DestinationConfig(Protocol):
    """A destination of OVERREAD_CONFIG (``overread.config.Destination`` has this shape)."""

    @property
    def name(self) -> str: ...
    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def sending_facility(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def ack_timeout_seconds(self) -> float: ...
    @property
    def receiving_application(self) -> str: ...
    @property
    def receiving_facility(self) -> str: ...
    @property
    def send_preliminary(self) -> bool: ...


#: An EHR's MLLP receiver is retried for about 3 hours: 5 s doubling to 10 min, 24 times.
DEFAULT_BACKOFF = Backoff(24, timedelta(seconds=5), timedelta(minutes=10))


def local_now() -> datetime:
    """Now, aware, in the server's time zone (MSH-7). ``dates.now()`` is naive UTC: ``.astimezone()``
    alone would take it for local time."""
    return dates.now().replace(tzinfo=UTC).astimezone()


def new_control_id() -> str:
    """A fresh MSH-10: 20 characters (the v2.5.1 length of ST MSH-10), unique."""
    return "OVR" + uuid.uuid4().hex[:17].upper()


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: the ACK code (None when there was no usable ACK), the error, the ACK."""

    ack_code: str | None
    error: str | None
    ack: bytes | None = None

    @property
    def sent(self) -> bool:
        return self.error is None


class NotReplayable(Exception):
    """A replay that is refused (nothing is written): the message is still queued, or the result
    still cannot go out."""


@dataclass(frozen=True)
class Result:
    """A report version to deliver: the report, its version, its order (case) and its status."""

    report_id: str
    version: int
    order_id: str
    status: str


@dataclass(frozen=True)
class Gathered:
    """What a result is made of: its ORU context, else why there is none; the ordering system (MSH-3, MSH-4)."""

    result: Result
    context: OruContext | None
    problem: str | None
    origin: tuple[str, str] | None


def judge(ack: bytes, control_id: str) -> Outcome:
    """An ACK's verdict: AA/CA = sent; AE/AR/CE/CR or an ACK that is not one of ours = an error to retry."""
    try:
        message = parse(ack)
        msa = message.segment("MSA")
    except Exception as exc:  # whatever the parser refuses is a malformed ACK
        return Outcome(None, f"malformed ACK: {exc}", ack)
    if msa is None:
        return Outcome(None, "malformed ACK: no MSA segment", ack)
    code, acked = msa.field(1).value, msa.field(2).value
    if code not in ACK_CODES:
        return Outcome(None, f"malformed ACK: MSA-1 {code!r} is not an acknowledgment code", ack)
    if acked != control_id:
        return Outcome(None, f"malformed ACK: MSA-2 {acked!r} is not this message's MSH-10 {control_id!r}", ack)
    if code in ACCEPTED:
        return Outcome(code, None, ack)
    err = message.segment("ERR")
    reason = msa.field(3).value or (err.field(8).value or err.field(3).component(2) if err else "")
    return Outcome(code, f"{code}{': ' + reason if reason else ''}", ack)


def exchange(destination: DestinationConfig, raw: bytes, control_id: str) -> Outcome:
    """Send one message and wait for its ACK (one connection, ``ack_timeout_seconds`` for all of it)."""
    timeout = destination.ack_timeout_seconds
    try:
        ack = asyncio.run(mllp.send(destination.host, destination.port, raw, timeout=timeout))
    except TimeoutError:
        return Outcome(None, f"no ACK within {timeout:g} s")
    except mllp.MllpConnectionClosedError:
        return Outcome(None, "the receiver closed the connection before an ACK")
    except OSError as exc:
        return Outcome(None, f"cannot reach {destination.host}:{destination.port}: {exc.strerror or exc}")
    except Exception as exc:  # e.g. a reply larger than the frame limit: an error to retry, not a lost row
        return Outcome(None, f"{type(exc).__name__}: {exc}")
    return judge(ack, control_id)


class Delivery:
    """The queueing worker and one sending worker per destination, on one database."""

    def __init__(
        self,
        db: Database,
        destinations: Sequence[DestinationConfig],
        backoff: Backoff = DEFAULT_BACKOFF,
        hooks: Sequence[Hook] = (),
        senders: Senders | None = None,
        lease: timedelta = outbox.LEASE,
    ) -> None:
        self.db, self.destinations, self.backoff, self.hooks = db, list(destinations), backoff, hooks
        self.senders, self.lease = senders, lease
        self.by_name = {d.name: d for d in self.destinations}

    # -- the loops ------------------------------------------------------------------------

    def start(self, stop: threading.Event, poll: float = 1.0) -> list[threading.Thread]:
        """The queueing loop and a sending loop per destination, each on a daemon thread of its own."""
        threads = [threading.Thread(target=self.run_queue, args=(stop, poll), name="results-queue", daemon=True)]
        threads += [
            threading.Thread(target=self.run_destination, args=(stop, d.name, poll), name=f"oru-{d.name}", daemon=True)
            for d in self.destinations
        ]
        for thread in threads:
            thread.start()
        return threads

    def run_queue(self, stop: threading.Event, poll: float = 1.0) -> None:
        while not stop.is_set():
            try:
                if self.queue_once():
                    continue
            except Exception:  # a database hiccup must not end the worker
                log.exception("results queueing worker")
            stop.wait(poll)

    def run_destination(self, stop: threading.Event, name: str, poll: float = 1.0) -> None:
        while not stop.is_set():
            try:
                if self.send_once(name):
                    continue
            except Exception:
                log.exception("ORU^R01 sender for %s", name)
            stop.wait(poll)

    # -- queueing -------------------------------------------------------------------------

    def queue_once(self) -> int:
        """Claim due ``result`` rows and build their messages; how many rows there were."""
        with self.db.transaction() as session:
            rows = [(r.pk, r.resource_id, r.resource_version) for r in outbox.claim(session, RESULT, lease=self.lease)]
        for pk, report_id, version in rows:
            if self._behind_earlier_version(pk, report_id):
                continue
            try:
                self._queue(pk, report_id, version)
            except Exception as exc:  # a database hiccup: the row is tried again (what cannot be sent is a failed row)
                log.exception("queueing DiagnosticReport/%s/_history/%s", report_id, version)
                with self.db.transaction() as session:
                    attempts = session.get_one(OutboxRow, pk).attempts
                    delay = self.backoff.delay(attempts)
                    reason = f"{type(exc).__name__}: {exc}"
                    if not outbox.retry(session, pk, reason, delay, self.backoff.max_attempts):
                        _given_up(session, self.hooks, pk, reason)
        return len(rows)

    def _behind_earlier_version(self, pk: int, report_id: str) -> bool:
        """Whether an earlier version of the report is still to be queued (being retried, or claimed by
        another process): then this one waits until that one is due again, its claim not counted as an
        attempt, so a correction is never queued before the report it corrects."""
        with self.db.transaction() as session:
            earlier = session.scalar(
                select(OutboxRow.available_at)
                .where(
                    OutboxRow.topic == RESULT,
                    OutboxRow.resource_id == report_id,
                    OutboxRow.status == outbox.PENDING,
                    OutboxRow.pk < pk,
                )
                .order_by(OutboxRow.pk)
                .limit(1)
            )
            if earlier is None:
                return False
            row = session.get_one(OutboxRow, pk)
            row.attempts -= 1
            row.available_at = max(earlier, dates.now())
            return True

    def _queue(self, pk: int, report_id: str, version: int) -> None:
        """One message per destination of the report version, or a ``failed`` row saying why there is none."""
        with self.db.transaction() as session:
            repo = Repository(session, self.hooks)
            gathered = self.gather(repo, _result_of(session.get_one(OutboxRow, pk)))
            made: list[OutboundMessage] = []
            for destination in self.targets(gathered):
                name = destination.name if destination else NO_DESTINATION
                if message_of(session, name, gathered.result, 0) is None:
                    made.append(self.build(gathered, destination))
            session.add_all(made)
            session.flush()
            outbox.complete(session, pk)
            if made and gathered.result.order_id:
                show_on_case(session, self.hooks, gathered.result.order_id, made)
            repo.complete()
        for row in made:
            log.log(logging.WARNING if row.status == FAILED else logging.INFO, "ORU^R01 for %s to %s: %s",
                    report_ref(row), row.destination, row.last_error or f"queued, MSH-10 {row.control_id}")  # fmt: skip

    # -- what a report version becomes ----------------------------------------------------

    def gather(self, repo: Repository, result: Result) -> Gathered:
        """The ORU context of the report version (or why there is none) and the ordering system."""
        try:
            context: OruContext | None = load_context(repo, result.report_id, result.version)
            problem = None
        except FhirError as exc:  # deleted, not basedOn an order, no patient: no retry will change that
            context, problem = None, sentence(str(exc))
        if context is not None:
            order_id = str(context.order.get("id") or result.order_id)
            result = Result(result.report_id, result.version, order_id, str(context.report.get("status", "")))
        return Gathered(result, context, problem, ordering_system(repo, result.order_id))

    def targets(self, gathered: Gathered) -> list[DestinationConfig | None]:
        """The destinations of the result; ``[None]`` when none wants a result that must go somewhere.

        A preliminary report no destination asks for goes nowhere, by design (docs/delivery.md).
        """
        facility = gathered.origin[1] if gathered.origin else None
        chosen: list[DestinationConfig | None] = list(choose(self.destinations, facility, gathered.result.status))
        return chosen or ([] if gathered.result.status == "preliminary" else [None])

    def build(
        self, gathered: Gathered, destination: DestinationConfig | None, sequence: int = 0, replay_of: int | None = None
    ) -> OutboundMessage:
        """The row of one destination: the ORU^R01 ``queued``, or ``failed`` with the reason there is none."""
        result, raw, problem = gathered.result, None, gathered.problem
        if destination is None:
            problem = " ".join(p for p in (no_destination(gathered.origin), problem) if p)
        elif gathered.context is not None:
            try:
                raw = oru_r01(gathered.context, self._envelope(destination, gathered.origin)).encode()
            except MappingError as exc:
                problem = sentence(f"{exc.text} ({exc.location})")
        name = destination.name if destination else NO_DESTINATION
        status = RESULT_STATUS.get(result.status, "")
        return _new_row(name, result.report_id, result.version, result.order_id, status, raw, sequence, replay_of,
                        problem)  # fmt: skip

    def _envelope(self, destination: DestinationConfig, origin: tuple[str, str] | None) -> Envelope:
        app, facility = origin or ("", "")
        sender = self.senders(app, facility) if self.senders and origin else None
        systems = {system: authority for authority, system in sender.identifier_systems.items()} if sender else {}
        return Envelope(
            control_id=new_control_id(),
            timestamp=local_now(),
            version=destination.version,
            receiving_application=destination.receiving_application or app,
            receiving_facility=destination.receiving_facility or facility,
            identifier_systems=systems,
        )

    # -- sending --------------------------------------------------------------------------

    def send_once(self, name: str) -> bool:
        """Send the head of ``name``'s queue if it is due; False when there was nothing to send."""
        destination = self.by_name[name]
        claimed = self._claim(name, timedelta(seconds=destination.ack_timeout_seconds) + self.lease)
        if claimed is None:
            return False
        pk, raw, control_id = claimed
        outcome = exchange(destination, raw, control_id)
        self._record(pk, outcome)
        return True

    def _claim(self, name: str, lease: timedelta) -> tuple[int, bytes, str] | None:
        """Lease the head of the queue: the oldest queued or retrying row, when it is due."""
        m = OutboundMessage
        with self.db.transaction() as session:
            head = session.execute(
                select(m.pk, m.available_at, m.raw, m.control_id)
                .where(m.destination == name, m.status.in_(PENDING))
                .order_by(m.pk)
                .limit(1)
            ).first()
            now = dates.now()
            if head is None or head.available_at > now:
                return None
            won = (
                session.connection()
                .execute(
                    update(m)
                    .where(m.pk == head.pk, m.available_at == head.available_at, m.status.in_(PENDING))
                    .values(available_at=now + lease)
                )
                .rowcount
            )
        return (head.pk, head.raw, head.control_id) if won == 1 else None

    def _record(self, pk: int, outcome: Outcome) -> None:
        with self.db.transaction() as session:
            row = session.get_one(OutboundMessage, pk)
            if row.status not in PENDING:
                return  # replayed or changed meanwhile: nothing to record
            now = dates.now()
            row.attempts += 1
            row.last_attempt_at = now
            row.ack, row.ack_code = outcome.ack, outcome.ack_code
            if outcome.sent:
                row.status, row.sent_at, row.last_error = SENT, now, None
            else:
                row.last_error = outcome.error
                if row.attempts >= self.backoff.max_attempts:
                    row.status = DEAD
                else:
                    row.status, row.available_at = ERROR, now + self.backoff.delay(row.attempts)
            session.flush()
            if row.order_id:
                show_on_case(session, self.hooks, row.order_id, [row])
        level = logging.INFO if outcome.sent else logging.WARNING
        log.log(level, "ORU^R01 %s to %s: %s (attempt %s)", row.control_id, row.destination,
                row.status if outcome.sent else f"{row.status}: {outcome.error}", row.attempts)  # fmt: skip

    # -- replay -----------------------------------------------------------------------------

    def replay(self, pk: int) -> list[OutboundMessage] | None:
        """Send a message again, or try a failed result again: new rows at the end of the queue.

        A sent or dead message is sent again as it was, with a new MSH-10. A ``failed`` row is rebuilt
        from the data as it is now, for its destination, or for the destinations configured now when
        it had none. None when there is no such row; ``NotReplayable`` (nothing written) while it is
        still in the queue, or when the result still cannot go out.
        """
        with self.db.transaction() as session:
            original = session.get(OutboundMessage, pk)
            if original is None:
                return None
            if original.status in PENDING:
                raise NotReplayable(
                    f"message {pk} is {original.status}: it is still in the queue of {original.destination}"
                )
            rows = self._rebuild(session, original) if original.status == FAILED else [_resend(session, original)]
            session.add_all(rows)
            session.flush()
            if original.order_id:
                show_on_case(session, self.hooks, original.order_id, rows)
            for row in rows:
                session.expunge(row)
        return rows

    def _rebuild(self, session: Session, original: OutboundMessage) -> list[OutboundMessage]:
        what = report_ref(original)
        result = Result(original.report_id, original.report_version, original.order_id or "", "")
        gathered = self.gather(Repository(session, self.hooks), result)
        if gathered.context is None:
            raise NotReplayable(f"{what} still cannot be made an ORU^R01: {gathered.problem}")
        if original.destination == NO_DESTINATION:
            targets = [d for d in self.targets(gathered) if d is not None]
            if not targets:
                raise NotReplayable(f"{what} still has no destination: {no_destination(gathered.origin)}")
        elif (configured := self.by_name.get(original.destination)) is None:
            raise NotReplayable(f"{what}: the destination {original.destination!r} is not configured")
        else:
            targets = [configured]
        rows = []
        for destination in targets:
            if (there := _superseding(session, destination.name, original)) is not None:
                if len(targets) == 1:
                    raise NotReplayable(there)
                continue
            sequence = next_sequence(session, destination.name, original.report_id, original.report_version)
            row = self.build(gathered, destination, sequence, replay_of=original.pk)
            if row.status == FAILED:
                raise NotReplayable(f"{what} still cannot be made an ORU^R01 for {destination.name}: {row.last_error}")
            rows.append(row)
        if not rows:
            raise NotReplayable(f"{what} already has a message for each of its destinations")
        return rows


# -- giving up, replaying -----------------------------------------------------------------------


def _result_of(row: OutboxRow) -> Result:
    """The result an outbox row names: the report version, and from its payload the order and the status."""
    payload = orjson.loads(row.payload or "{}")
    order_id, status = str(payload.get("order") or ""), str(payload.get("status") or "")
    return Result(row.resource_id, row.resource_version, order_id, status)


def _given_up(session: Session, hooks: Sequence[Hook], pk: int, reason: str) -> None:
    """A result whose queueing kept failing is not left as a log line: a failed ``NO_DESTINATION`` row
    (no destination could be chosen for it), which a replay queues again once the cause is fixed."""
    row = session.get_one(OutboxRow, pk)
    result = _result_of(row)
    if message_of(session, NO_DESTINATION, result, 0) is not None:
        return
    problem = sentence(f"Queueing failed {row.attempts} times, the last with {reason}")
    failed = _new_row(NO_DESTINATION, result.report_id, result.version, result.order_id,
                      RESULT_STATUS.get(result.status, ""), None, problem=problem)  # fmt: skip
    session.add(failed)
    session.flush()
    if result.order_id:
        show_on_case(session, hooks, result.order_id, [failed])


def _resend(session: Session, original: OutboundMessage) -> OutboundMessage:
    """A sent or dead message again, as it was but for a new MSH-10 (and MSH-7)."""
    assert original.raw is not None  # only failed rows have no message
    raw = with_control_id(original.raw, new_control_id(), local_now())
    sequence = next_sequence(session, original.destination, original.report_id, original.report_version)
    return _new_row(original.destination, original.report_id, original.report_version, original.order_id,
                    original.result_status, raw, sequence, replay_of=original.pk)  # fmt: skip


def _superseding(session: Session, destination: str, original: OutboundMessage) -> str | None:
    """Why a failed row must not be rebuilt for ``destination``: this version already has a message
    there, or a later version of the report has a row there (sending this one now would overwrite the
    newer one at the receiver: replay that one)."""
    m = OutboundMessage
    version = original.report_version
    found = session.execute(
        select(m.pk, m.report_version, m.status)
        .where(
            m.destination == destination,
            m.report_id == original.report_id,
            or_(m.report_version > version, and_(m.report_version == version, m.status != FAILED)),
        )
        .order_by(m.report_version.desc(), m.pk.desc())
        .limit(1)
    ).first()
    if found is None:
        return None
    what = f"DiagnosticReport/{original.report_id}/_history/{found.report_version}"
    if found.report_version == version:
        return f"{what} is already {found.status} to {destination} (message {found.pk})"
    return (f"a later version, {what}, is {found.status} to {destination} (message {found.pk}): sending "
            f"version {version} now would overwrite it at the receiver")  # fmt: skip


# -- choosing, building -----------------------------------------------------------------------


def choose(destinations: Sequence[DestinationConfig], facility: str | None, status: str) -> list[DestinationConfig]:
    """The destinations of the ordering facility (MSH-4), else the default ones (``sending_facility`` "").

    A preliminary report goes only to those of them that ask for preliminary reports.
    """
    own = [d for d in destinations if facility and d.sending_facility == facility]
    chosen = own or [d for d in destinations if not d.sending_facility]
    return [d for d in chosen if status != "preliminary" or d.send_preliminary]


def ordering_system(repo: Repository, order_id: str) -> tuple[str, str] | None:
    """(MSH-3, MSH-4) of the message the order came in, from its Provenance; None for orders made over FHIR."""
    if not order_id:
        return None
    query = [("target", f"ServiceRequest/{order_id}"), ("_sort", "_lastUpdated")]
    for provenance in search.execute(repo.conn, search.parse("Provenance", query)).matches:
        for entity in provenance.resource.get("entity", []):
            system = str(entity.get("what", {}).get("identifier", {}).get("system", ""))
            if entity.get("role") == "source" and (sender := message_sender(system)):
                return sender
    return None


def _new_row(
    destination: str,
    report_id: str,
    version: int,
    order_id: str | None,
    result_status: str,
    raw: bytes | None,
    sequence: int = 0,
    replay_of: int | None = None,
    problem: str | None = None,
) -> OutboundMessage:
    """A ``queued`` row for ``raw``; a ``failed`` one, with ``problem`` as its reason, when there is no message."""
    now = dates.now()
    return OutboundMessage(
        destination=destination,
        message_type=ORU_R01,
        report_id=report_id,
        report_version=version,
        order_id=order_id or None,
        result_status=result_status,
        sequence=sequence,
        replay_of=replay_of,
        control_id=control_id_of(raw) if raw is not None else None,
        raw=raw,
        status=QUEUED if raw is not None else FAILED,
        attempts=0,
        created_at=now,
        available_at=now,
        last_error=None if raw is not None else problem or "No ORU^R01 could be made.",
    )


def control_id_of(raw: bytes) -> str:
    return raw.split(b"\r", 1)[0].decode().split("|")[9]


def with_control_id(raw: bytes, control_id: str, timestamp: datetime) -> bytes:
    """The same message with a new MSH-10 and MSH-7 (our own messages: no escaped ``|`` in MSH)."""
    msh, sep, rest = raw.partition(b"\r")
    fields = msh.decode().split("|")
    fields[6], fields[9] = timestamp.strftime("%Y%m%d%H%M%S%z"), control_id
    return "|".join(fields).encode() + sep + rest


def message_of(session: Session, destination: str, result: Result, sequence: int) -> int | None:
    """The row of the report version for the destination with that sequence, if there is one."""
    m = OutboundMessage
    return session.scalar(
        select(m.pk).where(
            m.destination == destination,
            m.report_id == result.report_id,
            m.report_version == result.version,
            m.sequence == sequence,
        )
    )


def next_sequence(session: Session, destination: str, report_id: str, version: int) -> int:
    """The sequence of a new message of the report version for the destination: 0 for its first."""
    m = OutboundMessage
    last = session.scalar(
        select(func.max(m.sequence)).where(
            m.destination == destination, m.report_id == report_id, m.report_version == version
        )
    )
    return 0 if last is None else last + 1


def report_ref(row: OutboundMessage) -> str:
    return f"DiagnosticReport/{row.report_id}/_history/{row.report_version}"


def sentence(text: str) -> str:
    """A reason as a sentence: a capital first, a full stop last."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def no_destination(origin: tuple[str, str] | None) -> str:
    """Why a result that must go somewhere has no destination (``choose`` found none)."""
    if origin and origin[1]:
        return (f"No destination is configured for results of orders from {origin[1]} (sending_facility), "
                "and there is no default destination (sending_facility \"\").")  # fmt: skip
    return 'No default destination (sending_facility "") is configured for results of orders made over FHIR.'


# -- the case shows it ----------------------------------------------------------------------------


def show_on_case(session: Session, hooks: Sequence[Hook], order_id: str, rows: Sequence[OutboundMessage]) -> None:
    """Each row's delivery on the case's Task (one extension per destination and report version), and,
    once the final report is in (the Task completed), where delivery stands as Task.businessStatus.

    In a savepoint: a Task that cannot take it (gone, refused) costs the case its status, never the
    delivery record.
    """
    try:
        with session.begin_nested():
            repo = Repository(session, hooks)
            task = cases.case_of(repo, order_id)
            if task is None:
                return
            repo.lock(f"Task/{task.id}")
            current = repo.current("Task", task.id, for_update=True)
            if current is None or current.content is None:
                return
            resource = current.resource
            updated = {**resource, "extension": _with_deliveries(resource.get("extension", []), rows)}
            if updated.get("status") == "completed":
                updated = cases.with_case_status(updated, *case_delivery_status(delivery_status(updated)))
            if updated != resource:
                repo.update("Task", current.id, updated, current.etag)
            repo.complete()
    except Exception:
        log.exception("showing the delivery of ServiceRequest/%s on its case", order_id)


def _with_deliveries(extensions: Sequence[dict[str, Any]], rows: Sequence[OutboundMessage]) -> list[dict[str, Any]]:
    """The Task's extensions with each row's entry added or replaced. A report version that reached a
    destination no longer shows that it had none."""
    found = list(extensions)
    for row in rows:
        entry = delivery_extension(row)
        if row.destination != NO_DESTINATION:
            found = [e for e in found if not _is_delivery(e, (NO_DESTINATION, report_ref(row)))]
        at = next((n for n, e in enumerate(found) if _is_delivery(e, _key(entry))), None)
        if at is None:
            found.append(entry)
        else:
            found[at] = entry
    return found


def _is_delivery(extension: Mapping[str, Any], key: tuple[str, str]) -> bool:
    return extension.get("url") == DELIVERY_EXTENSION and _key(extension) == key


def case_delivery_status(deliveries: Sequence[Mapping[str, str]]) -> tuple[str, str | None]:
    """Task.businessStatus (and the reason) from the case's deliveries (``delivery_status``).

    Only the latest version of each report shown counts: a correction that reached the receiver makes
    the failure of the version it corrects history. Any failed or dead message there = result-failed;
    else any still queued or being retried = result-queued; else (all acknowledged) result-sent.
    """
    latest: dict[str, int] = {}
    for entry in deliveries:
        report, version = _report_version(entry)
        latest[report] = max(latest.get(report, version), version)
    current = [e for e in deliveries if _report_version(e)[1] == latest[_report_version(e)[0]]]
    failed = [e["summary"] for e in current if e.get("status") in (FAILED, DEAD)]
    if failed:
        return cases.RESULT_FAILED, "; ".join(failed)
    waiting = [e for e in current if e.get("status") in PENDING]
    if waiting:
        return cases.RESULT_QUEUED, "; ".join(e["summary"] for e in waiting if e.get("status") == ERROR) or None
    return cases.RESULT_SENT, None


def _report_version(entry: Mapping[str, str]) -> tuple[str, int]:
    """("DiagnosticReport/<id>", version) of a delivery entry's report reference."""
    report, _, version = entry.get("report", "").partition("/_history/")
    return report, int(version) if version.isdigit() else 0


def delivery_extension(row: OutboundMessage) -> dict[str, Any]:
    """The ``result-delivery`` extension of one message: where, which report version, MSH-10, status."""
    detail = ", ".join(p for p in (row.ack_code, f"MSH-10 {row.control_id}" if row.control_id else "") if p)
    summary = f"{row.message_type} to {row.destination}: {row.status}" + (f" ({detail})" if detail else "")
    if row.last_error and row.status != SENT:
        summary += f": {row.last_error}"
    parts: list[dict[str, Any]] = [
        {"url": "destination", "valueString": row.destination},
        {"url": "report", "valueReference": {"reference": report_ref(row)}},
        {"url": "messageType", "valueString": row.message_type},
    ]
    if row.control_id:
        parts.append({"url": "controlId", "valueString": row.control_id})
    parts.append({"url": "status", "valueCode": row.status})
    if row.ack_code:
        parts.append({"url": "ackCode", "valueCode": row.ack_code})
    if row.last_error and row.status != SENT:
        parts.append({"url": "error", "valueString": row.last_error})
    parts.append({"url": "summary", "valueString": summary})
    return {"url": DELIVERY_EXTENSION, "extension": parts}


def delivery_status(task: Mapping[str, Any]) -> list[dict[str, str]]:
    """A Task's ``result-delivery`` extensions as plain dicts (sub-extension url → value)."""
    found = []
    for extension in task.get("extension", []):
        if extension.get("url") == DELIVERY_EXTENSION:
            found.append({e["url"]: _value(e) for e in extension.get("extension", [])})
    return found


def _value(extension: Mapping[str, Any]) -> str:
    for key, value in extension.items():
        if key.startswith("value"):
            return str(value["reference"]) if isinstance(value, dict) else str(value)
    return ""


def _key(extension: Mapping[str, Any]) -> tuple[str, str]:
    parts = {e.get("url"): e for e in extension.get("extension", [])}
    destination = str(parts.get("destination", {}).get("valueString", ""))
    report = str(parts.get("report", {}).get("valueReference", {}).get("reference", ""))
    return destination, report


__all__ = ["DEAD", "ERROR", "FAILED", "QUEUED", "SENT", "Backoff", "Delivery", "NotReplayable", "judge"]
