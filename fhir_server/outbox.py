"""Claiming outbox rows: the work queue that writes leave for workers.

A worker claims due rows in a short transaction and leases them (``available_at`` moves
into the future), does the work outside any transaction, then records the result. A
worker that dies mid-work loses nothing: its lease runs out and another worker claims the
row again. On PostgreSQL, ``FOR UPDATE SKIP LOCKED`` lets several server processes claim
from one table without blocking or double-claiming; SQLite serialises writers anyway.
"""

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, Update, exists, select, update
from sqlalchemy.orm import Session, aliased

from fhir_server import dates
from fhir_server.schema import OutboxRow

PENDING, DONE, DEAD = "pending", "done", "dead"


LEASE = timedelta(minutes=2)


@dataclass(frozen=True)
class Backoff:
    """How patiently a worker retries a row: first_delay, doubling after each attempt, at most
    max_delay, for max_attempts attempts (then the row is dead)."""

    max_attempts: int = 10
    first_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(hours=1)

    def delay(self, attempts: int) -> timedelta:
        delay: timedelta = self.first_delay * 2 ** min(max(attempts - 1, 0), 30)
        return min(delay, self.max_delay)


def claim(
    session: Session, topic: str, limit: int = 10, lease: timedelta = LEASE, *, in_order: bool = False
) -> list[OutboxRow]:
    """Due rows of ``topic``, oldest first, leased to the caller for ``lease``.

    ``in_order``: only the oldest pending row of each resource, so a resource's rows are worked
    one at a time in the order they were written; one waiting for its retry (or leased to another
    worker) holds the ones behind it.
    """
    now = dates.now()
    criteria = [OutboxRow.topic == topic, OutboxRow.status == PENDING, OutboxRow.available_at <= now]
    if in_order:
        earlier = aliased(OutboxRow)
        criteria.append(
            ~exists().where(
                earlier.topic == topic,
                earlier.status == PENDING,
                earlier.resource_id == OutboxRow.resource_id,
                earlier.pk < OutboxRow.pk,
            )
        )
    rows = session.scalars(
        select(OutboxRow)
        .where(*criteria)
        .order_by(OutboxRow.pk)
        .limit(limit)
        .with_for_update(skip_locked=True, of=OutboxRow)
    ).all()
    for row in rows:
        row.available_at = now + lease
        row.attempts += 1
    return list(rows)


def pending(session: Session, pk: int) -> OutboxRow | None:
    """The row, locked, while it is still pending; None once another run finished it.

    A lease that ran out mid-work, or a ``wake``, lets a second worker run the same row: whichever
    finishes second checks here, so it neither revives nor kills a row the first one finished.
    """
    row = session.get(OutboxRow, pk, with_for_update=True)
    return row if row is not None and row.status == PENDING else None


def wake(session: Session, topic: str, resource_id: str) -> int:
    """Make the pending rows of ``topic`` for ``resource_id`` due now (leased ones too); how many there were."""
    woken: int = session.connection().execute(_pending_of(topic, resource_id).values(available_at=dates.now())).rowcount
    return woken


def supersede(conn: Connection, topic: str, resource_id: str) -> None:
    """End the pending rows of ``topic`` for ``resource_id``: newer work replaces them."""
    conn.execute(_pending_of(topic, resource_id).values(status=DONE))


def _pending_of(topic: str, resource_id: str) -> Update:
    """An UPDATE of the pending rows of ``topic`` for ``resource_id``."""
    return update(OutboxRow).where(
        OutboxRow.topic == topic, OutboxRow.resource_id == resource_id, OutboxRow.status == PENDING
    )


def complete(session: Session, pk: int) -> None:
    row = session.get_one(OutboxRow, pk)
    row.status, row.last_error = DONE, None


def fail(session: Session, pk: int, reason: str) -> None:
    """Give up now: the work cannot succeed by trying again (``dead``, with the reason)."""
    row = session.get_one(OutboxRow, pk)
    row.status, row.last_error = DEAD, reason


def retry(session: Session, pk: int, reason: str, delay: timedelta, max_attempts: int) -> bool:
    """Try again after ``delay``, or give up (``dead``, returns False) once ``max_attempts`` are spent."""
    row = session.get_one(OutboxRow, pk)
    row.last_error = reason
    if row.attempts >= max_attempts:
        row.status = DEAD
        return False
    row.available_at = dates.now() + delay
    return True
