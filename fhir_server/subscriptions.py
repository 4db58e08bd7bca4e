"""R4 Subscriptions (subscription.html): which writes notify whom, decided in the writing transaction.

The repository hook (``hook``) does two things, both by outbox rows (topic ``subscription``)
written in the same transaction as the change, which ``fhir_server.notifier`` delivers:

- A Subscription written with status ``requested`` asks for a handshake: the worker POSTs an
  empty body (with the channel's headers) to the endpoint and makes the Subscription
  ``active`` on a 2xx, ``error`` otherwise. A Subscription written as ``active`` is taken at
  its word: no handshake. A new channel.endpoint must be one ``fhir_server.egress`` allows (422
  otherwise), and channel.header values are stored apart and written masked
  (``fhir_server.channel_headers``).
- Any other create or update of a resource that matches the criteria of an ``active`` (or
  ``error``: still failing, still queued) rest-hook Subscription leaves one row per
  Subscription. Criteria are evaluated as a search (``Type?params&_id=<id>``) once the unit
  of work is written (``Repository.defer``), so they see the new version's search index.

Every row of the topic names its Subscription (``resource_type``/``resource_id``/
``resource_version`` = the Subscription), the payload what to send: ``{"kind": "handshake"}``
or ``{"kind": "notification", "type", "id", "version"}``. The worker delivers a
Subscription's rows one at a time in the order they were written.

Writes of a type no Subscription watches cost a dictionary lookup: the watched criteria of
every Subscription are cached in the process (per database), reloaded when this process
writes a Subscription and at most ``CACHE_SECONDS`` after another process did. The hook
invalidates before its transaction commits, so a concurrent writer of this process that
reloads in between (PostgreSQL; SQLite writers take turns) may keep the old criteria for up
to ``CACHE_SECONDS`` too; the notifier invalidates again after committing a status.
"""

import threading
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import Engine, false, select

from fhir_server import channel_headers, search
from fhir_server.egress import Egress, Refused
from fhir_server.errors import FhirError, error
from fhir_server.repository import Change, Hook, Repository
from fhir_server.schema import ResourceRow
from fhir_server.search import SearchQuery
from fhir_server.validation import SUPPORTED_TYPES

#: The outbox topic of handshakes and notifications.
TOPIC = "subscription"
HANDSHAKE, NOTIFICATION = "handshake", "notification"
#: The statuses whose Subscriptions get notifications (``error``: delivery is failing, still tried).
NOTIFIED = ("active", "error")
PAYLOADS = ("", "application/fhir+json", "application/json")
#: Types whose changes never notify: the Subscriptions themselves (the worker writes their
#: status) and the audit trail.
UNWATCHED = frozenset({"Subscription", "AuditEvent"})
CACHE_SECONDS = 2.0
#: Headers the server sets: a channel's ``Host`` could pick another virtual host of the endpoint's server.
SERVERS_HEADERS = frozenset({"host", "content-type", "content-length", "transfer-encoding", "connection"})
CRITERIA, CHANNEL = "Subscription.criteria", "Subscription.channel"


@dataclass(frozen=True)
class Watch:
    """An active rest-hook Subscription's criteria, parsed."""

    subscription_id: str
    subscription_version: int
    query: SearchQuery
    end: datetime | None = None  # Subscription.end: "the time for the server to turn the subscription off"

    def live(self, now: datetime) -> bool:
        return self.end is None or now < self.end


