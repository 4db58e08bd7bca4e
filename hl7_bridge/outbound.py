"""The outbound message store: every ORU^R01 built for a destination, raw, with what became of it.

One row per message: the destination, the report version it carries, its MSH-10, the raw ER7,
a status (queued → sent | error → … → dead), the attempts, the last error and the last ACK. The
rows of one destination, oldest first, are that destination's queue (``hl7_bridge.sender``).

A result that cannot become a message is a row too, never only a log line: status ``failed``,
no MSH-10 and no raw message, the reason in ``last_error``. When no destination wants it at all,
its destination is ``NO_DESTINATION`` (a name no configured destination may take, so the unique
key below still holds).

The key (destination, report id, report version, sequence) is unique: a worker that builds the
message of a report version twice (a crash, two server processes) meets the first row, so the
receiver is sent one message per report version. ``sequence`` is 0 for the message the report
made and n for the n-th replay an engineer asked for (a replay is a new message: a new MSH-10).
"""

import ssl
from datetime import datetime
from typing import Protocol

from sqlalchemy import DateTime, Index, Integer, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fhir_server.schema import PK, Base

#: queued: waiting for its turn; error: the last attempt failed, it is tried again after a backoff;
#: sent: the receiver answered AA (or CA); dead: the attempts are spent (the dead-letter list).
QUEUED, ERROR, SENT, DEAD = "queued", "error", "sent", "dead"
#: failed: no message could be made (no usable PID-3, a mapping error, no destination); never sent.
FAILED = "failed"
STATUSES = (QUEUED, ERROR, SENT, DEAD, FAILED)
#: The rows still to be sent, in their destination's queue.
PENDING = (QUEUED, ERROR)
#: The destination of a result that no configured destination wants (docs/delivery.md).
NO_DESTINATION = "(none)"


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
    def ssl_context(self) -> ssl.SSLContext | None:
        """TLS to this destination (docs/security.md); None: plain TCP."""


class OutboundMessage(Base):
    __tablename__ = "hl7_outbound"
    __table_args__ = (
        UniqueConstraint("destination", "report_id", "report_version", "sequence"),
        UniqueConstraint("control_id"),
        Index("ix_hl7_outbound_queue", "destination", "status", "pk"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    destination: Mapped[str] = mapped_column(String(64))
    message_type: Mapped[str] = mapped_column(String(16))  # ORU^R01
    #: The DiagnosticReport version the message carries, and the ServiceRequest (the case) it answers.
    report_id: Mapped[str] = mapped_column(String(64), index=True)
    report_version: Mapped[int] = mapped_column(Integer)
    order_id: Mapped[str | None] = mapped_column(String(64))
    result_status: Mapped[str] = mapped_column(String(1))  # OBR-25: P, F, C
    sequence: Mapped[int] = mapped_column(Integer, default=0)
    #: The row this one replays (None for the first message of a report version).
    replay_of: Mapped[int | None] = mapped_column(Integer)
    #: MSH-10 (ST, 20 characters in v2.5.1) and the ER7 text; None for a ``failed`` row (no message).
    control_id: Mapped[str | None] = mapped_column(String(20))
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    #: When the row may next be tried: after its backoff, or when the lease of a sender that died runs out.
    available_at: Mapped[datetime] = mapped_column(DateTime)
    last_attempt_at: Mapped[datetime | None] = mapped_column(DateTime)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    ack: Mapped[bytes | None] = mapped_column(LargeBinary)
    ack_code: Mapped[str | None] = mapped_column(String(2))
