"""fhir_server.executor_postgres: on PostgreSQL a request's unit of work runs on the event loop over
asyncpg, one transaction each, and writes what the sync path writes."""

import asyncio
from typing import Any

import greenlet
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Connection

from fhir_server.executor_postgres import PostgresExecutor
from fhir_server.repository import Repository
from overread.app import create_app
from overread.settings import Settings

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
FHIR = {"content-type": "application/fhir+json"}


@pytest.fixture
def units_run(monkeypatch):
    """The units the HTTP adapter ran on the event loop, by their answers' status."""
    statuses: list[int] = []
    run = PostgresExecutor.run

    async def counted(self, work, **where):
        response = await run(self, work, **where)
        statuses.append(response.status)
        return response

    monkeypatch.setattr(PostgresExecutor, "run", counted)
    return statuses


def patient(mrn: str) -> dict[str, object]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": mrn}]}


def test_writes_run_on_the_loop_and_are_committed_for_every_reader(db, units_run):
    with TestClient(create_app(Settings(database_url=db.url), db)) as client:
        created = client.post("/fhir/Patient", json=patient("loop-1"), headers=FHIR)
        updated = client.put(
            f"/fhir/Patient/{created.json()['id']}",
            json={**patient("loop-1"), "id": created.json()["id"], "gender": "other"},
            headers={**FHIR, "if-match": created.headers["etag"]},
        )
        found = client.get("/fhir/Patient", params={"identifier": "urn:mrn|loop-1"}).json()
    assert (created.status_code, updated.status_code) == (201, 200)
    assert units_run == [201, 200, 200]  # the create, the update, the search
    assert [e["resource"]["gender"] for e in found["entry"]] == ["other"]
    with db.begin() as conn:  # the sync engine (workers, HL7) sees the same rows, index included
        repo = Repository(conn)
        assert repo.read("Patient", created.json()["id"]).version == 2
        assert [s.id for s in repo.with_token("Patient", "identifier", "urn:mrn", "loop-1")] == [created.json()["id"]]


def test_an_error_answer_leaves_nothing_written(db, units_run):
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient("loop-2"), "request": {"method": "POST", "url": "Patient"}},
            {
                "resource": {"resourceType": "Patient", "gender": "neither"},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    with TestClient(create_app(Settings(database_url=db.url), db)) as client:
        failed = client.post("/fhir", json=bundle, headers=FHIR)
    assert failed.status_code == 422 and failed.json()["resourceType"] == "OperationOutcome"
    assert units_run == [422]
    with db.begin() as conn:
        assert Repository(conn).with_token("Patient", "identifier", "urn:mrn", "loop-2") == []


def test_a_lost_connection_answers_500_and_the_next_request_succeeds(db, units_run):
    dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with TestClient(create_app(Settings(database_url=db.url), db)) as client:
        assert client.post("/fhir/Patient", json=patient("loop-3"), headers=FHIR).status_code == 201
        with psycopg.connect(dsn, autocommit=True) as admin:  # what a PostgreSQL restart does to the pools
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        lost = client.post("/fhir/Patient", json=patient("loop-4"), headers=FHIR)
        again = client.post("/fhir/Patient", json=patient("loop-5"), headers=FHIR)
    assert lost.status_code == 500 and lost.json()["resourceType"] == "OperationOutcome"
    assert again.status_code == 201


def test_a_unit_runs_whole_in_one_greenlet(db):
    """Checkout, BEGIN, the work, COMMIT and checkin in one greenlet: each greenlet started maps a
    frame stack of its own (docs/history/performance-log.md, "System calls"), and AsyncEngine.begin() with
    run_sync started five per request."""
    units = PostgresExecutor(db)
    switched_to: set[Any] = set()

    def trace(event: str, args: Any) -> None:
        if event in ("switch", "throw"):
            switched_to.add(args[1])  # (origin, target)

    def work(conn: Connection) -> int:
        return int(conn.exec_driver_sql("SELECT 41 + 1").scalar_one())

    async def run_traced() -> int:
        async with units.opened():
            await units.run(work, write=True)  # the pool's first connection
            loop_greenlet = greenlet.getcurrent()
            previous = greenlet.settrace(trace)
            try:
                answer = await units.run(work, write=True)
            finally:
                greenlet.settrace(previous)
        switched_to.discard(loop_greenlet)
        return answer

    assert asyncio.run(run_traced()) == 42
    assert len(switched_to) == 1
