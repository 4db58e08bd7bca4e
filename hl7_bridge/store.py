"""The inbound message store: every message received, raw, with what became of it.

One row per message: the raw bytes, the mapped Bundle, the transaction-response (which
resources it made), the ACK sent, a status (received → processed | error | rejected, or
refused) and timings, so an engineer can find any message and see each stage.

The key is what identifies the sender (``sender_key``: MSH-3, or MSH-3 and MSH-4;
``mappings.sender.sender_identity``) with MSH-10, and is unique: a resent message meets the row
of the first one and gets its ACK back; the database, not a lookup, decides (v2.5.1 §2.10.1,
"the receiving application ... must not process a duplicate"). A message that reuses a key with
other content is refused: its row has no key (NULLs never collide) and ``conflict_of`` names the
row that holds the key.
"""

import json
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, Float, Index, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fhir_server.schema import PK, Base

RECEIVED, PROCESSED, ERROR, REJECTED, REFUSED = "received", "processed", "error", "rejected", "refused"
STATUSES = (RECEIVED, PROCESSED, ERROR, REJECTED, REFUSED)


class InboundMessage(Base):
    __tablename__ = "hl7_inbound"
    __table_args__ = (
        UniqueConstraint("sender_key", "control_id"),
        Index("ix_hl7_inbound_status_received", "status", "received_at"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    #: MSH-3, MSH-4, MSH-10 as sent; None when the message could not be parsed (control_id: or has no MSH-10).
    sending_application: Mapped[str | None] = mapped_column(String(227))
    sending_facility: Mapped[str | None] = mapped_column(String(227))
    control_id: Mapped[str | None] = mapped_column(String(199))
    #: The sender's identity as a JSON array (["MSH-3"] or ["MSH-3", "MSH-4"]); None on refused rows, and on
    #: rejected ones whose MSH is unreadable or whose MSH-3/4/10 its column cannot hold (``too_long``).
    sender_key: Mapped[str | None] = mapped_column(Text)
    message_type: Mapped[str | None] = mapped_column(String(16))
    #: ORC-2 (else OBR-2) placer order number, to find every message about one order.
    placer_number: Mapped[str | None] = mapped_column(String(199), index=True)
    status: Mapped[str] = mapped_column(String(16))
    #: A refused message: the row of the message whose key it reused.
    conflict_of: Mapped[int | None] = mapped_column(PK)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    bundle: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    ack: Mapped[bytes | None] = mapped_column(LargeBinary)
    ack_code: Mapped[str | None] = mapped_column(String(2))
    error: Mapped[str | None] = mapped_column(Text)
    processing_ms: Mapped[float | None] = mapped_column(Float)


#: The fields of a message's key: a message with one of them unstorable is kept without a key.
KEY_FIELDS = ("MSH-3", "MSH-4", "MSH-10")
#: The columns read from a message's fields, by the field (for ERR-2), with their length limits.
_FIELD_COLUMNS = {
    "MSH-3": InboundMessage.sending_application,
    "MSH-4": InboundMessage.sending_facility,
    "MSH-9": InboundMessage.message_type,
    "MSH-10": InboundMessage.control_id,
    "ORC-2": InboundMessage.placer_number,
}


def too_long(row: dict[str, Any]) -> tuple[str, str] | None:
    """The first field of ``row`` its column cannot hold, and why: (``"MSH-10"``, text), or None.

    The column sizes are the HL7 lengths (v2.5.1 §2.15.9: MSH-10 199, HD 227), and PostgreSQL
    text holds no NUL: either would fail the row's INSERT, leaving the message unanswered.
    """
    for location, column in _FIELD_COLUMNS.items():
        reason = _unfit(location, row.get(column.key), column.type.length)
        if reason is not None:
            return location, reason
    return None


def storable(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every value its column cannot hold left out (NULL): the raw message keeps it."""
    kept = dict(row)
    for location, column in _FIELD_COLUMNS.items():
        if _unfit(location, kept.get(column.key), column.type.length) is not None:
            kept[column.key] = None
    return kept


def _unfit(location: str, value: str | None, limit: int | None) -> str | None:
    if value is None:
        return None
    if "\x00" in value:
        return f"{location} contains a NUL character"
    if limit is not None and len(value) > limit:
        return f"{location} is {len(value)} characters long; at most {limit} are accepted"
    return None


def sender_key(identity: tuple[str, ...]) -> str:
    """The ``sender_key`` of a sender identity: a JSON array, so no value can run into the next."""
    return json.dumps(list(identity), ensure_ascii=False, separators=(",", ":"))
