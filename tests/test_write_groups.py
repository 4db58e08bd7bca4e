"""SQLite's writer commits the write requests queued meanwhile together (``fhir_server.db.WriteGroups``).

Every request is still all or nothing on its own, and none is answered before its group is committed.
"""

import asyncio
import itertools
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from sqlalchemy import Connection, event, insert
from sqlalchemy.exc import IntegrityError, OperationalError

from fhir_server.api import light
from fhir_server.db import Database, Rollback, WriteGroups
from fhir_server.http import FhirRequest
from fhir_server.schema import ResourceRow
from tests.asgi import talk
from tests.builders import patient

T = TypeVar("T")


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    return sqlite_db


class Groups(list[int]):
    """The size of every group the writer committed (or tried to): the units ``counted`` before each COMMIT."""

    def __init__(self, db: Database) -> None:
        super().__init__()
        self._ran = 0
        event.listen(db.engine, "commit", self._committed)

    def counted(self, work: Callable[[Connection], T]) -> Callable[[Connection], T]:
        def unit(conn: Connection) -> T:
            self._ran += 1
            return work(conn)

        return unit

    def _committed(self, _conn: Connection) -> None:
        self.append(self._ran)
        self._ran = 0


@pytest.fixture
def groups(db: Database, monkeypatch: pytest.MonkeyPatch) -> Groups:
    """A group on the event loop also closes when its INLINE_BUDGET is spent; here it closes on
    what is queued alone, so the sizes do not depend on how loaded the machine is."""
    monkeypatch.setattr(WriteGroups, "INLINE_BUDGET", 60.0)
    return Groups(db)


