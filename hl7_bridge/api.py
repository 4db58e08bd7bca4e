"""REST endpoints of the inbound message store: find a message, see each stage, replay it.

``GET /hl7/messages`` (newest first; filters: status, sender = MSH-3 or MSH-4, control_id =
MSH-10, placer = ORC-2, since/until on the time received), ``GET /hl7/messages/{id}`` (raw,
mapped Bundle, what was written, ACK, error, timing) and ``POST /hl7/messages/{id}/replay``.
"""

from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import BaseModel
from sqlalchemy import Connection, or_, select

from fhir_server.db import Database
from fhir_server.repository import Hook
from hl7_bridge.intake import Senders, replay
from hl7_bridge.store import InboundMessage


class MessageSummary(BaseModel):
    id: int
    received_at: datetime
    sending_application: str | None
    sending_facility: str | None
    control_id: str | None
    message_type: str | None
    placer_number: str | None
    status: str
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


def messages_router(db: Database, senders: Senders | None = None, hooks: Sequence[Hook] = ()) -> APIRouter:
    """The endpoints; replays map with ``senders`` and write with ``hooks``, as the intake does."""
    router = APIRouter(prefix="/hl7/messages", tags=["HL7 message store"])

    def connection() -> Iterator[Connection]:
        with db.begin(write=False) as conn:
            yield conn

    ConnectionDep = Annotated[Connection, Depends(connection)]

    @router.get("")
    def list_messages(
        conn: ConnectionDep,
        status: str | None = None,
        sender: Annotated[str | None, Query(description="MSH-3 or MSH-4")] = None,
        control_id: Annotated[str | None, Query(description="MSH-10")] = None,
        placer: Annotated[str | None, Query(description="ORC-2 placer order number")] = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> list[MessageSummary]:
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
            stmt = stmt.where(m.received_at >= since)
        if until:
            stmt = stmt.where(m.received_at < until)
        return [_summary(row._mapping) for row in conn.execute(stmt)]

    @router.get("/{message_id}")
    def get_message(message_id: int, conn: ConnectionDep) -> MessageDetail:
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
    def replay_message(message_id: int) -> Replayed:
        ack = replay(db, message_id, senders, hooks)
        if ack is None:
            raise HTTPException(404, f"No message {message_id}")
        with db.begin(write=False) as conn:
            status = conn.scalar(select(InboundMessage.status).where(InboundMessage.pk == message_id)) or ""
        return Replayed(id=message_id, ack=_text(ack) or "", status=status)

    return router


def _summary(fields: Any) -> MessageSummary:
    return MessageSummary(id=fields["pk"], **{k: fields[k] for k in MessageSummary.model_fields if k != "id"})


def _text(data: bytes | None) -> str | None:
    """Message bytes for reading: segments one per line."""
    return None if data is None else data.decode("utf-8", errors="replace").replace("\r", "\n")
