"""The MLLP sender of ORU^R01 results: one destination's queue, strictly oldest first (docs/delivery.md).

The head of the queue (the oldest ``queued`` or ``error`` row of ``hl7_bridge.outbound``) is leased
with a compare-and-set on ``available_at``, so two server processes never send for one destination
at once; it is sent over MLLP outside any transaction and its ACK judged: AA (or CA) = ``sent``; AE,
AR, a malformed ACK, no ACK within ``ack_timeout_seconds``, a refused or dropped connection =
``error``, tried again after a backoff (the same row, the same MSH-10, so a receiver can tell a
resend) until ``max_attempts``, then ``dead``: the dead-letter list. The queue waits behind a
message that is being retried (order is kept); a dead one no longer holds it up.

A sender that dies after the receiver's ACK but before recording it sends the message again, with
the same MSH-10, when its lease runs out: at least once on the wire, once per MSH-10 at a receiver
that drops duplicates (v2.5.1 §2.10.1), as ours does.
"""

import asyncio
import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update

from fhir_server import dates
from fhir_server.executor import Executor
from fhir_server.outbox import LEASE, Backoff
from fhir_server.outbox_worker import Loop
from fhir_server.repository import Hook
from hl7_bridge import mllp
from hl7_bridge.delivery_status import show_on_case
from hl7_bridge.outbound import DEAD, ERROR, PENDING, SENT, DestinationConfig, OutboundMessage
from mappings.v2 import parse

log = logging.getLogger(__name__)

ACCEPTED = ("AA", "CA")
ACK_CODES = ("AA", "AE", "AR", "CA", "CE", "CR")


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to: the ACK code (None when there was no usable ACK), the error, the ACK."""

    ack_code: str | None
    error: str | None
    ack: bytes | None = None

    @property
    def sent(self) -> bool:
        return self.error is None


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
        tls = destination.ssl_context()
        ack = asyncio.run(mllp.send(destination.host, destination.port, raw, timeout=timeout, ssl=tls))
    except TimeoutError:
        return Outcome(None, f"no ACK within {timeout:g} s")
    except mllp.MllpConnectionClosedError:
        return Outcome(None, "the receiver closed the connection before an ACK")
    except ssl.SSLError as exc:  # a certificate that does not verify, a handshake the receiver refuses
        return Outcome(None, f"TLS with {destination.host}:{destination.port} failed: {exc.reason or exc}")
    except OSError as exc:
        return Outcome(None, f"cannot reach {destination.host}:{destination.port}: {exc.strerror or exc}")
    except Exception as exc:  # e.g. a reply larger than the frame limit: an error to retry, not a lost row
        return Outcome(None, f"{type(exc).__name__}: {exc}")
    return judge(ack, control_id)


class Sender:
    """Sends one destination's queue: ``send_once`` the head when it is due (``loop``: until stopped)."""

    def __init__(
        self,
        executor: Executor,
        destination: DestinationConfig,
        backoff: Backoff,
        hooks: Sequence[Hook] = (),
        lease: timedelta = LEASE,
        poll: float = 1.0,
    ) -> None:
        self.executor, self.destination, self.backoff, self.hooks = executor, destination, backoff, hooks
        # Held while the ACK is awaited, and for a lease beyond it.
        self.lease = timedelta(seconds=destination.ack_timeout_seconds) + lease
        self.loop = Loop(f"oru-{destination.name}", self.send_once, poll)

    def send_once(self) -> bool:
        """Send the head of the queue if it is due; False when there was nothing to send."""
        claimed = self.claim(self.lease)
        if claimed is None:
            return False
        pk, raw, control_id = claimed
        self._record(pk, exchange(self.destination, raw, control_id))
        return True

    def claim(self, lease: timedelta) -> tuple[int, bytes, str] | None:
        """Lease the head of the queue: the oldest queued or retrying row, when it is due."""
        m = OutboundMessage
        with self.executor.session() as session:
            head = session.execute(
                select(m.pk, m.available_at, m.raw, m.control_id)
                .where(m.destination == self.destination.name, m.status.in_(PENDING))
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
        with self.executor.session() as session:
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
