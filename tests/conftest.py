"""Fixtures: every storage test runs on SQLite and on PostgreSQL.

PostgreSQL: each test session (each xdist worker) creates databases of its own on the
server named by OVERREAD_TEST_POSTGRES_URL (``PostgresDatabases``), migrates each once,
empties one before each test and drops them all at the end, so parallel runs and CI jobs
never collide.
"""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import make_url

from fhir_server import dates
from fhir_server.db import Database
from overread.app import create_app, wire_cases
from overread.migrate import METADATA, upgrade
from overread.server import running
from overread.settings import Settings

pytest_plugins = ["tests.orthanc"]

POSTGRES_URL = os.environ.get("OVERREAD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
FHIR_JSON = {"content-type": "application/fhir+json"}


@pytest.fixture(scope="session", autouse=True)
def case_rules() -> None:
    """Every test runs in a process set up as the server's, with the case rules wired: a test that
    validates or writes without building an app or hooks holds resources to them too, whichever
    test ran before it. That importing wires nothing is tests/test_wiring.py's."""
    wire_cases()


class PostgresDatabases:
    """The migrated PostgreSQL databases of one test session, each lent to one holder at a time: the
    session's own (``postgres_url``) and one for each module-scoped store. A database given back is
    emptied when lent again, so a module's store costs neither a migration nor a DROP DATABASE (which
    waits for a checkpoint of the whole server); all are dropped when the session ends."""

    def __init__(self) -> None:
        self.admin = make_url(POSTGRES_URL)
        self.dsn = self.admin.set(drivername="postgresql").render_as_string(hide_password=False)
        self.databases: dict[str, Database] = {}  # by URL, each kept open to empty it
        self.free: list[str] = []

    @contextmanager
    def lend(self) -> Iterator[str]:
        """The URL of an empty, migrated database of this session's, until the block ends."""
        url = self.free.pop() if self.free else self._create()
        self.empty(url)
        try:
            yield url
        finally:
            self.free.append(url)

    def empty(self, url: str) -> None:
        """Delete every row and restart every sequence, as TRUNCATE ... RESTART IDENTITY would, but
        without the new files for every table and index that make a TRUNCATE before each test cost
        tens of milliseconds on a busy disk."""
        with self.databases[url].engine.begin() as conn:
            for table in reversed(METADATA.sorted_tables):  # rows that refer to others go first
                conn.execute(table.delete())
            conn.exec_driver_sql("SELECT setval(seqrelid, seqstart, false) FROM pg_sequence")

    def _create(self) -> str:
        name = f"overread_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = self.admin.set(database=name).render_as_string(hide_password=False)
        self.databases[url] = db = Database(url, pool_pre_ping=True)  # tests may end every connection to it
        upgrade(db.engine)
        return url

    def drop(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            for db in self.databases.values():
                db.dispose()
                conn.execute(f'DROP DATABASE IF EXISTS "{db.engine.url.database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[PostgresDatabases]:
    databases = PostgresDatabases()
    yield databases
    databases.drop()


@pytest.fixture(scope="session")
def postgres_url(postgres_databases: PostgresDatabases) -> Iterator[str]:
    """The session's database, emptied before each test by ``database_url``."""
    with postgres_databases.lend() as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "overread.db"
    db = Database(f"sqlite:///{path}")
    upgrade(db.engine)
    with db.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.dispose()
    return path


@pytest.fixture
def sqlite_db(sqlite_template: Path, tmp_path: Path) -> Iterator[Database]:
    """A migrated, empty SQLite database, for what only SQLite does (its writer, its threads)."""
    path = tmp_path / "overread.db"
    shutil.copy(sqlite_template, path)
    database = Database(f"sqlite:///{path}")
    yield database
    database.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each kind."""
    if request.param == "sqlite":
        path = tmp_path / "overread.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    request.getfixturevalue("postgres_databases").empty(url)
    return url


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    yield database
    database.dispose()


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=db.url), db), base_url="http://testserver") as c:
        c.headers.update(FHIR_JSON)
        yield c


@pytest.fixture
def live_server(database_url: str) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 (a free port) in a background thread; yields its FHIR base.

    For what TestClient cannot do: concurrent requests from many threads, outside clients
    (fhirpy). The socket is bound before the server starts, so no other process can take
    the port in between, and the base URL is known at once.
    """
    app = create_app(Settings(database_url=database_url))
    try:
        with running(app) as root:
            yield f"{root}/fhir"
    finally:
        app.state.audit.close()  # its queue written now, not into the next test's database
        app.state.db.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A client on the radiology store of tests/search_data.py, loaded once per module and database.

    Read-only search tests share it; a module may override ``store`` with data of its own.
    """
    from tests.search_data import module_client, radiology  # it imports this module

    yield from module_client(request, tmp_path_factory, radiology)


class Clock:
    """The server's clock (``fhir_server.dates.now``) in the test's hand: it stands still until moved,
    so a lease or a backoff runs out when the test says, never because the machine was slow."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at

    def advance(self, by: timedelta) -> None:
        self.at += by


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    stopped = Clock(dates.now())
    monkeypatch.setattr(dates, "now", stopped)
    return stopped
