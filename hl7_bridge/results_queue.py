"""The results queue: second-opinion reports become ORU^R01 messages, one per destination (docs/delivery.md).

It claims the ``result`` outbox rows that second-opinion reports leave (``cases.results``),
gathers the report version's ORU context, chooses the destinations (those of the ordering facility,
MSH-4 of the order, else the default ones: ``sending_facility`` ""), builds one ORU^R01 per
destination with a fresh MSH-10, stores it ``queued`` in ``hl7_bridge.outbound`` and completes the
outbox row: one transaction, which also shows the delivery on the case (``hl7_bridge.delivery_status``).
The unique key (destination, report, version, sequence) means a second run for the same version (a
crash, another server process) builds nothing twice. A report's versions are queued one at a time,
in order (``OutboxWorker.in_order``): a correction is never queued before the report it corrects.
``hl7_bridge.sender`` sends each destination's queue.

Nothing is dropped in silence: a result that cannot become a message (no usable PID-3, a mapping
error, a deleted report) is a ``failed`` row per destination with the reason, and one that no
destination wants (none configured for its facility, no default) a ``failed`` row for
``NO_DESTINATION``; ``replay`` rebuilds a failed row from the data as it is now.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from cases.results import RESULT
from fhir_server import dates, outbox
from fhir_server.errors import FhirError
from fhir_server.executor import Executor
from fhir_server.outbox import Backoff
from fhir_server.outbox_worker import Job, OutboxWorker, describe
from fhir_server.repository import Hook, Repository
from hl7_bridge.delivery_status import report_ref, show_on_case
from hl7_bridge.intake import Senders
from hl7_bridge.oru_context import load_context
from hl7_bridge.outbound import FAILED, NO_DESTINATION, PENDING, QUEUED, DestinationConfig, OutboundMessage
from mappings.bundle_builder import message_sender
from mappings.errors import MappingError
from mappings.oru_r01 import RESULT_STATUS, Envelope, OruContext, oru_r01

log = logging.getLogger(__name__)

ORU_R01 = "ORU^R01"


class ResultsQueue(OutboxWorker):
    """Claims ``result`` rows, a report's versions in order, and queues their messages."""

    topic = RESULT
    in_order = True

    def __init__(
        self,
        executor: Executor,
        destinations: Sequence[DestinationConfig],
        backoff: Backoff,
        hooks: Sequence[Hook] = (),
        senders: Senders | None = None,
        lease: timedelta = outbox.LEASE,
        poll: float = 1.0,
    ) -> None:
        super().__init__(executor, backoff, lease=lease, poll=poll)
        self.destinations, self.hooks, self.senders = list(destinations), hooks, senders
        self.by_name = {d.name: d for d in self.destinations}

    def handle(self, job: Job) -> None:
        """One message per destination of the report version, or a ``failed`` row saying why there is none."""
        with self.executor.session() as session:
            repo = Repository(session, self.hooks)
            gathered = self.gather(repo, _result_of(job))
            made: list[OutboundMessage] = []
            for destination in self.targets(gathered):
                name = destination.name if destination else NO_DESTINATION
                if message_of(session, name, gathered.result, 0) is None:
                    made.append(self.build(gathered, destination))
            session.add_all(made)
            session.flush()
            outbox.complete(session, job.pk)
            if made and gathered.result.order_id:
                show_on_case(session, self.hooks, gathered.result.order_id, made)
            repo.complete()
        for row in made:
            log.log(logging.WARNING if row.status == FAILED else logging.INFO, "ORU^R01 for %s to %s: %s",
                    report_ref(row), row.destination, row.last_error or f"queued, MSH-10 {row.control_id}")  # fmt: skip

    def failed(self, job: Job, exc: Exception) -> None:
        """A database hiccup: the row is tried again (what cannot be sent is a failed row, not an exception)."""
        reason = describe(exc)
        with self.executor.session() as session:
            if not self.retry(session, job, reason):
                _given_up(session, self.hooks, job, reason)

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

    def replay(self, pk: int) -> list[OutboundMessage] | None:
        """Send a message again, or try a failed result again: new rows at the end of the queue.

        A sent or dead message is sent again as it was, with a new MSH-10. A ``failed`` row is rebuilt
        from the data as it is now, for its destination, or for the destinations configured now when
        it had none. None when there is no such row; ``NotReplayable`` (nothing written) while it is
        still in the queue, or when the result still cannot go out.
        """
        with self.executor.session() as session:
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


def local_now() -> datetime:
    """Now, aware, in the server's time zone (MSH-7). ``dates.now()`` is naive UTC: ``.astimezone()``
    alone would take it for local time."""
    return dates.now().replace(tzinfo=UTC).astimezone()


def new_control_id() -> str:
    """A fresh MSH-10: 20 characters (the v2.5.1 length of ST MSH-10), unique."""
    return "OVR" + uuid.uuid4().hex[:17].upper()


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


def _result_of(job: Job) -> Result:
    """The result an outbox row names: the report version, and from its payload the order and the status."""
    order_id, status = str(job.payload.get("order") or ""), str(job.payload.get("status") or "")
    return Result(job.resource_id, job.version, order_id, status)


def _given_up(session: Session, hooks: Sequence[Hook], job: Job, reason: str) -> None:
    """A result whose queueing kept failing is not left as a log line: a failed ``NO_DESTINATION`` row
    (no destination could be chosen for it), which a replay queues again once the cause is fixed."""
    result = _result_of(job)
    if message_of(session, NO_DESTINATION, result, 0) is not None:
        return
    problem = sentence(f"Queueing failed {job.attempts} times, the last with {reason}")
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
    for provenance in repo.search("Provenance", query):
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
