"""The worker base: the loop (step, wait, wake, stop) and an outbox topic's claim → handle → outcome."""

from __future__ import annotations

import threading
from datetime import timedelta

from fhir_server import outbox
from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.outbox import Backoff
from fhir_server.outbox_worker import Job, Loop, OutboxWorker, running
from fhir_server.repository import Repository
from fhir_server.schema import OutboxRow
from tests.conftest import Clock

PATIENT = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "7"}]}
HOUR = 3600.0  # a poll no test waits for: only a wake or a stop ends the wait


class Steps:
    """A loop's step that records each call and raises on the calls it is told to."""

    def __init__(self, failing: tuple[int, ...] = ()) -> None:
        self.calls, self.failing = 0, failing
        self.called = threading.Semaphore(0)

    def __call__(self) -> int:
        self.calls += 1
        self.called.release()
        if self.calls in self.failing:
            raise RuntimeError("a database hiccup")
        return 0

    def wait(self) -> None:
        assert self.called.acquire(timeout=10), "the loop did not step"


def test_a_loop_steps_at_once_then_waits_until_woken_and_ends_when_stopped() -> None:
    steps = Steps(failing=(1,))
    loop = Loop("test", steps, HOUR)
    with running([loop]):
        steps.wait()  # the first step raised: logged, and the loop goes on
        loop.wake()
        steps.wait()
        loop.wake()
        steps.wait()
    assert steps.calls == 3  # stopped while waiting out an hour's poll: no step after the block


class Jobs(OutboxWorker):
    """Handles ``work`` rows: completes them, or raises while ``broken``."""

    topic = "work"

    def __init__(self, db: Database, backoff: Backoff) -> None:
        super().__init__(for_database(db), backoff)
        self.broken, self.handled = False, list[Job]()

    def handle(self, job: Job) -> None:
        self.handled.append(job)
        if self.broken:
            raise RuntimeError("the peer is down")
        with self.executor.session() as session:
            outbox.complete(session, job.pk)


def _enqueue(db: Database, payload: dict[str, str]) -> None:
    with db.transaction() as session:
        repo = Repository(session)
        repo.enqueue("work", repo.create(PATIENT), payload)


def _row(db: Database) -> tuple[str, int, str | None]:
    with db.transaction() as session:
        row = session.query(OutboxRow).one()
        return row.status, row.attempts, row.last_error


def test_a_job_that_raises_is_retried_after_its_backoff_until_its_attempts_are_spent(
    db: Database, clock: Clock
) -> None:
    _enqueue(db, {"what": "this"})
    worker = Jobs(db, Backoff(max_attempts=2, first_delay=timedelta(minutes=1)))
    worker.broken = True
    assert worker.run_once() == 1
    assert _row(db) == (outbox.PENDING, 1, "RuntimeError: the peer is down")
    clock.advance(timedelta(seconds=59))
    assert worker.run_once() == 0  # backing off
    clock.advance(timedelta(seconds=1))
    assert worker.run_once() == 1
    assert _row(db) == (outbox.DEAD, 2, "RuntimeError: the peer is down")
    clock.advance(timedelta(days=1))
    assert worker.run_once() == 0
    job = worker.handled[0]
    assert (job.resource_type, job.version, job.attempts, job.payload) == ("Patient", 1, 1, {"what": "this"})


def test_a_job_that_succeeds_is_done(db: Database) -> None:
    _enqueue(db, {})
    worker = Jobs(db, Backoff())
    assert worker.run_once() == 1
    assert _row(db) == (outbox.DONE, 1, None)
    assert worker.run_once() == 0
