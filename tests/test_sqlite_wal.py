"""SQLite's WAL does not keep the size of a large write (docs/reliability.md, "The SQLite WAL")."""

import threading
from pathlib import Path

import pytest
from sqlalchemy import text

from fhir_server import db as db_module
from fhir_server.db import Database

LIMIT = 1 << 20
#: Generous: a bound for a loaded machine, not a latency claim.
WAIT = 20.0


@pytest.fixture
def database(sqlite_db: Database, monkeypatch: pytest.MonkeyPatch) -> Database:
    monkeypatch.setattr(db_module, "WAL_LIMIT", LIMIT)
    database = Database(sqlite_db.url)  # its connections are made under the lowered limit
    with database.begin() as conn:
        conn.execute(text("CREATE TABLE bulk (data BLOB)"))
    return database


def wal(database: Database) -> Path:
    return Path(f"{database.engine.url.database}-wal")


def write(database: Database, megabytes: int) -> None:
    with database.begin() as conn:
        conn.execute(text("INSERT INTO bulk VALUES (randomblob(:size))"), [{"size": 1 << 20}] * megabytes)


def test_a_checkpoint_truncates_a_wal_grown_past_the_limit(database):
    write(database, 8)
    assert wal(database).stat().st_size > 8 * LIMIT
    assert database.groups is not None
    database.groups.checkpoint()
    assert wal(database).stat().st_size <= LIMIT
    database.dispose()


def test_a_reader_in_the_wal_delays_the_truncation_without_blocking_the_checkpoint(database):
    assert database.groups is not None
    with database.engine.begin() as reader:
        reader.execute(text("SELECT count(*) FROM bulk")).scalar_one()  # a snapshot the WAL must keep
        write(database, 8)
        done = threading.Event()
        threading.Thread(target=lambda: (database.groups.checkpoint(), done.set()), daemon=True).start()
        assert done.wait(WAIT), "the checkpoint waited for the reader"  # busy_timeout would hold it 30 s
        assert wal(database).stat().st_size > 8 * LIMIT
    database.groups.checkpoint()
    assert wal(database).stat().st_size <= LIMIT
    database.dispose()


def test_the_first_commit_after_the_wal_restarts_truncates_it_too(database):
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_size_limit").scalar() == LIMIT
    database.dispose()
