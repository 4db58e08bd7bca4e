from datetime import timedelta

import pytest

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
