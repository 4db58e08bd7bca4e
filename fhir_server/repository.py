"""The one write path of the store, and its reads.

Every write, whatever door it came through (REST, a transaction Bundle, HL7, DICOM, a
worker), goes through ``Repository``: validate → hooks → write → index → outbox, all in the
caller's database transaction. Reads return the stored JSON text without re-validating it.
"""

import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol, cast

import orjson
from sqlalchemy import (
    Boolean,
    Connection,
    DateTime,
    Insert,
    Integer,
    String,
    Table,
    Text,
    TextClause,
    bindparam,
    delete,
    false,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import BindParameter
from sqlalchemy.types import TypeEngine

from fhir_server import compiled, dates, search
from fhir_server.errors import error
from fhir_server.indexing import index_rows, split
from fhir_server.schema import INDEX_TABLES, OutboxRow, ReferenceIndex, ResourceRow, TokenIndex, VersionRow
from fhir_server.stored import Stored as Stored  # the type of every read; its home breaks a cycle with search
from fhir_server.validation import ID, check_id, check_type, validate


@dataclass
class Change:
    """What a write is about to do; hooks may inspect and amend ``resource``, or raise."""

    method: str  # POST, PUT, DELETE
    type: str
    id: str
    resource: dict[str, Any] | None
    previous: Stored | None

    @property
    def version(self) -> int:
        """The version number this write will store (a hook can enqueue work for it)."""
        return self.previous.version + 1 if self.previous else 1


def same_content(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two versions of a resource say the same: ``id`` and ``meta`` are the server's (R4 resource.html)."""
    if a is None or b is None:
        return a is b
    return _content(a) == _content(b)


def _content(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


class Versioned(Protocol):
    """One version of a resource: a ``Stored`` after a write, or a ``Change`` inside a hook."""

    @property
    def type(self) -> str: ...
    @property
    def id(self) -> str: ...
    @property
    def version(self) -> int: ...


Hook = Callable[["Repository", Change], None]

_r = ResourceRow.__table__.c
_CURRENT = select(_r.version, _r.last_updated, _r.content).where(_r.type == bindparam("type"), _r.id == bindparam("id"))
_CURRENT_FOR_UPDATE = _CURRENT.with_for_update()
_STORED = (_r.id, _r.version, _r.last_updated, _r.content)
_t, _ref = TokenIndex.__table__.c, ReferenceIndex.__table__.c


def _current_with(index: Any, *criteria: Any) -> Any:
    """Current resources with an ``index`` row meeting ``criteria``, oldest first, at most ``:limit``."""
    with_row = select(index.resource_pk).where(index.res_type == bindparam("type"), *criteria)
    return select(*_STORED).where(_r.pk.in_(with_row), _r.deleted == false()).order_by(_r.pk).limit(bindparam("limit"))


# What ``Type?param=system|code`` and ``Type?param=Target/id`` find, as prebuilt statements: the
# domain rules look resources up this way on every order, without the search machinery (parsing,
# building, a window count) that no such lookup needs.
_WITH_TOKEN = _current_with(
    _t,
    _t.param == bindparam("param"),
    _t.system == bindparam("system"),
    _t.system_rest == bindparam("system_rest"),
    _t.code == bindparam("code"),
    _t.code_rest == bindparam("code_rest"),
)
_REFERRING = _current_with(
    _ref,
    _ref.param == bindparam("param"),
    _ref.target_type == bindparam("target_type"),
    _ref.target_id == bindparam("target_id"),
)
_v = VersionRow.__table__.c
#: A vread (also run on the event loop, ``fhir_server.async_reads``).
VERSION = (
    select(_v.last_updated, _v.content)
    .join_from(VersionRow, ResourceRow, _v.resource_pk == _r.pk)
    .where(_r.type == bindparam("type"), _r.id == bindparam("id"), _v.version == bindparam("version"))
)
# The write path's statements, built once and run as Core on the session's connection
# (the ORM's bulk-insert machinery cost more than the inserts themselves).
_INDEX = [cast(Table, t.__table__) for t in INDEX_TABLES]
_INSERT_RESOURCE = insert(ResourceRow).returning(ResourceRow.pk)
_UPDATE_RESOURCE = (
    update(ResourceRow).where(_r.type == bindparam("key_type"), _r.id == bindparam("key_id")).returning(ResourceRow.pk)
)
_INSERT_VERSION = insert(VersionRow)
_INSERT_OUTBOX = insert(OutboxRow)
_INSERT_INDEX: dict[Table, Insert] = {t: insert(t) for t in _INDEX}
_DELETE_INDEX = [delete(t).where(t.c.resource_pk == bindparam("pk")) for t in _INDEX]
_LOCK = text("SELECT pg_advisory_xact_lock(:k)")
_LOCK_ALL = text("SELECT count(pg_advisory_xact_lock(k)) FROM unnest(CAST(:ks AS bigint[])) AS k")


def _require_version(if_match: str | None, current: Stored | None) -> None:
    """``If-Match`` (R4 http.html#concurrency): the write goes ahead only on that version, else 412."""
    if if_match is None:
        return
    expected = if_match.removeprefix("W/").strip('"')
    actual = str(current.version) if current else None
    if expected != actual:
        raise error(412, "conflict", f"If-Match {if_match} but the current version is {actual or 'none'}")


def readable(resource_type: str, resource_id: str, version: int | None, found: Stored | None) -> Stored:
    """What a read (``version`` None) or vread found, or its 404 (never existed) or 410 (deleted)."""
    if found is None:
        known = f"has no version {version}" if version is not None else "is not known"
        raise error(404, "not-found", f"{resource_type}/{resource_id} {known}")
    if found.content is None:
        if version is not None:
            raise error(410, "deleted", f"Version {version} of {resource_type}/{resource_id} is a deletion")
        raise error(410, "deleted", f"{resource_type}/{resource_id} was deleted (version {found.version})")
    return found


def _lock_id(key: str) -> int:
    """The advisory lock of a key: a 64-bit hash of it."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


class Repository:
    """The store, on one database connection inside the caller's transaction.

    It speaks SQLAlchemy Core only; given an ORM Session it works on the Session's
    connection, so the Session's transaction is its transaction.
    """

    def __init__(self, db: Session | Connection, hooks: Sequence[Hook] = (), base: str = "") -> None:
        self.conn = db.connection() if isinstance(db, Session) else db
        self.hooks = hooks
        #: This server's FHIR base, as the request reached it: a reference under it is indexed as local.
        self.base = base.rstrip("/")
        self._deferred: list[Callable[[Repository], None]] = []

    def defer(self, work: Callable[["Repository"], None]) -> None:
        """Work a hook wants done once the whole unit of work is written (``complete``)."""
        self._deferred.append(work)

    def complete(self) -> None:
        """Run deferred work, in this transaction: the door calls it once, before committing.

        A hook sees one write; some rules need the whole request (does this transaction
        Bundle carry the Task for the ServiceRequest it creates?), so they wait for this.
        """
        while self._deferred:
            self._deferred.pop(0)(self)

    # -- reads -------------------------------------------------------------------

    def current(self, resource_type: str, resource_id: str, *, for_update: bool = False) -> Stored | None:
        """The current version (a deletion included), or None if the resource never existed."""
        if not ID.fullmatch(resource_id):  # never stored; PostgreSQL would refuse a NUL in it (a 500)
            return None
        stmt = _CURRENT_FOR_UPDATE if for_update else _CURRENT  # built once: the hottest read
        row = self.conn.execute(stmt, {"type": resource_type, "id": resource_id}).one_or_none()
        return None if row is None else Stored(resource_type, resource_id, *row)

    def with_token(self, resource_type: str, param: str, system: str, code: str, limit: int = 100) -> list[Stored]:
        """Current resources whose token ``param`` is ``system|code`` (a token search parameter of the type)."""
        (system, system_rest), (code, code_rest) = split(system), split(code)
        values = {"type": resource_type, "param": param, "limit": limit, "system": system,
                  "system_rest": system_rest, "code": code, "code_rest": code_rest}  # fmt: skip
        return [Stored(resource_type, *row) for row in self.conn.execute(_WITH_TOKEN, values)]

    def referring(self, resource_type: str, param: str, target: str, limit: int = 100) -> list[Stored]:
        """Current resources whose reference ``param`` is ``target`` (``Type/id``)."""
        target_type, _, target_id = target.partition("/")
        values = {"type": resource_type, "param": param, "target_type": target_type, "target_id": target_id}
        return [Stored(resource_type, *row) for row in self.conn.execute(_REFERRING, {**values, "limit": limit})]

    def search(self, resource_type: str, params: Sequence[tuple[str, str]]) -> list[Stored]:
        """What ``resource_type?params`` finds (R4 search.html), as the REST API would: its first page."""
        return search.execute(self.conn, search.parse(resource_type, list(params))).matches

    def read(self, resource_type: str, resource_id: str) -> Stored:
        check_type(resource_type)
        return readable(resource_type, resource_id, None, self.current(resource_type, resource_id))

    def version(self, resource_type: str, resource_id: str, version: int) -> Stored | None:
        """One version (a deletion included), or None if it never existed."""
        if not ID.fullmatch(resource_id):  # as in ``current``
            return None
        values = {"type": resource_type, "id": resource_id, "version": version}
        row = self.conn.execute(VERSION, values).one_or_none()
        return None if row is None else Stored(resource_type, resource_id, version, *row)

    def vread(self, resource_type: str, resource_id: str, version: int) -> Stored:
        check_type(resource_type)
        return readable(resource_type, resource_id, version, self.version(resource_type, resource_id, version))

    # -- the write path ------------------------------------------------------------

    def lock(self, key: str) -> None:
        """Serialise transactions that decide on the same key, until this transaction ends.

        SQLite write transactions already hold the database lock (BEGIN IMMEDIATE);
        PostgreSQL takes a transaction-scoped advisory lock on a 64-bit hash of the key.
        """
        if self.conn.dialect.name == "postgresql":
            self.conn.execute(_LOCK, {"k": _lock_id(key)})

    def lock_all(self, keys: Sequence[str]) -> None:
        """``lock`` each key, in the order given, in one statement (one round trip on PostgreSQL).

        unnest() yields the array's elements in order and the locks are taken row by row,
        so callers that sort their keys take them in one global order, as with ``lock``.
        """
        if len(keys) == 1:
            self.lock(keys[0])
        elif keys and self.conn.dialect.name == "postgresql":
            self.conn.execute(_LOCK_ALL, {"ks": [_lock_id(key) for key in keys]})

    def create(self, resource: dict[str, Any], resource_id: str | None = None) -> Stored:
        """Create with a new server id (or the id a transaction Bundle assigned)."""
        resource = validate(resource, store=self)
        return self._write("POST", resource["resourceType"], resource_id or str(uuid.uuid4()), resource, None)

    def create_own(self, resource: dict[str, Any]) -> Stored:
        """Create a resource this server built itself (an AuditEvent), unvalidated: validating it
        would cost several times its write, on every request (its shapes are tested instead)."""
        return self._write("POST", resource["resourceType"], str(uuid.uuid4()), resource, None)

    def update(
        self, resource_type: str, resource_id: str, resource: dict[str, Any], if_match: str | None = None
    ) -> tuple[Stored, bool]:
        """Update, or create with the client's id (update-as-create). Returns (stored, created)."""
        check_type(resource_type)
        check_id(resource_id)
        resource = validate(resource, resource_type, self)
        if resource.get("id") != resource_id:
            raise error(400, "invalid", f"The body's id {resource.get('id')!r} is not {resource_id!r}", "id")
        self.lock(f"{resource_type}/{resource_id}")
        previous = self.current(resource_type, resource_id, for_update=True)
        _require_version(if_match, previous)
        method = "PUT"  # even when it creates: hooks tell the create interaction (POST) from this
        # Updating a deleted resource brings it back (R4 http.html#delete: "Resources that have
        # been deleted may be 'brought back to life' by a subsequent update"): to the client it
        # did not exist (a read said 410), so this is a create, 201, at the next version number.
        created = previous is None or previous.content is None
        return self._write(method, resource_type, resource_id, resource, previous), created

    def update_if_changed(self, current: Stored, resource: dict[str, Any]) -> Stored | None:
        """Update ``current`` to ``resource`` unless the two say the same (``same_content``); the new
        version, or None when there was nothing to write. ``current``'s meta is kept unless
        ``resource`` has one; the update fails (412) if ``current`` is no longer the current version.
        """
        before = current.resource
        if same_content(before, resource):
            return None
        updated = {"meta": before.get("meta", {}), **resource, "id": current.id}
        return self.update(current.type, current.id, updated, current.etag)[0]

    def delete(self, resource_type: str, resource_id: str, if_match: str | None = None) -> Stored | None:
        """Delete (a versioned tombstone). None when there was nothing to delete."""
        check_type(resource_type)
        previous = self.current(resource_type, resource_id, for_update=True)
        _require_version(if_match, previous)
        if previous is None or previous.content is None:
            return None
        return self._write("DELETE", resource_type, resource_id, None, previous)

    def enqueue(self, topic: str, stored: Versioned, payload: dict[str, Any] | None = None) -> None:
        """An outbox row: work for a worker, committed or rolled back with this write.

        Hooks run before the write, so they pass the ``Change`` they were given: the row
        names the version the write is about to store.
        """
        now = dates.now()
        compiled.execute(
            self.conn,
            _INSERT_OUTBOX,
            {
                "topic": topic,
                "resource_type": stored.type,
                "resource_id": stored.id,
                "resource_version": stored.version,
                "payload": orjson.dumps(payload or {}).decode(),
                "status": "pending",
                "attempts": 0,
                "created_at": now,
                "available_at": now,
            },
        )

    def _write(
        self,
        method: str,
        resource_type: str,
        resource_id: str,
        resource: dict[str, Any] | None,
        previous: Stored | None,
    ) -> Stored:
        change = Change(method, resource_type, resource_id, resource, previous)
        for hook in self.hooks:
            hook(self, change)
        version = change.version
        now = dates.now()
        stored_json = content = None
        if change.resource is not None:
            meta = {
                **change.resource.get("meta", {}),
                "versionId": str(version),
                "lastUpdated": dates.instant(now),
            }
            stored_json = {**change.resource, "id": resource_id, "meta": meta}
            content = orjson.dumps(stored_json).decode()

        conn = self.conn
        values = {"version": version, "last_updated": now, "deleted": content is None, "content": content}
        row = {"type": resource_type, "id": resource_id, **values}
        index = _index_by_table(resource_type, stored_json, self.base) if stored_json is not None else {}
        if conn.dialect.name == "postgresql":
            tables = tuple((table.name, tuple(rows[0])) for table, rows in index.items())
            json_rows = {table.name: orjson.dumps(rows).decode() for table, rows in index.items()}
            compiled.execute(conn, _pg_write(previous is not None, tables), {**row, "method": method, **json_rows})
            return Stored(resource_type, resource_id, version, now, content)
        if previous is None:
            (pk,) = compiled.execute(conn, _INSERT_RESOURCE, row)
        else:
            key = {"key_type": resource_type, "key_id": resource_id}
            (pk,) = compiled.execute(conn, _UPDATE_RESOURCE, {**key, **values})
            for statement in _DELETE_INDEX:
                compiled.execute(conn, statement, {"pk": pk})
        compiled.execute(conn, _INSERT_VERSION, {**row, "resource_pk": pk, "method": method})
        for table, rows in index.items():
            keyed = [{**r, "resource_pk": pk, "res_type": resource_type} for r in rows]
            compiled.executemany(conn, _INSERT_INDEX[table], keyed)
        return Stored(resource_type, resource_id, version, now, content)


def _index_by_table(resource_type: str, resource: dict[str, Any], base: str) -> dict[Table, list[dict[str, Any]]]:
    """The search index rows of a resource (``fhir_server.indexing``), by table."""
    rows: dict[Table, list[dict[str, Any]]] = {}
    for table, values in index_rows(resource_type, resource, base):
        sql_table = cast(Table, table.__table__)
        _check_lengths(sql_table, values)
        rows.setdefault(sql_table, []).append(values)
    return rows


def _check_lengths(table: Table, values: dict[str, Any]) -> None:
    """422 for a value longer than its index column holds, before the database sees it: PostgreSQL
    refuses it with an error (SQLite would store it whole)."""
    for name, length in _lengths(table).items():
        value = values.get(name)
        if isinstance(value, str) and len(value) > length:
            param = values.get("param")
            raise error(
                422,
                "too-long",
                f"The value of search parameter {param!r} is over the {length} characters it can be indexed by",
            )


@cache
def _lengths(table: Table) -> dict[str, int]:
    """The length of each length-bound text column of an index table."""
    return {c.name: c.type.length for c in table.columns if isinstance(c.type, String) and c.type.length}


#: What the write statement of PostgreSQL binds besides the index rows, and as what.
_PG_BINDS: dict[str, TypeEngine[Any]] = {
    "type": String(),
    "id": String(),
    "version": Integer(),
    "last_updated": DateTime(),
    "deleted": Boolean(),
    "content": Text(),
    "method": String(),
}


@cache
def _pg_write(update: bool, index: tuple[tuple[str, tuple[str, ...]], ...]) -> TextClause:
    """One statement that writes a resource row, its version row and its index rows
    (``index``: each table and its columns, the rows a JSON parameter named after the table),
    on an update after deleting the resource's old index rows.

    PostgreSQL's data-modifying CTEs (``WITH … AS (INSERT …)``): every part sees the snapshot the
    statement started with, so the DELETEs find only the old index rows, and the statement is
    atomic. One statement instead of one per table: on the event loop (SQLAlchemy's asyncpg
    adapter, ``fhir_server.executor_postgres``) each statement is a round trip of its own.
    """
    if update:
        parts = [
            "r AS (UPDATE resource SET version = :version, last_updated = :last_updated, deleted = :deleted,"
            " content = :content WHERE type = :type AND id = :id RETURNING pk)",
            *(f"d_{t.name} AS (DELETE FROM {t.name} WHERE resource_pk IN (SELECT pk FROM r))" for t in _INDEX),
        ]
    else:
        parts = [
            "r AS (INSERT INTO resource (type, id, version, last_updated, deleted, content)"
            " VALUES (:type, :id, :version, :last_updated, :deleted, :content) RETURNING pk)"
        ]
    parts.append(
        "v AS (INSERT INTO resource_version (resource_pk, version, type, id, last_updated, method, content)"
        " SELECT pk, :version, :type, :id, :last_updated, :method, :content FROM r)"
    )
    for table, columns in index:
        listed, picked = ", ".join(columns), ", ".join(f"x.{c}" for c in columns)
        parts.append(
            f"i_{table} AS (INSERT INTO {table} (resource_pk, res_type, {listed}) SELECT r.pk, :type, {picked}"
            f" FROM r, json_populate_recordset(NULL::{table}, CAST(:{table} AS json)) AS x)"
        )
    binds: list[BindParameter[Any]] = [bindparam(k, type_=t) for k, t in _PG_BINDS.items()]
    binds += [bindparam(table, type_=Text()) for table, _ in index]
    return text("WITH " + ",\n".join(parts) + "\nSELECT pk FROM r").bindparams(*binds)
