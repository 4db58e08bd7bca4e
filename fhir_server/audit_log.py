"""The audit log: where AuditEvents (``fhir_server.balp``) are written, and how.

AuditEvents are resources of the FHIR store, searchable as any other (``GET [base]/AuditEvent``)
and never written through the API (``refuse_write``: 405). Two ways in:

- ``write``: in the caller's transaction, for a write (a FHIR create, update, delete, Bundle, an
  HL7 message): a rollback leaves no AuditEvent of it and a commit always has one.
- ``record``: everything else (reads, refusals, failures, DICOM), off the request path: a
  bounded queue that a writer thread drains, up to ``batch`` events a transaction. When the
  queue is full the caller waits for room, up to ``backpressure`` seconds (so a burst slows the
  clients rather than losing events); only past that an event is dropped, counted in
  ``dropped`` and warned about at most once per ``warn_every`` seconds. ``close`` writes what is
  queued before it returns.

An event is queued as a function that builds it: the building runs on the writer thread.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from fhir_server.errors import error
from fhir_server.executor import Executor
from fhir_server.http import FhirRequest
from fhir_server.repository import Repository

Event = dict[str, Any]
Pending = Callable[[], Event]
READS = frozenset({"GET", "HEAD"})
log = logging.getLogger(__name__)


def writes(req: FhirRequest) -> bool:
    """Whether a FHIR request may write (and so runs in a write transaction): not GET, HEAD or ``_search``."""
    return req.method.upper() not in READS and not req.path.rstrip("/").endswith("_search")


def refuse_write(method: str, path: str) -> None:
    """405 for a create, update, patch or delete of an AuditEvent: only the server writes the audit log."""
    parts = path.split("?")[0].strip("/").split("/")
    operation = parts[-1] == "_search" or parts[-1].startswith("$")
    if method.upper() in ("POST", "PUT", "PATCH", "DELETE") and parts[0] == "AuditEvent" and not operation:
        raise error(405, "not-supported", "AuditEvents are written by this server only")


class AuditLog:
    """AuditEvents written through ``executor``: in a transaction, or queued for the writer thread."""

    def __init__(
        self,
        executor: Executor,
        *,
        reads: bool = True,
        capacity: int = 10_000,
        batch: int = 64,
        backpressure: float = 2.0,
        warn_every: float = 60.0,
    ) -> None:
        #: Whether successful reads are audited (OVERREAD_AUDIT_READS); refusals always are.
        self.reads = reads
        self.executor, self.batch, self.backpressure, self.warn_every = executor, batch, backpressure, warn_every
        self.dropped = 0
        self._queue: queue.Queue[Pending | None] = queue.Queue(capacity)
        self._warned_at = float("-inf")
        self._writer = threading.Thread(target=self._drain, name="audit-writer", daemon=True)
        self._writer.start()

    @staticmethod
    def write(repo: Repository, event: Event) -> None:
        """Write ``event`` in ``repo``'s transaction (a write's own)."""
        repo.create_own(event)

    def record(self, pending: Pending) -> None:
        """Queue an event, waiting up to ``backpressure`` seconds for room; else (or once closed) drop and count it."""
        try:
            if self._writer.is_alive():
                self._queue.put(pending, timeout=self.backpressure)
                return
        except queue.Full:
            pass
        self._drop()

    async def arecord(self, pending: Pending) -> None:
        """``record`` from the event loop: at once when there is room, else waiting on a thread."""
        try:
            if self._writer.is_alive():
                self._queue.put_nowait(pending)
                return
        except queue.Full:
            await asyncio.to_thread(self.record, pending)
            return
        self._drop()

    def flush(self) -> None:
        """Return once every event queued so far is written (or given up)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()

    def _drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._warned_at >= self.warn_every:
            self._warned_at = now
            log.warning("audit log queue full: %d AuditEvents dropped since start", self.dropped)

    def _drain(self) -> None:
        while True:
            taken = [self._queue.get()]
            while len(taken) < self.batch:
                try:
                    taken.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending = [p for p in taken if p is not None]
            try:
                self._store(pending)
            finally:
                for _ in taken:
                    self._queue.task_done()
            if len(pending) < len(taken):
                return

    def _store(self, pending: list[Pending]) -> None:
        """One transaction for the batch; if it fails, one each, so one bad event loses only itself."""
        try:
            events = [p() for p in pending]
            with self.executor.begin() as conn:
                repo = Repository(conn)
                for event in events:
                    repo.create_own(event)
            return
        except Exception:
            log.exception("could not write %d AuditEvents together; writing them one by one", len(pending))
        for one in pending:
            try:
                with self.executor.begin() as conn:
                    Repository(conn).create_own(one())
            except Exception:
                self.dropped += 1
                log.exception("an AuditEvent could not be written; %d lost since start", self.dropped)