def post_at_once(db: Database, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    """POST every body at the same time, through the ASGI app on one event loop."""
    return list(talk(db, lambda client: asyncio.gather(*(client.post("/fhir/Patient", json=b) for b in bodies))))


def stored(db: Database) -> int:
    with db.engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT count(*) FROM resource WHERE type = 'Patient'").scalar() or 0)


def test_a_group_keeps_its_good_requests_and_undoes_its_bad_ones(db, groups):
    bodies = [patient(mrn=f"MRN-{i}") if i % 3 else {**patient(mrn=f"MRN-{i}"), "gender": "yes"} for i in range(12)]
    responses = post_at_once(db, bodies)
    assert [r.status_code for r in responses] == [422 if i % 3 == 0 else 201 for i in range(12)]
    assert len(groups) < 12  # the requests did share transactions
    assert stored(db) == 8
    ids = {r.json()["id"] for r in responses if r.status_code == 201}
    assert len(ids) == 8


def test_a_failed_commit_fails_every_request_of_its_group(db: Database, groups: Groups) -> None:
    failed: list[Connection] = []

    def commit_fails(conn: Connection) -> None:
        failed.append(conn)
        raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    event.listen(db.engine, "commit", commit_fails)
    responses = post_at_once(db, [patient(mrn=f"MRN-{i}") for i in range(6)])
    assert {r.status_code for r in responses} == {500}
    assert all(r.json()["resourceType"] == "OperationOutcome" for r in responses)
    assert stored(db) == 0

    # The writer drops the connection the COMMIT failed on, and goes on with a fresh one.
    event.remove(db.engine, "commit", commit_fails)
    assert [r.status_code for r in post_at_once(db, [patient(mrn="MRN-after")])] == [201]
    assert stored(db) == 1
    assert failed and all(conn.closed for conn in failed)


def test_a_writer_without_a_connection_answers_its_group_and_connects_again(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unable(*_: Any) -> None:
        raise sqlite3.OperationalError("unable to open database file")

    event.listen(db.engine, "do_connect", unable)
    responses = post_at_once(db, [patient(mrn=f"MRN-{i}") for i in range(3)])  # answered, none left hanging
    assert {r.status_code for r in responses} == {500}
    event.remove(db.engine, "do_connect", unable)
    assert [r.status_code for r in post_at_once(db, [patient(mrn="MRN-after")])] == [201]
    assert stored(db) == 1


def test_the_writer_keeps_its_connection_and_so_its_page_cache(db: Database) -> None:
    # SQLite empties a connection's page cache after another connection's write: a pooled
    # connection per group read every page it touched back from the WAL.
    def driver(conn: Connection) -> Any:
        return conn.connection.driver_connection

    async def groups_one_after_another() -> list[Any]:
        assert db.groups is not None
        return [await db.groups.submit(driver) for _ in range(4)]

    others = [db.engine.connect() for _ in range(3)]  # as a server's start-up leaves its pool
    for conn in others:
        conn.close()

    assert len({id(c) for c in asyncio.run(groups_one_after_another())}) == 1


def test_a_group_is_at_most_limit_units(db: Database, groups: Groups, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(WriteGroups, "LIMIT", 3)

    async def at_once() -> list[str]:
        assert db.groups is not None
        return list(await asyncio.gather(*(db.groups.submit(groups.counted(thread_of)) for _ in range(10))))

    assert len(asyncio.run(at_once())) == 10
    assert max(groups) == 3 and sum(groups) == 10


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
    shutil.copy(tmp_path / "overread.db", tmp_path / "file-only.db")
    with sqlite3.connect(tmp_path / "file-only.db") as file_only:
        rows = file_only.execute("SELECT id FROM resource WHERE type = 'Patient'").fetchall()
    assert rows == [(created.json()["id"],)]
    time.sleep(0.3)  # nothing written since: no more checkpoints
    assert len(checkpoints) == 1


def test_every_commit_syncs_the_wal_so_an_answer_outlives_a_power_cut(db):
    # synchronous=FULL (2); NORMAL (1) syncs only at checkpoints: an OS crash could take back an AA.
    with db.begin() as writer, db.autocommit() as reader:
        levels = {conn.exec_driver_sql("PRAGMA synchronous").scalar() for conn in (writer, reader)}
    assert levels == {2}


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux's /proc")
def test_savepoint_journals_stay_in_memory(db):
    """A unit's savepoint journal is no temporary file (temp_store=MEMORY). SQLite's default spills
    it to /var/tmp past 64 KiB, a page at a time: 70 of a create's 110 pwrite calls."""
    table = ResourceRow.__table__
    row = {"type": "Patient", "version": 1, "last_updated": datetime(2026, 1, 1), "deleted": False}

    def fill(conn: Connection) -> None:
        conn.execute(table.insert(), [{**row, "id": f"t{n}", "content": "x" * 2000} for n in range(100)])

    def temporary_files_while_rewriting(conn: Connection) -> list[str]:
        conn.execute(table.update().values(content="y" * 2000))  # 100 pages the savepoint must keep
        # SQLite unlinks a temporary file as it opens it: it shows only as an open descriptor
        return [link for link in map(_target, Path("/proc/self/fd").iterdir()) if "etilqs_" in link]

    async def in_groups() -> list[str]:
        assert db.groups is not None
        await db.groups.submit(fill)
        return await db.groups.submit(temporary_files_while_rewriting)

    assert asyncio.run(in_groups()) == []


def _target(fd: Path) -> str:
    """What an open file descriptor points to ("" if another thread closed it meanwhile)."""
    try:
        return str(fd.readlink())
    except OSError:
        return ""


@pytest.mark.parametrize("inline", [True, False], ids=["on the event loop", "on the writer thread"])
def test_a_database_error_in_one_unit_undoes_that_unit_only(db, inline):
    """A unit whose statement fails in the database (here a unique key) is rolled back to its savepoint;
    the units around it in the same group are committed."""
    row = {"type": "Patient", "id": "p1", "version": 1, "last_updated": datetime(2026, 1, 1), "deleted": False}
    insert = ResourceRow.__table__.insert()

    def first(conn: Connection) -> str:
        conn.execute(insert, row)
        return "first"

    def clash(conn: Connection) -> str:
        conn.execute(insert, {**row, "id": "p2"})
        conn.execute(insert, row)  # (type, id) is unique: p1 is there already
        return "never"

    def after(conn: Connection) -> str:
        conn.execute(insert, {**row, "id": "p3"})
        return "after"

    async def at_once() -> list[Any]:
        assert db.groups is not None
        units = (db.groups.submit(w, inline=inline) for w in (first, clash, after))
        return list(await asyncio.gather(*units, return_exceptions=True))

    first_answer, clash_answer, after_answer = asyncio.run(at_once())
    assert (first_answer, after_answer) == ("first", "after")
    assert isinstance(clash_answer, IntegrityError)
    with db.engine.connect() as conn:
        ids = conn.exec_driver_sql("SELECT id FROM resource ORDER BY id").scalars().all()
    assert ids == ["p1", "p3"]  # p2, written by the failed unit before its error, is undone with it


def thread_of(_conn: Connection) -> str:
    return threading.current_thread().name


def test_light_units_run_on_the_event_loop_and_only_their_commit_on_a_thread(db: Database) -> None:
    commits: list[str] = []
    event.listen(db.engine, "commit", lambda _conn: commits.append(threading.current_thread().name))

    async def both() -> tuple[str, str, str]:
        assert db.groups is not None
        return (
            threading.current_thread().name,
            await db.groups.submit(thread_of, inline=True),
            await db.groups.submit(thread_of),
        )

    loop_thread, light, other = asyncio.run(both())
    assert light == loop_thread
    assert other.startswith("sqlite-writer")
    assert commits[0].startswith("sqlite-commit") and commits[1].startswith("sqlite-writer")


def test_the_event_loop_never_waits_for_a_worker_holding_the_database(db: Database) -> None:
    """A worker's transaction holds the write lock: the light unit moves to the writer thread, which
    waits for the lock, while the event loop goes on serving."""

    async def while_a_worker_writes() -> tuple[str, int]:
        assert db.groups is not None
        pending = asyncio.ensure_future(db.groups.submit(thread_of, inline=True))
        ticks = 0
        while ticks < 20:  # the loop is free: 20 turns of 10 ms while the unit waits
            assert not pending.done()
            await asyncio.sleep(0.01)
            ticks += 1
        db.write_lock.release()  # the worker commits
        return await asyncio.wait_for(pending, 10), ticks

    db.write_lock.acquire()
    # Were the unit to wait for the lock on the event loop, the loop would never turn again: the
    # watchdog then lets the lock go, and the test fails (the unit done too soon) instead of hanging.
    watchdog = threading.Timer(30, db.write_lock.release)
    watchdog.start()
    try:
        ran_on, ticks = asyncio.run(while_a_worker_writes())
    finally:
        watchdog.cancel()
    assert ran_on.startswith("sqlite-writer") and ticks == 20
    assert not db.write_lock.locked()


def test_a_group_on_the_event_loop_commits_once_its_time_is_spent(db, groups, monkeypatch):
    monkeypatch.setattr(WriteGroups, "INLINE_BUDGET", 0.01)

    def slow(_conn: Connection) -> str:
        time.sleep(0.004)
        return threading.current_thread().name

    async def at_once() -> list[str]:
        assert db.groups is not None
        return list(await asyncio.gather(*(db.groups.submit(groups.counted(slow), inline=True) for _ in range(12))))

    names = asyncio.run(at_once())
    assert len(set(names)) == 1 and not names[0].startswith("sqlite-")  # all on the event loop
    assert sum(groups) == 12 and max(groups) <= 3  # 10 ms of 4 ms units: the third ends the group


def test_a_unit_that_is_not_light_takes_the_queue_to_the_writer_thread(db: Database, groups: Groups) -> None:
    async def mixed() -> list[str]:
        assert db.groups is not None
        units = [db.groups.submit(groups.counted(thread_of), inline=i != 2) for i in range(6)]
        return list(await asyncio.gather(*units))

    names = asyncio.run(mixed())
    assert not names[0].startswith("sqlite-") and names[1] == names[0]  # the first group, on the loop
    assert all(name.startswith("sqlite-writer") for name in names[2:])  # from the heavy unit on
    assert sum(groups) == 6


@pytest.mark.parametrize(
    ("path", "size", "expected"),
    [
        ("Patient", 700, True),  # create, conditional update or delete
        ("Patient/123", 700, True),  # update, patch, delete
        ("", 700, False),  # a batch or transaction Bundle
        ("Patient/$merge", 700, False),  # an operation
        ("Patient/123", 300_000, False),  # a big body
    ],
)
def test_light_writes(path: str, size: int, expected: bool) -> None:
    assert light(FhirRequest("POST", path), size) is expected


def test_a_drain_cancelled_with_its_event_loop_still_commits_and_hands_over(db: Database) -> None:
    """The loop closes while a group it ran is committing: the group is committed and answered
    all the same, and the next unit is written (the drain moved to the writer thread)."""
    committing, cancelled = threading.Event(), threading.Event()

    def slow_commit(_conn: Connection) -> None:
        committing.set()
        assert cancelled.wait(10)

    event.listen(db.engine, "commit", slow_commit)

    async def cancelled_mid_commit() -> str:
        assert db.groups is not None
        pending = asyncio.ensure_future(db.groups.submit(thread_of, inline=True))
        while not committing.is_set():
            await asyncio.sleep(0.01)
        (drain,) = asyncio.all_tasks() - {asyncio.current_task(), pending}  # the drain running the unit
        drain.cancel()
        await asyncio.sleep(0)  # the drain takes its cancellation while the COMMIT is still running
        cancelled.set()
        return await asyncio.wait_for(pending, 10)

    async def next_unit() -> str:
        assert db.groups is not None
        return await asyncio.wait_for(db.groups.submit(thread_of, inline=True), 10)

    assert asyncio.run(cancelled_mid_commit())
    event.remove(db.engine, "commit", slow_commit)
    assert asyncio.run(next_unit())


def test_a_request_cancelled_while_queued_leaves_its_group_answered(db: Database) -> None:
    """The task awaiting one unit is cancelled (its client gave up): the other units of its group
    are answered all the same, and the server goes on."""
    started, given_up_on = threading.Event(), threading.Event()

    def slow(_conn: Connection) -> str:
        started.set()
        assert given_up_on.wait(10)
        return "slow"

    async def one_cancelled() -> list[Any]:
        assert db.groups is not None
        first = asyncio.ensure_future(db.groups.submit(slow))
        while not started.is_set():
            await asyncio.sleep(0.005)
        given_up, last = (asyncio.ensure_future(db.groups.submit(thread_of)) for _ in range(2))
        await asyncio.sleep(0)  # both are queued behind the slow unit
        given_up.cancel()
        await asyncio.sleep(0)
        given_up_on.set()
        return list(await asyncio.wait_for(asyncio.gather(first, last, given_up, return_exceptions=True), 10))

    first, last, given_up = asyncio.run(one_cancelled())
    assert first == "slow" and last.startswith("sqlite-writer")
    assert isinstance(given_up, asyncio.CancelledError)


def test_writes_that_arrive_while_a_group_runs_on_the_event_loop_join_it(db: Database, groups: Groups) -> None:
    """Between units the loop serves requests, and the writes among them join the open group
    rather than wait for the next: under load, a group's COMMIT answers every client at once."""

    async def two_arrive_meanwhile() -> list[str]:
        writer = db.groups
        assert writer is not None
        arrived: list[asyncio.Future[str]] = []

        def first(_conn: Connection) -> str:
            light = groups.counted(thread_of)
            arrived.extend(asyncio.ensure_future(writer.submit(light, inline=True)) for _ in range(2))
            return "first"

        return [await writer.submit(groups.counted(first), inline=True), *await asyncio.gather(*arrived)]

    assert len(asyncio.run(two_arrive_meanwhile())) == 3
    assert groups == [3]


def test_a_drain_cancelled_between_units_commits_what_ran_and_hands_over(db: Database) -> None:
    row = {"type": "Patient", "id": "p1", "version": 1, "last_updated": datetime(2026, 1, 1), "deleted": False}

    async def cancelled_mid_group() -> str:
        writer = db.groups
        assert writer is not None

        def cancelling(conn: Connection) -> str:
            conn.execute(insert(ResourceRow), row)
            drain = asyncio.current_task()  # a light unit runs in the drain's task
            assert drain is not None
            drain.cancel()  # the loop is closing: the drain's next await raises
            return "written"

        return await asyncio.wait_for(writer.submit(cancelling, inline=True), 10)

    async def next_unit() -> str:
        assert db.groups is not None
        return await asyncio.wait_for(db.groups.submit(thread_of, inline=True), 10)

    assert asyncio.run(cancelled_mid_group()) == "written"
    assert asyncio.run(next_unit())
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT id FROM resource").scalars().all() == ["p1"]


def test_mixed_units_under_contention_are_each_answered_once_and_written_or_not_as_answered(db: Database) -> None:
    """Light and other units, some failing, in bursts, every third one while a worker's transaction
    holds the write lock: the drain moves between the event loop and the writer thread many times,
    and every unit is answered, with exactly the rows of the units that succeeded committed.

    Each burst starts on an idle writer, so where its first unit runs follows from the rules alone:
    on the loop when it is light and the lock is free, else on the writer thread."""
    rng = random.Random(7)
    plan = [(n, rng.random() < 0.7, rng.choice(["ok", "ok", "ok", "rollback", "error"])) for n in range(300)]
    bursts = [plan[start : start + 10] for start in range(0, len(plan), 10)]
    for k, burst in enumerate(bursts):  # light heads and other heads, in turn
        n, _, outcome = burst[0]
        burst[0] = (n, k % 2 == 0, outcome)
    plan = [unit for burst in bursts for unit in burst]
    held = {k for k in range(len(bursts)) if k % 3 == 2}
    ran_on: dict[int, str] = {}

    def unit(n: int, outcome: str) -> Callable[[Connection], str]:
        def work(conn: Connection) -> str:
            ran_on[n] = threading.current_thread().name
            row = {"type": "Patient", "id": f"p{n}", "version": 1, "last_updated": datetime(2026, 1, 1)}
            conn.execute(insert(ResourceRow), {**row, "deleted": False})
            if outcome == "rollback":
                raise Rollback(f"undone {n}")
            if outcome == "error":
                raise ValueError(f"failed {n}")
            return f"written {n}"

        return work

    async def run_bursts() -> list[Any]:
        writer = db.groups
        assert writer is not None
        answers: list[Any] = []
        for k, burst in enumerate(bursts):
            while writer.draining:  # the last burst's drain ends just after its answers
                await asyncio.sleep(0.001)
            if k in held:
                db.write_lock.acquire()
            pending = [asyncio.ensure_future(writer.submit(unit(n, o), inline=light)) for n, light, o in burst]
            if k in held:
                # The queued units start their drain and the drain finds the lock taken (two turns of
                # the loop: one runs the submits, the next the drain they started); then the worker ends.
                await asyncio.sleep(0)
                await asyncio.sleep(0)
                db.write_lock.release()
            answers += await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 60)
        return answers

    answers = asyncio.run(run_bursts())
    for (n, _, outcome), answer in zip(plan, answers, strict=True):
        expected = {"ok": f"written {n}", "rollback": f"undone {n}"}.get(outcome)
        assert (str(answer) if outcome == "error" else answer) == (expected or f"failed {n}")
    with db.engine.connect() as conn:
        ids = set(conn.exec_driver_sql("SELECT id FROM resource").scalars())
    assert ids == {f"p{n}" for n, _, outcome in plan if outcome == "ok"}
    assert len(ran_on) == len(plan)
    on_the_loop = [ran_on[burst[0][0]] == threading.main_thread().name for burst in bursts]
    assert on_the_loop == [k % 2 == 0 and k not in held for k in range(len(bursts))]
    moves = sum(ran_on[a] != ran_on[b] for (a, _, _), (b, _, _) in itertools.pairwise(plan))
    assert moves >= 2 * sum(on_the_loop) - 1  # onto the loop for each of those bursts (but the first), and off
