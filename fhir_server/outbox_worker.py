"""Workers: the loop each one runs, and the base of those that work an outbox topic (docs/fhir-server.md).

``Loop`` runs a worker's step until stopped: at once again after a step that found work, else
after ``poll`` seconds or a ``wake``; an exception is logged and the loop goes on (a broken row or
a database hiccup must not end a worker). ``running`` starts loops on threads of their own and
stops them.

``OutboxWorker`` claims due rows of its topic with a lease (``fhir_server.outbox``), does the work
of each outside any transaction (``handle``), and records the outcome through the outbox functions:
done, retried after a ``Backoff``, or dead once its attempts are spent. A worker that dies mid-work
loses nothing: its lease runs out and another worker claims the row again. Tests drive
``run_once`` directly, with an injected clock (``fhir_server.dates``).
"""

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Self

import orjson
from sqlalchemy.orm import Session

from fhir_server import outbox
from fhir_server.executor import Executor
from fhir_server.outbox import LEASE, Backoff
from fhir_server.schema import OutboxRow

log = logging.getLogger(__name__)

#: How long ``running`` waits for a loop to finish its step once stopped.
JOIN_TIMEOUT = 60.0


class Loop:
    """``step`` (how much work it found) until ``stop``; after one that found none, ``poll`` seconds or a ``wake``."""

    def __init__(self, name: str, step: Callable[[], int | bool], poll: float) -> None:
        self.name, self.step, self.poll = name, step, poll
        self._stopped, self._woken = threading.Event(), threading.Event()

    def run(self) -> None:
        while not self._stopped.is_set():
            try:
                if self.step():
                    continue
            except Exception:  # a broken row or a database hiccup must not end the worker
                log.exception("%s worker", self.name)
            self._woken.wait(self.poll)
            self._woken.clear()

    def wake(self) -> None:
        """Step now rather than at the end of the wait: there is work."""
        self._woken.set()

    def stop(self) -> None:
        self._stopped.set()
        self._woken.set()


@contextmanager
def running(loops: Sequence[Loop]) -> Iterator[None]:
    """Each loop on a daemon thread of its own while the block runs; stopped and joined after it."""
    threads = [threading.Thread(target=loop.run, name=loop.name, daemon=True) for loop in loops]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        for loop in loops:
            loop.stop()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)


def describe(exc: Exception) -> str:
    """An exception as the reason a row records (``last_error``)."""
    return f"{type(exc).__name__}: {exc}"


@dataclass(frozen=True)
class Job:
    """One claimed outbox row, read in the claim's transaction: what it names, its attempt, its payload."""

    pk: int
    resource_type: str
    resource_id: str
    version: int
    attempts: int
    payload: dict[str, Any]

    @classmethod
    def of(cls, row: OutboxRow) -> Self:
        payload = orjson.loads(row.payload or "{}")
        return cls(row.pk, row.resource_type, row.resource_id, row.resource_version, row.attempts,
                   payload if isinstance(payload, dict) else {})  # fmt: skip


class OutboxWorker(ABC):
    """Claims due rows of ``topic`` and works them: ``handle`` each, ``failed`` when it raises.

    ``in_order``: a resource's rows one at a time, oldest first (``outbox.claim``).
    """

    topic: ClassVar[str]
    in_order: ClassVar[bool] = False

    def __init__(
        self, executor: Executor, backoff: Backoff, *, limit: int = 10, lease: timedelta = LEASE, poll: float = 1.0
    ) -> None:
        self.executor, self.backoff, self.limit, self.lease = executor, backoff, limit, lease
        self.loop = Loop(self.topic, self.run_once, poll)

    def run_once(self) -> int:
        """Claim due rows and work them; how many there were."""
        with self.executor.session() as session:
            claimed = outbox.claim(session, self.topic, self.limit, self.lease, in_order=self.in_order)
            jobs = [Job.of(row) for row in claimed]
        self.work(jobs)
        return len(jobs)

    def work(self, jobs: list[Job]) -> None:
        """Each job in turn (a worker may run them side by side)."""
        for job in jobs:
            self.attempt(job)

    def attempt(self, job: Job) -> None:
        try:
            self.handle(job)
        except Exception as exc:  # the row is tried again; what can never succeed is the handler's to end
            log.exception("%s: outbox row %s", self.topic, job.pk)
            self.failed(job, exc)

    @abstractmethod
    def handle(self, job: Job) -> None:
        """Do the job's work and record its outcome (``outbox.complete``, ``retry``, ``outbox.fail``)."""

    def failed(self, job: Job, exc: Exception) -> None:
        """``handle`` raised: try again after the backoff."""
        with self.executor.session() as session:
            self.retry(session, job, describe(exc))

    def retry(self, session: Session, job: Job, reason: str, delay: timedelta | None = None) -> bool:
        """Try the job again after ``delay`` (else the backoff of its attempt); False once it is dead."""
        wait = self.backoff.delay(job.attempts) if delay is None else delay
        again = outbox.retry(session, job.pk, reason, wait, self.backoff.max_attempts)
        if not again:
            log.warning("%s: outbox row %s is dead after %s attempts: %s", self.topic, job.pk, job.attempts, reason)
        return again
