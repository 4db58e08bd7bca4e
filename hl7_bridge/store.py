"""The inbound message store: every message received, raw, with what became of it.

One row per message: the raw bytes, the mapped Bundle, the transaction-response (which
resources it made), the ACK sent, a status (received → processed | error | rejected) and
timings, so an engineer can find any message and see each stage. The key (sending
application, sending facility, MSH-10) is unique: a resent message meets the row of the
first one and gets its ACK back; the database, not a lookup, decides (v2.5.1 §2.10.1,
"the receiving application ... must not process a duplicate").
"""

from datetime import datetime

from sqlalchemy import DateTime, Float, Index, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fhir_server.schema import PK, Base

RECEIVED, PROCESSED, ERROR, REJECTED = "received", "processed", "error", "rejected"


class InboundMessage(Base):
    __tablename__ = "hl7_inbound"
    __table_args__ = (
        UniqueConstraint("sending_application", "sending_facility", "control_id"),
        Index("ix_hl7_inbound_status_received", "status", "received_at"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(DateTime)
    #: MSH-3, MSH-4, MSH-10; None when the message could not be parsed (such rows never collide).
    sending_application: Mapped[str | None] = mapped_column(String(227))
    sending_facility: Mapped[str | None] = mapped_column(String(227))
    control_id: Mapped[str | None] = mapped_column(String(199))
    message_type: Mapped[str | None] = mapped_column(String(16))
    #: ORC-2 (else OBR-2) placer order number, to find every message about one order.
    placer_number: Mapped[str | None] = mapped_column(String(199), index=True)
    status: Mapped[str] = mapped_column(String(16))
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    bundle: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    ack: Mapped[bytes | None] = mapped_column(LargeBinary)
    ack_code: Mapped[str | None] = mapped_column(String(2))
    error: Mapped[str | None] = mapped_column(Text)
    processing_ms: Mapped[float | None] = mapped_column(Float)
