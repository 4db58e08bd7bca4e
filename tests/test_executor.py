"""fhir_server.executor: where a read or a unit of work runs, on each database, through its public API."""

import asyncio
import threading
from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import Connection, insert

from fhir_server.db import Database, Rollback
from fhir_server.executor import Executor, for_database
from fhir_server.repository import Repository
from fhir_server.schema import ResourceRow
from fhir_server.stored import ReadTarget
from overread.app import create_app
from overread.settings import Settings

ROW = {"type": "Patient", "version": 1, "last_updated": datetime(2026, 1, 1), "deleted": False}


def driver(conn: Connection) -> str:
    return conn.dialect.driver


def thread_of(_conn: Connection) -> str:
    return threading.current_thread().name


def test_reads_find_what_the_repository_finds(db: Database) -> None:
    with db.begin() as conn:
        repo = Repository(conn)
        rid = repo.create({"resourceType": "Patient", "gender": "female"}).id
        repo.update("Patient", rid, {"resourceType": "Patient", "id": rid, "gender": "male"}, None)
    executor = for_database(db)
    targets = [ReadTarget("Patient", rid, None), ReadTarget("Patient", rid, 1), ReadTarget("Patient", "nobody", None)]

    async def read_all() -> list[object]:
        async with executor.opened():
            return list(await asyncio.gather(*(executor.read(t) for t in targets)))

    current, first, missing = asyncio.run(read_all())
    with db.begin() as conn:
        repo = Repository(conn)
        assert (current, first) == (repo.current("Patient", rid), repo.version("Patient", rid, 1))
    assert missing is None


def test_a_rollback_undoes_the_unit_and_answers_its_value(db: Database) -> None:
    executor = for_database(db)

    def undone(conn: Connection) -> str:
        conn.execute(insert(ResourceRow), {**ROW, "id": "undone"})
        raise Rollback("answered")

    def kept(conn: Connection) -> str:
        conn.execute(insert(ResourceRow), {**ROW, "id": "kept"})
        return "written"

    async def both() -> tuple[str, str]:
        async with executor.opened():
            return await executor.run(undone, write=True), await executor.run(kept, write=True)

    assert asyncio.run(both()) == ("answered", "written")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id FROM resource").scalars().all() == ["kept"]


def test_a_threads_units_run_on_that_thread_beside_the_event_loops(db: Database) -> None:
    """A worker's unit (``begin``, ``session``) commits on its own thread while the doors' units
    commit on the event loop; one that raises leaves nothing behind."""
    executor = for_database(db)
    ids = [f"loop-{i}" for i in range(20)]

    def worker() -> list[str]:
        threads = []
        for i in range(20):
            with executor.begin() as conn:
                conn.execute(insert(ResourceRow), {**ROW, "id": f"thread-{i}"})
                threads.append(thread_of(conn))
        with pytest.raises(RuntimeError), executor.session() as session:
            session.execute(insert(ResourceRow), {**ROW, "id": "undone"})
            raise RuntimeError("the unit fails")
        with executor.session() as session:
            session.execute(insert(ResourceRow), {**ROW, "id": "session"})
        return threads

    def writer(rid: str) -> Callable[[Connection], None]:
        def write(conn: Connection) -> None:
            conn.execute(insert(ResourceRow), {**ROW, "id": rid})

        return write

    async def side_by_side() -> list[str]:
        async with executor.opened():
            thread = asyncio.ensure_future(asyncio.to_thread(worker))
            await asyncio.gather(*(executor.run(writer(i), write=True, light=True) for i in ids))
            return await thread

    threads = asyncio.run(side_by_side())
    assert set(threads) == {threads[0]} and threads[0] != threading.current_thread().name
    with executor.begin(write=False) as conn:
        stored = set(conn.exec_driver_sql("SELECT id FROM resource").scalars())
    assert stored == {*ids, *(f"thread-{i}" for i in range(20)), "session"}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_on_sqlite_light_reads_run_on_the_event_loop_and_others_on_reader_threads(db: Database) -> None:
    executor = for_database(db)

    async def both() -> tuple[str, str, str]:
        here = threading.current_thread().name
        return here, await executor.run(thread_of, write=False, light=True), await executor.run(thread_of, write=False)

    here, light, other = asyncio.run(both())
    assert light == here
    assert other.startswith("sqlite-reader")


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_on_postgresql_units_run_on_the_event_loops_driver_while_it_is_open(db: Database) -> None:
    """Opened blocks nest: the outermost opens the event loop's pool and closes it; outside, a thread's."""
    executor: Executor = for_database(db)

    async def drivers() -> list[str]:
        seen = [await executor.run(driver, write=False)]
        async with executor.opened():
            async with executor.opened():  # an application's lifespan inside the MLLP listener's
                seen.append(await executor.run(driver, write=True))
            seen.append(await executor.run(driver, write=True))
        seen.append(await executor.run(driver, write=True))
        return seen

    assert asyncio.run(drivers()) == ["psycopg", "asyncpg", "asyncpg", "psycopg"]


def test_the_pools_are_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERREAD_POOLS__THREADS", "7")
    monkeypatch.setenv("OVERREAD_POOLS__EVENT_LOOP", "5")
    settings = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:5432/unused")
    assert (settings.pools.event_loop, settings.pools.threads) == (5, 7)
    db = create_app(settings).state.db
    try:
        assert db.engine.pool.size() == 7
    finally:
        db.dispose()
