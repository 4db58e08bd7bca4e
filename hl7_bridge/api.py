"""REST endpoints of the inbound message store: find a message, see each stage, replay it.

``GET /hl7/messages`` (newest first; filters: status, sender = MSH-3 or MSH-4, control_id =
MSH-10, placer = ORC-2, since/until on the time received), ``GET /hl7/messages/{id}`` (raw,
mapped Bundle, what was written, ACK, error, timing) and ``POST /hl7/messages/{id}/replay``.
A filter value they cannot use (an unknown status, a malformed time, a negative limit, an offset
past 2^31-1 or an id past the store's 64-bit keys) is answered 400 with ``{"detail": "<what is wrong>"}``.

The outbound store (``hl7_bridge.outbound``; docs/delivery.md) the same way: ``GET /hl7/outbound``
(newest first; filters: status (``dead`` = the dead-letter list, ``failed`` = results no message
could be made of), destination, report = the DiagnosticReport id, control_id = MSH-10, replayed,
since/until on the time queued; an unknown status or a malformed time is 400),
``GET /hl7/outbound/{id}`` (raw message, last ACK, error, attempts) and
``POST /hl7/outbound/{id}/replay`` (a sent or dead message sent again: a new row, a new MSH-10; a
failed one rebuilt from the data as it is now).
"""

from collections.abc import Callable, Coroutine, Iterator, Sequence
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy import Connection, exists, or_, select
from sqlalchemy.orm import aliased

from fhir_server import dates
from fhir_server.executor import Executor
from fhir_server.limits import MAX_INT
from fhir_server.repository import Hook
from hl7_bridge.intake import Senders, replay
from hl7_bridge.outbound import STATUSES as OUTBOUND_STATUSES
from hl7_bridge.outbound import OutboundMessage
from hl7_bridge.results_queue import NotReplayable, ResultsQueue
from hl7_bridge.store import STATUSES, InboundMessage

#: A page's size and start, and a message's id (the ``pk``, 64-bit on both databases): bounded,
#: so a number the database cannot bind is a 400, not a 500.
Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=MAX_INT)]
MessageId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class _BadRequest(APIRoute):
    """A request whose parameters do not validate is answered 400 saying what is wrong (not 422)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return JSONResponse({"detail": _problems(exc)}, status_code=400)

        return route


def _problems(exc: RequestValidationError) -> str:
    """One line per bad parameter: its name, pydantic's reason and the value sent."""
    return "; ".join(f"{error['loc'][-1]}: {error['msg']} (got {error.get('input')!r})" for error in exc.errors())


class MessageSummary(BaseModel):
    id: int
    received_at: datetime
    sending_application: str | None
    sending_facility: str | None
    control_id: str | None
    message_type: str | None
    placer_number: str | None
    status: str
    #: A refused message: the id of the message whose MSH-10 it reused.
    conflict_of: int | None
    ack_code: str | None
    error: str | None
    processing_ms: float | None


class MessageDetail(MessageSummary):
    raw: str
    bundle: Any
    response: Any
    ack: str | None


class Replayed(BaseModel):
    id: int
    ack: str
    status: str


SUMMARY = [c for c in InboundMessage.__table__.c if c.name in MessageSummary.model_fields or c.name == "pk"]


