"""SQLite's writer commits the write requests queued meanwhile together (``fhir_server.db.WriteGroups``).

Every request is still all or nothing on its own, and none is answered before its group is committed.
"""

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette

from fhir_server.api import mount
from fhir_server.db import Database, WriteGroups
from overread.migrate import upgrade
from tests.builders import patient


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'groups.db'}")
    upgrade(database.engine)
    yield database
    database.dispose()


@pytest.fixture
def groups(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The size of every group the writer committed (or tried to)."""
    sizes: list[int] = []
    drain = WriteGroups._drain

    def recording(self: WriteGroups) -> None:
        if self._queue:
            sizes.append(min(len(self._queue), self.LIMIT))
        drain(self)

    monkeypatch.setattr(WriteGroups, "_drain", recording)
    return sizes


def post_at_once(db: Database, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body at the same time, through the ASGI app on one event loop."""
    app = Starlette()
    mount(app, db)

    async def send() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"content-type": "application/fhir+json"}
            return list(await asyncio.gather(*(client.post("/fhir/Patient", json=b, headers=headers) for b in bodies)))

    return asyncio.run(send())


def stored(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM resource WHERE type = 'Patient'").scalar() or 0)


def test_a_group_keeps_its_good_requests_and_undoes_its_bad_ones(db, groups):
    bodies = [patient(mrn=f"MRN-{i}") if i % 3 else {**patient(mrn=f"MRN-{i}"), "gender": "yes"} for i in range(12)]
    responses = post_at_once(db, bodies)
    assert [r.status_code for r in responses] == [422 if i % 3 == 0 else 201 for i in range(12)]
    assert max(groups) > 1  # the requests did share transactions
    assert stored(db) == 8
    ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 8


def test_a_failed_commit_fails_every_request_of_its_group(
    db: Database, groups: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_begin = db.begin

    @contextmanager
    def commit_fails(write: bool = True) -> Iterator[Connection]:
        with real_begin(write) as conn:
            yield conn
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    monkeypatch.setattr(db, "begin", commit_fails)
    responses = post_at_once(db, [patient(mrn=f"MRN-{i}") for i in range(6)])
    assert {r.status_code for r in responses} == {500}
    assert all(r.json()["resourceType"] == "OperationOutcome" for r in responses)
    assert stored(db) == 0


def test_a_group_is_at_most_limit_requests(db, groups, monkeypatch):
    monkeypatch.setattr(WriteGroups, "LIMIT", 3)
    responses = post_at_once(db, [patient(mrn=f"MRN-{i}") for i in range(10)])
    assert {r.status_code for r in responses} == {201}
    assert max(groups) == 3 and sum(groups) == 10
    assert stored(db) == 10


def test_what_groups_commit_reaches_the_database_file_within_a_checkpoint_interval(db, tmp_path, monkeypatch):
    monkeypatch.setattr(WriteGroups, "CHECKPOINT_EVERY", 0.05)
    checkpoints: list[float] = []
    real = WriteGroups.checkpoint
    monkeypatch.setattr(WriteGroups, "checkpoint", lambda self: (real(self), checkpoints.append(time.monotonic())))
    (created,) = post_at_once(db, [patient(mrn="MRN-CHECKPOINT")])
    deadline = time.monotonic() + 5
    while not checkpoints and time.monotonic() < deadline:
        time.sleep(0.01)
    # The database file alone, without its WAL, has the resource: the checkpoint copied it there.
    shutil.copy(tmp_path / "groups.db", tmp_path / "file-only.db")
    with sqlite3.connect(tmp_path / "file-only.db") as file_only:
        rows = file_only.execute("SELECT id FROM resource WHERE type = 'Patient'").fetchall()
    assert rows == [(created.json()["id"],)]
    time.sleep(0.3)  # nothing written since: no more checkpoints
    assert len(checkpoints) == 1
