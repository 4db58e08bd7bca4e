"""fhir_server.async_reads: reads by id on PostgreSQL's async driver answer what the repository
reads, go to the database together, and survive a lost connection."""

import asyncio
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.pool import Pool

from fhir_server.executor_postgres import PostgresExecutor
from fhir_server.repository import Repository
from fhir_server.stored import ReadTarget
from overread.app import create_app
from overread.settings import Settings

pytestmark = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def patient(n: int) -> dict[str, object]:
    return {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": f"async-{n}"}]}


def test_reads_waiting_together_are_one_select_per_type_and_each_gets_its_own_row(db):
    with db.begin() as conn:
        repo = Repository(conn)
        patients = [repo.create(patient(n)).id for n in range(12)]
        doctor = repo.create({"resourceType": "Practitioner", "name": [{"family": "Reader"}]}).id
        repo.update("Patient", patients[0], {**patient(0), "id": patients[0], "gender": "female"}, None)
        repo.delete("Patient", patients[1], None)
    targets = [ReadTarget("Patient", rid, None) for rid in patients]
    targets += [
        ReadTarget("Patient", patients[2], None),  # the same resource twice in one batch
        ReadTarget("Practitioner", doctor, None),
        ReadTarget("Patient", "unknown", None),
        ReadTarget("Patient", "not an id\x00", None),  # would fail the whole SELECT: never sent
        ReadTarget("NoSuchType", "x", None),
        ReadTarget("Patient", patients[0], 1),  # a vread
        ReadTarget("Patient", patients[0], 9),
    ]
    reads = PostgresExecutor(db)
    selects: list[str] = []

    def log(query: Any) -> None:
        if "FROM resource" in query.query:
            selects.append(query.args[0])

    def log_selects(dbapi_conn: Any, _record: Any) -> None:  # each new connection of the event loop's pool
        dbapi_conn.driver_connection.add_query_logger(log)

    async def read_all():
        async with reads.opened():
            return await asyncio.gather(*(reads.read(t) for t in targets))

    event.listen(Pool, "connect", log_selects)
    try:
        found = asyncio.run(read_all())
    finally:
        event.remove(Pool, "connect", log_selects)

    with db.begin() as conn:
        repo = Repository(conn)
        expected = [repo.current(t.type, t.id) for t in targets[:-2]]
        expected += [repo.vread("Patient", patients[0], 1), None]
    assert found == expected
    assert found[0].version == 2 and found[1].content is None  # updated, deleted
    assert sorted(selects) == ["Patient", "Patient", "Patient", "Practitioner"]  # 1 per type + 2 vreads


def test_a_lost_connection_fails_the_reads_waiting_on_it_and_the_next_ones_succeed(db):
    with db.begin() as conn:
        rid = Repository(conn).create(patient(1)).id
    reads = PostgresExecutor(db)
    target = ReadTarget("Patient", rid, None)
    dsn = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    async def scenario():
        async with reads.opened():
            assert (await reads.read(target)).id == rid
            with psycopg.connect(dsn, autocommit=True) as admin:  # what a PostgreSQL restart does to us
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            lost = await asyncio.gather(*(reads.read(target) for _ in range(3)), return_exceptions=True)
            return lost, await reads.read(target)

    lost, after = asyncio.run(scenario())
    assert len(lost) == 3 and all(isinstance(exc, Exception) for exc in lost), lost  # each answers a 500
    assert after is not None and after.id == rid


def test_the_http_api_reads_on_the_async_driver_and_without_it(db):
    app = create_app(Settings(database_url=db.url), db)
    with TestClient(app) as client:  # the lifespan opens the async pool
        created = client.post("/fhir/Patient", json=patient(7), headers={"content-type": "application/fhir+json"})
        rid = created.json()["id"]
        on_loop = client.get(f"/fhir/Patient/{rid}")
        gone = client.get("/fhir/Patient/nobody")
        nul = client.get("/fhir/Patient/a%00b")
        nul_version = client.get("/fhir/Patient/a%00b/_history/1")
    plain = TestClient(app).get(f"/fhir/Patient/{rid}")  # no lifespan: the thread pool's connection
    plain_nul = TestClient(app).get("/fhir/Patient/a%00b")
    plain_nul_version = TestClient(app).get("/fhir/Patient/a%00b/_history/1")
    assert on_loop.status_code == plain.status_code == 200
    assert on_loop.content == plain.content and on_loop.headers["etag"] == plain.headers["etag"] == 'W/"1"'
    statuses = {r.status_code for r in (gone, nul, nul_version, plain_nul, plain_nul_version)}
    assert statuses == {404}  # not a 500 from the driver
    assert gone.json()["resourceType"] == plain_nul.json()["resourceType"] == "OperationOutcome"
