from datetime import timedelta

import pytest
from sqlalchemy import select

from fhir_server import outbox
from fhir_server.repository import Repository
from fhir_server.schema import OutboxRow

PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "7"}]}


def _enqueue(db, n=3):
    with db.transaction() as session:
        repo = Repository(session)
        for _ in range(n):
            repo.enqueue("link-imaging", repo.create(PATIENT), {"why": "test"})


def test_claim_leases_rows_so_a_second_worker_gets_the_others(db):
    _enqueue(db, 3)
    with db.transaction() as s1:
        first = [r.pk for r in outbox.claim(s1, "link-imaging", limit=2)]
    with db.transaction() as s2:
        second = [r.pk for r in outbox.claim(s2, "link-imaging", limit=10)]
    assert len(first) == 2 and len(second) == 1
    assert not set(first) & set(second)


def test_an_expired_lease_is_claimed_again(db):
    _enqueue(db, 1)
    with db.transaction() as s:
        (row,) = outbox.claim(s, "link-imaging", lease=timedelta(seconds=-1))
    with db.transaction() as s:
        again = outbox.claim(s, "link-imaging")
    assert [r.pk for r in again] == [row.pk]
    assert again[0].attempts == 2


def test_complete_and_retry_until_dead(db):
    _enqueue(db, 2)
    with db.transaction() as s:
        a, b = (r.pk for r in outbox.claim(s, "link-imaging", lease=timedelta(0)))
        outbox.complete(s, a)
        outbox.retry(s, b, "PACS down", timedelta(0), max_attempts=2)
    with db.transaction() as s:
        assert [r.pk for r in outbox.claim(s, "link-imaging", lease=timedelta(0))] == [b]
        outbox.retry(s, b, "PACS still down", timedelta(0), max_attempts=2)
    with db.transaction() as s:
        assert outbox.claim(s, "link-imaging") == []
        assert s.get_one(OutboxRow, a).status == "done"
        dead = s.get_one(OutboxRow, b)
        assert (dead.status, dead.last_error, dead.attempts) == ("dead", "PACS still down", 2)


def test_concurrent_claims_on_postgresql_skip_locked_rows(db):
    if not db.is_postgres:
        pytest.skip("SQLite serialises write transactions: there is nothing to skip")
    _enqueue(db, 4)
    with db.transaction() as s1, db.transaction() as s2:
        held = {r.pk for r in outbox.claim(s1, "link-imaging", limit=2)}
        other = {r.pk for r in outbox.claim(s2, "link-imaging", limit=4)}  # does not block on s1's rows
        assert len(held) == 2 and len(other) == 2 and not held & other


def _enqueue_for(db, resources: list[str]) -> list[int]:
    """One row per name, each for a Patient of its own name (rows of one name: one resource)."""
    with db.transaction() as session:
        repo = Repository(session)
        made = {name: repo.create(PATIENT) for name in dict.fromkeys(resources)}
        for name in resources:
            repo.enqueue("subscription", made[name])
    with db.transaction() as session:
        return list(session.scalars(select(OutboxRow.pk).order_by(OutboxRow.pk)))


def test_an_in_order_claim_takes_only_the_oldest_pending_row_of_each_resource(db, clock):
    a1, b1, a2 = _enqueue_for(db, ["a", "b", "a"])
    with db.transaction() as s:
        first = [r.pk for r in outbox.claim(s, "subscription", in_order=True)]
    assert first == [a1, b1]
    with db.transaction() as s:
        assert outbox.claim(s, "subscription", in_order=True) == []  # a2 waits while a1 is leased
        outbox.retry(s, a1, "refused", timedelta(minutes=5), max_attempts=3)
        outbox.complete(s, b1)
    clock.advance(outbox.LEASE)
    with db.transaction() as s:
        assert outbox.claim(s, "subscription", in_order=True) == []  # ... and while it waits for its retry
        assert [r.pk for r in outbox.claim(s, "subscription")] == [a2]  # an unordered claim would not wait
    clock.advance(outbox.LEASE + timedelta(minutes=5))
    with db.transaction() as s:
        assert [r.pk for r in outbox.claim(s, "subscription", in_order=True)] == [a1]
        outbox.fail(s, a1, "gone")
    with db.transaction() as s:
        assert [r.pk for r in outbox.claim(s, "subscription", in_order=True)] == [a2]  # a dead row holds nothing


def test_wake_makes_a_resource_s_leased_rows_due_and_pending_tells_a_finished_row(db):
    a1, _ = _enqueue_for(db, ["a", "b"])
    with db.transaction() as s:
        outbox.claim(s, "subscription")
        resource_id = s.get_one(OutboxRow, a1).resource_id
    with db.transaction() as s:
        assert outbox.wake(s, "subscription", resource_id) == 1
        assert outbox.wake(s, "link-imaging", resource_id) == 0  # another topic's rows only
    with db.transaction() as s:
        assert [r.pk for r in outbox.claim(s, "subscription")] == [a1]  # b1 is still leased
        assert outbox.pending(s, a1) is not None
        outbox.complete(s, a1)
    with db.transaction() as s:
        assert outbox.pending(s, a1) is None
        assert outbox.wake(s, "subscription", resource_id) == 0  # done rows stay done
