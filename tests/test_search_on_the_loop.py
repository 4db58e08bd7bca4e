"""On SQLite a light search is tried on the event loop first, under a deadline (``fhir_server.executor_sqlite``).

A search that runs past it is interrupted by SQLite and answered from a reader thread instead.
"""

import threading
from typing import Any

import httpx
import pytest
from sqlalchemy import event

import fhir_server.db
from fhir_server.api import light
from fhir_server.db import Database, WriteGroups
from fhir_server.http import FhirRequest
from tests.asgi import talk
from tests.builders import patient


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    return sqlite_db


@pytest.fixture
def selects_ran_on(db: Database) -> list[str]:
    """The thread of every SELECT the database ran."""
    threads: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            threads.append(threading.current_thread().name)

    event.listen(db.engine, "before_cursor_execute", record)
    return threads


Call = tuple[str, str, dict[str, Any] | None]


def requests(db: Database, calls: list[Call]) -> list[httpx.Response]:
    """Send the calls one after the other through the ASGI app, on this thread's event loop."""

    async def one_by_one(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.request(method, url, json=body) for method, url, body in calls]

    return talk(db, one_by_one)


def test_a_light_search_runs_on_the_event_loop(db: Database, selects_ran_on: list[str]) -> None:
    created, found = requests(
        db, [("POST", "/fhir/Patient", patient(mrn="MRN-1")), ("GET", "/fhir/Patient?identifier=MRN-1", None)]
    )
    assert found.status_code == 200 and [e["resource"]["id"] for e in found.json()["entry"]] == [created.json()["id"]]
    assert selects_ran_on and set(selects_ran_on) == {threading.current_thread().name}


def test_a_search_past_the_deadline_is_answered_from_a_reader_thread(
    db: Database, selects_ran_on: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every statement on the loop is interrupted at its first look at the clock.
    monkeypatch.setattr(WriteGroups, "INLINE_BUDGET", 0.0)
    monkeypatch.setattr(fhir_server.db, "PROGRESS_STEPS", 1)
    posts: list[Call] = [("POST", "/fhir/Patient", patient(mrn=f"MRN-{i}")) for i in range(3)]
    *created, found, read = requests(
        db, [*posts, ("GET", "/fhir/Patient?_sort=_id", None), ("GET", "/fhir/Patient/x", None)]
    )
    assert found.status_code == 200 and found.json()["total"] == 3
    assert sorted(e["resource"]["id"] for e in found.json()["entry"]) == sorted(r.json()["id"] for r in created)
    assert any(name.startswith("sqlite-reader") for name in selects_ran_on)
    assert read.status_code == 404  # the loop's own connection, interrupted before, still serves reads


@pytest.mark.parametrize(
    ("method", "path", "params", "expected"),
    [
        ("GET", "Patient", [("identifier", "MRN-1")], True),
        ("GET", "Patient", [("_count", "100")], True),
        ("GET", "Patient", [("_count", "101")], False),  # a big page
        ("GET", "Patient", [("_count", "x")], False),  # the search will say what is wrong
        ("GET", "ServiceRequest", [("_include", "ServiceRequest:subject")], False),
        ("GET", "Patient", [("_revinclude:iterate", "Task:focus")], False),
        ("GET", "", [], False),  # a search of every type
        ("GET", "_history", [], False),  # the system's history
        ("GET", "$export", [], False),  # an operation
        ("GET", "Patient/1/_history", [], False),
        ("POST", "Patient/_search", [], False),
    ],
)
def test_light_searches(method: str, path: str, params: list[tuple[str, str]], expected: bool) -> None:
    assert light(FhirRequest(method, path, params), 0) is expected
