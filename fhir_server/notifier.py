"""The Subscription worker: handshakes and rest-hook notifications from the outbox (docs/subscriptions.md).

It consumes the ``subscription`` outbox rows that ``fhir_server.subscriptions`` writes in the
transaction of each change. Per row: read the Subscription (and the resource version the row
names), send it over HTTP outside any transaction, and record the outcome:

- 2xx: the row is done; a Subscription that was ``requested`` (handshake) or in ``error``
  becomes ``active`` again, its ``error`` cleared.
- anything else (an HTTP error status, a redirect, which is not followed, a refused connection,
  a timeout, an endpoint ``fhir_server.egress`` refuses): the row is retried with backoff
  (``Backoff``: 5 s doubling to 10 min, 24 attempts, about 2.5 hours by default), the
  Subscription is ``error``; after the last attempt the row is ``dead`` (it stays in the outbox,
  with its last error) and the Subscription says so. What failed is in the log and the outbox
  row's ``last_error`` only: ``Subscription.error`` says ``FAILED`` whatever it was, so a
  Subscription cannot be used to probe which hosts and ports answer how.

Each request goes to the address ``Egress.pinned`` checked, with the channel's headers as stored
(``fhir_server.channel_headers``), never through a proxy of the environment.

A Subscription's rows are delivered one at a time, in the order they were written: only the
oldest pending row of each Subscription is claimed, so a row waiting for its retry holds the
ones behind it (version 3 of a report never overtakes version 2). Rows of different
Subscriptions are delivered side by side. Claims are leased (``fhir_server.outbox_worker``), so a
worker that dies mid-delivery loses nothing, and several server processes can share one
PostgreSQL database (``FOR UPDATE SKIP LOCKED``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx

from fhir_server import channel_headers, outbox, subscriptions
from fhir_server.egress import NOWHERE, Egress
from fhir_server.errors import FhirError
from fhir_server.executor import Executor
from fhir_server.outbox import Backoff
from fhir_server.outbox_worker import Job, OutboxWorker, describe
from fhir_server.repository import Hook, Repository, Stored

log = logging.getLogger(__name__)

USER_AGENT = "Overread-Subscriptions/0.1"
#: Subscription.error while delivery fails, whatever the cause (the detail is the operator's).
FAILED = "Delivery to channel.endpoint failed"


#: Rest-hook endpoints are retried sooner and longer than a PACS: 5 s doubling to 10 min, 24 times.
DEFAULT_BACKOFF = Backoff(24, timedelta(seconds=5), timedelta(minutes=10))


@dataclass(frozen=True)
class Delivery:
    """One claimed row, read: what to send where."""

    subscription: Stored | None
    kind: str
    resource: Stored | None  # the notified version, for a notification
    headers: dict[str, str]  # the stored channel.header lines, by name


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str]
    content: bytes


class Notifier(OutboxWorker):
    """Claims ``subscription`` rows, the oldest of each Subscription, and delivers them side by side."""

    topic = subscriptions.TOPIC
    in_order = True

    def __init__(
        self,
        executor: Executor,
        hooks: Sequence[Hook] = (),
        backoff: Backoff = DEFAULT_BACKOFF,
        timeout: float = 10.0,
        limit: int = 20,
        threads: int = 8,
        poll: float = 0.5,
        egress: Egress = NOWHERE,
    ) -> None:
        super().__init__(executor, backoff, limit=limit, poll=poll)
        self.hooks, self.egress = hooks, egress
        headers = {"User-Agent": USER_AGENT}
        self.http = httpx.Client(timeout=timeout, follow_redirects=False, headers=headers, trust_env=False)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="subscription-delivery")

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.http.close()

    def work(self, jobs: list[Job]) -> None:
        for future in [self.pool.submit(self.attempt, job) for job in jobs]:
            future.result()

    def handle(self, job: Job) -> None:
        delivery = self._read(job)
        request = _request(delivery)
        if request is None:  # the Subscription is gone or off, the version deleted: nothing to send
            with self.executor.session() as session:
                outbox.complete(session, job.pk)
            return
        try:
            url, host, extensions = self.egress.pinned(request.url)
            headers = {**request.headers, **host}
            response = self.http.request(
                request.method, url, headers=headers, content=request.content, extensions=extensions
            )
            reason = None if response.is_success else f"{request.method} {request.url}: HTTP {response.status_code}"
        except Exception as exc:  # egress.Refused, httpx.HTTPError, or what httpx refuses to send (a non-ASCII header)
            reason = f"{request.method} {request.url}: {type(exc).__name__}: {exc}"
        subscription = delivery.subscription
        subscription_id = subscription.id if subscription else None
        if reason is None:
            with self.executor.session() as session:
                outbox.complete(session, job.pk)
            sub = subscription.resource if subscription else {}
            if subscription_id and (sub.get("status") != "active" or "error" in sub):  # else nothing to change
                self._set_status(subscription_id, "active", None, delivery.kind == subscriptions.HANDSHAKE)
        else:
            log.info("subscription delivery %s failed (attempt %s): %s", job.pk, job.attempts, reason)
            self._failed(job, subscription_id, reason)

    def failed(self, job: Job, exc: Exception) -> None:
        """E.g. a stored Subscription this version cannot read: retried, and the Subscription left as it is."""
        self._failed(job, None, describe(exc))

    def _read(self, job: Job) -> Delivery:
        payload = job.payload
        with self.executor.begin(write=False) as conn:
            repo = Repository(conn)
            sub = repo.current("Subscription", job.resource_id)
            headers = channel_headers.stored(conn, job.resource_id)
            resource = None
            if payload.get("kind") == subscriptions.NOTIFICATION:
                try:
                    resource = repo.vread(payload["type"], payload["id"], int(payload["version"]))
                except FhirError:
                    resource = None  # the version was a deletion, or is gone
        return Delivery(sub if sub and sub.content else None, str(payload.get("kind")), resource, headers)

    def _failed(self, job: Job, subscription_id: str | None, reason: str) -> None:
        with self.executor.session() as session:
            again = self.retry(session, job, reason)
        if subscription_id:  # the reason stays the operator's (log, outbox row)
            told = FAILED if again else f"{FAILED} (gave up after {job.attempts} attempts)"
            self._set_status(subscription_id, "error", told)

    def _set_status(self, subscription_id: str, status: str, reason: str | None, handshake: bool = False) -> None:
        """Subscription.status/error, through the repository, only when they change.

        ``active`` after a success replaces ``error`` (and ``requested`` after a handshake);
        ``error`` replaces ``requested`` or ``active``; ``off`` (the client's) is kept.
        """
        allowed: tuple[str, ...] = ("requested", "active", "error")  # to error
        if status == "active":
            allowed = ("requested", "error") if handshake else ("error",)
        written = False
        try:
            with self.executor.session() as session:
                repo = Repository(session, self.hooks)
                current = repo.current("Subscription", subscription_id, for_update=True)
                if current is None or current.content is None:
                    return
                sub = current.resource
                if sub.get("status") not in allowed:
                    return
                updated = {k: v for k, v in sub.items() if k not in ("meta", "error")}
                updated["status"] = status
                if reason:
                    updated["error"] = reason
                written = repo.update_if_changed(current, updated) is not None
                repo.complete()
        except Exception:  # the row's outcome is recorded; a status we cannot write must not undo it
            log.exception("could not set Subscription/%s to %s", subscription_id, status)
        if written:  # again, once committed: a load between the hook's invalidation and the commit was stale
            subscriptions.invalidate()


def _request(delivery: Delivery) -> Request | None:
    """The HTTP request of a handshake or notification; None when there is nothing to send."""
    sub = delivery.subscription.resource if delivery.subscription else None
    if sub is None:
        return None
    channel: dict[str, Any] = sub.get("channel", {})
    endpoint = str(channel.get("endpoint", ""))
    headers = _headers(channel_headers.unmasked([str(h) for h in channel.get("header", [])], delivery.headers))
    if delivery.kind == subscriptions.HANDSHAKE:
        if sub.get("status") not in ("requested", "error"):
            return None  # made active or off by the client meanwhile
        return Request("POST", endpoint, headers, b"")
    if sub.get("status") not in subscriptions.NOTIFIED or delivery.resource is None:
        return None
    payload = channel.get("payload", "")
    if not payload:
        return Request("POST", endpoint, headers, b"")
    resource = delivery.resource
    url = f"{endpoint.rstrip('/')}/{resource.type}/{resource.id}"
    body = (resource.content or "").encode()
    return Request("PUT", url, {**headers, "Content-Type": f"{payload}; charset=utf-8"}, body)  # the nominated type


def _headers(lines: list[str]) -> dict[str, str]:
    """Subscription.channel.header, "Name: value" each, as request headers."""
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = str(line).partition(":")
        if name.strip():
            headers[name.strip()] = value.strip()
    return headers