def messages_router(executor: Executor, senders: Senders | None = None, hooks: Sequence[Hook] = ()) -> APIRouter:
    """The endpoints; replays map with ``senders`` and write with ``hooks``, as the intake does."""
    router = APIRouter(prefix="/hl7/messages", tags=["HL7 message store"], route_class=_BadRequest)

    def connection() -> Iterator[Connection]:
        with executor.begin(write=False) as conn:
            yield conn

    ConnectionDep = Annotated[Connection, Depends(connection)]

    @router.get("")
    def list_messages(
        conn: ConnectionDep,
        status: Annotated[str | None, Query(description=", ".join(STATUSES))] = None,
        sender: Annotated[str | None, Query(description="MSH-3 or MSH-4")] = None,
        control_id: Annotated[str | None, Query(description="MSH-10")] = None,
        placer: Annotated[str | None, Query(description="ORC-2 placer order number")] = None,
        since: Annotated[str | None, Query(description="received at or after (FHIR dateTime)")] = None,
        until: Annotated[str | None, Query(description="received before (FHIR dateTime)")] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> list[MessageSummary]:
        _one_of("status", status, STATUSES)
        m = InboundMessage
        stmt = select(*SUMMARY).order_by(m.received_at.desc(), m.pk.desc()).limit(limit).offset(offset)
        if status:
            stmt = stmt.where(m.status == status)
        if sender:
            stmt = stmt.where(or_(m.sending_application == sender, m.sending_facility == sender))
        if control_id:
            stmt = stmt.where(m.control_id == control_id)
        if placer:
            stmt = stmt.where(m.placer_number == placer)
        if since:
            stmt = stmt.where(m.received_at >= _instant("since", since))
        if until:
            stmt = stmt.where(m.received_at < _instant("until", until))
        return [_summary(row._mapping) for row in conn.execute(stmt)]

    @router.get("/{message_id}")
    def get_message(message_id: MessageId, conn: ConnectionDep) -> MessageDetail:
        row = conn.execute(select(InboundMessage.__table__).where(InboundMessage.pk == message_id)).first()
        if row is None:
            raise HTTPException(404, f"No message {message_id}")
        fields = row._mapping
        return MessageDetail(
            **_summary(fields).model_dump(),
            raw=_text(fields["raw"]) or "",
            bundle=orjson.loads(fields["bundle"]) if fields["bundle"] else None,
            response=orjson.loads(fields["response"]) if fields["response"] else None,
            ack=_text(fields["ack"]),
        )

    @router.post("/{message_id}/replay")
    def replay_message(message_id: MessageId) -> Replayed:
        ack = replay(executor, message_id, senders, hooks)
        if ack is None:
            raise HTTPException(404, f"No message {message_id}")
        with executor.begin(write=False) as conn:
            status = conn.scalar(select(InboundMessage.status).where(InboundMessage.pk == message_id)) or ""
        return Replayed(id=message_id, ack=_text(ack) or "", status=status)

    return router


class OutboundSummary(BaseModel):
    id: int
    destination: str
    message_type: str
    report_id: str
    report_version: int
    order_id: str | None
    result_status: str
    sequence: int
    replay_of: int | None
    control_id: str | None
    status: str
    attempts: int
    created_at: datetime
    available_at: datetime
    last_attempt_at: datetime | None
    sent_at: datetime | None
    ack_code: str | None
    last_error: str | None


class OutboundDetail(OutboundSummary):
    raw: str
    ack: str | None
    replays: list[int]


OUTBOUND_SUMMARY = [c for c in OutboundMessage.__table__.c if c.name in OutboundSummary.model_fields or c.name == "pk"]


def outbound_router(results: ResultsQueue) -> APIRouter:
    """The outbound message store's endpoints; a replay builds for ``results``' destinations and shows
    itself on the case, written with its hooks."""
    router = APIRouter(prefix="/hl7/outbound", tags=["HL7 outbound messages"], route_class=_BadRequest)
    executor = results.executor

    def connection() -> Iterator[Connection]:
        with executor.begin(write=False) as conn:
            yield conn

    ConnectionDep = Annotated[Connection, Depends(connection)]

    @router.get("")
    def list_outbound(
        conn: ConnectionDep,
        status: Annotated[str | None, Query(description=", ".join(OUTBOUND_STATUSES))] = None,
        destination: str | None = None,
        report: Annotated[str | None, Query(description="DiagnosticReport id")] = None,
        control_id: Annotated[str | None, Query(description="MSH-10")] = None,
        replayed: Annotated[bool | None, Query(description="whether an engineer has replayed it")] = None,
        since: Annotated[str | None, Query(description="queued at or after (FHIR dateTime)")] = None,
        until: Annotated[str | None, Query(description="queued before (FHIR dateTime)")] = None,
        limit: Limit = 50,
        offset: Offset = 0,
    ) -> list[OutboundSummary]:
        m = OutboundMessage
        stmt = select(*OUTBOUND_SUMMARY).order_by(m.created_at.desc(), m.pk.desc()).limit(limit).offset(offset)
        _one_of("status", status, OUTBOUND_STATUSES)
        if status:
            stmt = stmt.where(m.status == status)
        if destination:
            stmt = stmt.where(m.destination == destination)
        if report:
            stmt = stmt.where(m.report_id == report)
        if control_id:
            stmt = stmt.where(m.control_id == control_id)
        if replayed is not None:
            replay = aliased(OutboundMessage)
            has_replay = exists().where(replay.replay_of == m.pk)
            stmt = stmt.where(has_replay if replayed else ~has_replay)
        if since:
            stmt = stmt.where(m.created_at >= _instant("since", since))
        if until:
            stmt = stmt.where(m.created_at < _instant("until", until))
        return [_outbound(row._mapping) for row in conn.execute(stmt)]

    @router.get("/{message_id}")
    def get_outbound(message_id: MessageId, conn: ConnectionDep) -> OutboundDetail:
        return _outbound_detail(conn, message_id)

    @router.post("/{message_id}/replay")
    def replay_outbound(message_id: MessageId) -> OutboundDetail:
        try:
            rows = results.replay(message_id)
        except NotReplayable as exc:
            raise HTTPException(409, str(exc)) from exc
        if rows is None:
            raise HTTPException(404, f"No outbound message {message_id}")
        with executor.begin(write=False) as conn:  # the first new row; the original's ``replays`` lists them all
            return _outbound_detail(conn, rows[0].pk)

    return router


def _one_of(name: str, value: str | None, allowed: Sequence[str]) -> None:
    if value and value not in allowed:
        raise HTTPException(400, f"{name}: must be one of {', '.join(allowed)} (got {value!r})")


def _instant(name: str, value: str) -> datetime:
    """A ``since``/``until`` FHIR dateTime as the naive UTC the store keeps (its start, for a partial one)."""
    try:
        return dates.parse_range(value)[0]
    except ValueError as exc:
        raise HTTPException(400, f"{name}: not a FHIR dateTime: {exc} (got {value!r})") from exc


def _outbound(fields: Any) -> OutboundSummary:
    return OutboundSummary(id=fields["pk"], **{k: fields[k] for k in OutboundSummary.model_fields if k != "id"})


def _outbound_detail(conn: Connection, message_id: int) -> OutboundDetail:
    m = OutboundMessage
    row = conn.execute(select(m.__table__).where(m.pk == message_id)).first()
    if row is None:
        raise HTTPException(404, f"No outbound message {message_id}")
    fields = row._mapping
    replays = list(conn.scalars(select(m.pk).where(m.replay_of == message_id).order_by(m.pk)))
    return OutboundDetail(
        **_outbound(fields).model_dump(), raw=_text(fields["raw"]) or "", ack=_text(fields["ack"]), replays=replays
    )


def _summary(fields: Any) -> MessageSummary:
    return MessageSummary(id=fields["pk"], **{k: fields[k] for k in MessageSummary.model_fields if k != "id"})


def _text(data: bytes | None) -> str | None:
    """Message bytes for reading: segments one per line."""
    return None if data is None else data.decode("utf-8", errors="replace").replace("\r", "\n")
