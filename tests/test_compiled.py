"""fhir_server.compiled: statements run on the driver's cursor write what Core writes, and fail as
Core fails, on both databases."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from fhir_server import compiled
from fhir_server.repository import Repository
from fhir_server.schema import ResourceRow, StringIndex, TokenIndex, VersionRow

INSERT = insert(ResourceRow).returning(ResourceRow.pk)
# Whole seconds: without SQLAlchemy's DATETIME processor sqlite3 would store "…15", which sorts before "…15.000000".
WHEN = datetime(2026, 11, 28, 9, 30, 15, tzinfo=UTC).replace(tzinfo=None)


def row(resource_id: str) -> dict[str, object]:
    return {"type": "Patient", "id": resource_id, "version": 1, "last_updated": WHEN, "deleted": False, "content": "{}"}


def test_a_row_written_on_the_driver_reads_back_as_core_writes_it(db):
    with db.begin() as conn:
        (pk,) = compiled.execute(conn, INSERT, row("driver"))
        core_pk = conn.execute(INSERT, row("core")).scalar_one()
    with db.begin() as conn:
        found = {r.id: r for r in conn.execute(select(ResourceRow).where(ResourceRow.pk.in_([pk, core_pk])))}
        # Dates compare as Core stored them (SQLite keeps DATETIME as text: the same text, or _lastUpdated breaks).
        later = conn.execute(select(ResourceRow.id).where(ResourceRow.last_updated >= WHEN).order_by(ResourceRow.id))
        assert list(later.scalars()) == ["core", "driver"]
    assert (found["driver"].last_updated, found["driver"].deleted) == (found["core"].last_updated, False)


def test_driver_errors_are_sqlalchemys_and_roll_back_with_the_transaction(db):
    with pytest.raises(IntegrityError), db.begin() as conn:
        compiled.execute(conn, INSERT, row("twice"))
        compiled.execute(conn, INSERT, row("twice"))  # (type, id) is unique
    with db.begin() as conn:
        assert conn.execute(select(ResourceRow.pk).where(ResourceRow.id == "twice")).first() is None


def test_executemany_writes_every_row_as_core_would(db):
    # Microseconds, a NULL, a quote and a backslash, as the driver must send them.
    later = WHEN.replace(microsecond=123456)
    rows = [{**row(f"many-{n}"), "version": n, "last_updated": later, "content": '{"a": "\\"q"}'} for n in (1, 2)]
    rows.append({**row("many-3"), "version": 3, "deleted": True, "content": None})
    with db.begin() as conn:
        compiled.executemany(conn, insert(ResourceRow), rows)
        stored = conn.execute(
            select(ResourceRow.version, ResourceRow.last_updated, ResourceRow.deleted, ResourceRow.content)
            .where(ResourceRow.id.like("many-%"))
            .order_by(ResourceRow.version)
        )
        assert [tuple(r) for r in stored] == [
            (r["version"], r["last_updated"], r["deleted"], r["content"]) for r in rows
        ]


def test_a_write_leaves_exactly_its_version_and_index_rows(db):
    # On PostgreSQL one statement writes them all (repository._pg_write): an update must replace
    # the index rows, not add to them, and a deletion must leave none.
    def patient(mrn: str, family: str) -> dict[str, object]:
        return {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}],
                "name": [{"family": family}]}  # fmt: skip

    def rows(conn, rid):
        pk = conn.execute(select(ResourceRow.pk).where(ResourceRow.id == rid)).scalar_one()
        v, t, n = VersionRow, TokenIndex, StringIndex
        versions = conn.execute(select(v.version).where(v.resource_pk == pk).order_by(v.version))
        tokens = conn.execute(select(t.code).where(t.resource_pk == pk, t.param == "identifier"))
        names = conn.execute(select(n.value).where(n.resource_pk == pk, n.param == "family"))
        return list(versions.scalars()), list(tokens.scalars()), list(names.scalars())

    with db.begin() as conn:
        rid = Repository(conn).create(patient("MRN-1", "Alpha")).id
        assert rows(conn, rid) == ([1], ["MRN-1"], ["Alpha"])
        Repository(conn).update("Patient", rid, {**patient("MRN-2", "Beta"), "id": rid}, None)
        assert rows(conn, rid) == ([1, 2], ["MRN-2"], ["Beta"])
        Repository(conn).delete("Patient", rid, None)
        assert rows(conn, rid) == ([1, 2, 3], [], [])