class _Cache:
    """Watches by resource type, per database (engine); ``invalidate`` forces a reload."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.loaded: weakref.WeakKeyDictionary[Engine, tuple[float, dict[str, list[Watch]]]] = (
            weakref.WeakKeyDictionary()
        )
        self.invalidated_at = 0.0

    def get(self, repo: Repository) -> dict[str, list[Watch]]:
        engine = repo.conn.engine
        with self.lock:
            entry = self.loaded.get(engine)
        if entry is not None and time.monotonic() - entry[0] < CACHE_SECONDS:
            return entry[1]
        started = time.monotonic()
        by_type = _load(repo)
        with self.lock:
            current = self.loaded.get(engine)
            if started > self.invalidated_at and (current is None or current[0] <= started):
                self.loaded[engine] = (started, by_type)
        return by_type

    def invalidate(self) -> None:
        with self.lock:
            self.loaded.clear()
            self.invalidated_at = time.monotonic()


_cache = _Cache()
_SUBSCRIPTIONS = select(ResourceRow.id, ResourceRow.version, ResourceRow.content).where(
    ResourceRow.type == "Subscription", ResourceRow.deleted == false()
)


def invalidate() -> None:
    """Forget the cached Subscriptions (a Subscription was written)."""
    _cache.invalidate()


def _load(repo: Repository) -> dict[str, list[Watch]]:
    by_type: dict[str, list[Watch]] = {}
    for sub_id, version, content in repo.conn.execute(_SUBSCRIPTIONS):
        sub = orjson.loads(content or "{}")
        if sub.get("status") not in NOTIFIED or sub.get("channel", {}).get("type") != "rest-hook":
            continue
        try:
            query = criteria_query(str(sub.get("criteria", "")))
        except FhirError:
            continue  # refused when written; an old row written before the check is skipped
        end = _instant(sub.get("end"))
        by_type.setdefault(query.resource_type, []).append(Watch(sub_id, version, query, end))
    return by_type


def _instant(value: Any) -> datetime | None:
    try:
        parsed = datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None
    return parsed if parsed is None or parsed.tzinfo else parsed.replace(tzinfo=UTC)


def criteria_query(criteria: str) -> SearchQuery:
    """``Type?name=value&…`` as a search; an OperationOutcome error when it is not one."""
    resource_type, _, query_string = criteria.strip().partition("?")
    if resource_type not in SUPPORTED_TYPES:
        raise error(422, "invalid", f"Subscription.criteria {criteria!r} does not name a supported type", CRITERIA)
    params = parse_qsl(query_string, keep_blank_values=True)
    if any(name.split(":")[0] in search.CONTROL for name, _ in params):
        raise error(422, "invalid", "Subscription.criteria may not use result parameters (_count, _sort …)", CRITERIA)
    try:
        return search.parse(resource_type, params, strict=True)
    except FhirError as exc:
        raise error(422, "invalid", f"Subscription.criteria {criteria!r}: {exc}", CRITERIA) from None


def hook(egress: Egress) -> Hook:
    """The repository hook of Subscriptions, whose endpoints ``egress`` must allow."""
    return lambda repo, change: notify(repo, change, egress)


def notify(repo: Repository, change: Change, egress: Egress) -> None:
    """Handshakes for requested Subscriptions, notifications for watched changes."""
    if change.type == "Subscription":
        invalidate()
        if change.resource is not None:
            _subscription_written(repo, change, change.resource, egress)
        else:
            channel_headers.keep(repo.conn, change.id, [])
        return
    if change.resource is None or change.type in UNWATCHED:
        return  # deletions do not notify
    watches = _cache.get(repo).get(change.type)
    if watches:
        resource_type, resource_id, version = change.type, change.id, change.version
        repo.defer(lambda r: _match(r, resource_type, resource_id, version))


def _subscription_written(repo: Repository, change: Change, sub: dict[str, Any], egress: Egress) -> None:
    channel = sub.get("channel", {})
    if channel.get("type") != "rest-hook":
        raise error(422, "not-supported", "Only rest-hook Subscriptions are supported", f"{CHANNEL}.type")
    if channel.get("payload", "") not in PAYLOADS:
        raise error(
            422,
            "not-supported",
            "Subscription.channel.payload must be empty or application/fhir+json",
            f"{CHANNEL}.payload",
        )
    endpoint = str(channel.get("endpoint", ""))
    before = change.previous.resource if change.previous else {}
    if endpoint != before.get("channel", {}).get("endpoint"):  # a new one; each delivery checks it again
        try:
            egress.check(endpoint, resolve_names=False)
        except Refused as exc:
            raise error(422, "business-rule", f"Subscription.channel.endpoint: {exc}", f"{CHANNEL}.endpoint") from None
    lines = [str(line) for line in channel.get("header", [])]
    for header in lines:
        if ":" not in header or not header.isascii():  # HTTP header fields are ASCII here (httpx sends no other)
            raise error(
                422,
                "invalid",
                f"Subscription.channel.header {header!r} is not 'Name: value' in ASCII",
                f"{CHANNEL}.header",
            )
        if header.partition(":")[0].strip().lower() in SERVERS_HEADERS:
            raise error(422, "invalid", f"Subscription.channel.header may not set {header!r}", f"{CHANNEL}.header")
    criteria_query(str(sub.get("criteria", "")))
    whole = channel_headers.unmasked(lines, channel_headers.stored(repo.conn, change.id))
    channel_headers.keep(repo.conn, change.id, whole)
    if whole:
        change.resource = {**sub, "channel": {**channel, "header": [channel_headers.masked(h) for h in whole]}}
    if sub.get("status") == "requested":
        repo.enqueue(TOPIC, change, {"kind": HANDSHAKE})


@dataclass(frozen=True)
class _Version:
    type: str
    id: str
    version: int


def _match(repo: Repository, resource_type: str, resource_id: str, version: int) -> None:
    """Deferred: one row per Subscription whose criteria the written version matches."""
    current = repo.current(resource_type, resource_id)
    if current is None or current.version != version or current.content is None:
        return  # a later write of this unit of work (which has its own turn) or a deletion
    only_this = search.parse(resource_type, [("_id", resource_id)]).criteria
    now = datetime.now(UTC)
    for watch in _cache.get(repo).get(resource_type, []):
        if not watch.live(now):
            continue
        query = SearchQuery(resource_type, [*watch.query.criteria, *only_this])
        if repo.conn.execute(search.statement(query).limit(1)).first() is not None:
            payload = {"kind": NOTIFICATION, "type": resource_type, "id": resource_id, "version": version}
            subscription = _Version("Subscription", watch.subscription_id, watch.subscription_version)
            repo.enqueue(TOPIC, subscription, payload)
