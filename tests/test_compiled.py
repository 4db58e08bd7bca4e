"""fhir_server.compiled: statements run on the driver's cursor write what Core writes, and fail as
Core fails, on both databases."""

from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from fhir_server import compiled
from fhir_server.schema import ResourceRow

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


def test_insert_rows_writes_every_row_as_core_would(db):
    # Microseconds, a NULL and a quote: on PostgreSQL the rows travel as one JSON text.
    later = WHEN.replace(microsecond=123456)
    rows = [{**row(f"many-{n}"), "version": n, "last_updated": later, "content": '{"a": "\\"q"}'} for n in (1, 2)]
    rows.append({**row("many-3"), "version": 3, "deleted": True, "content": None})
    with db.begin() as conn:
        compiled.insert_rows(conn, ResourceRow.__table__, rows)
        stored = conn.execute(
            select(ResourceRow.version, ResourceRow.last_updated, ResourceRow.deleted, ResourceRow.content)
            .where(ResourceRow.id.like("many-%"))
            .order_by(ResourceRow.version)
        )
        assert [tuple(r) for r in stored] == [
            (r["version"], r["last_updated"], r["deleted"], r["content"]) for r in rows
        ]


def test_a_pipeline_writes_in_one_go_and_fails_as_core_would(db):
    with db.begin() as conn, compiled.pipeline(conn):
        for n in range(3):
            compiled.execute(conn, insert(ResourceRow), row(f"piped-{n}"))
    with pytest.raises(IntegrityError), db.begin() as conn, compiled.pipeline(conn):  # PostgreSQL: at the sync
        compiled.execute(conn, insert(ResourceRow), row("piped-3"))
        compiled.execute(conn, insert(ResourceRow), row("piped-0"))  # (type, id) is unique
    with db.begin() as conn:
        ids = conn.execute(select(ResourceRow.id).where(ResourceRow.id.like("piped-%")).order_by(ResourceRow.id))
        assert list(ids.scalars()) == ["piped-0", "piped-1", "piped-2"]
