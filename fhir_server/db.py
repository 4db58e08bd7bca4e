"""Engines and transactions for SQLite (embedded default) and PostgreSQL.

Every request is all or nothing: a database transaction of its own (``begin``), except the
read of one resource, a single statement on an autocommit connection (``autocommit``), and,
on SQLite, the requests and HL7 messages that write: those queued at the same moment share a
transaction, each in a savepoint of its own, all answered after its COMMIT (``WriteGroups``).
Workers that handle ORM rows use ``transaction``. Write transactions on SQLite start with
``BEGIN IMMEDIATE`` so that a read-then-write (conditional create, If-Match) holds the
database write lock from its first read; on PostgreSQL the repository takes row locks and
advisory locks instead (see ``Repository.lock``).
"""

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)


#: Pages (4 KiB) of WAL after which a COMMIT on SQLite checkpoints by itself (SQLite's default: 1,000).
WAL_PAGES = 10_000
#: Milliseconds a connection waits for SQLite's lock held by another process before it fails.
BUSY_TIMEOUT_MS = 30_000
#: Bytes the WAL file may keep once checkpointed: past them a checkpoint truncates it, and so does
#: the first COMMIT after the WAL restarts (``journal_size_limit``). Above WAL_PAGES' 40 MB, so
#: everyday writes never shrink and regrow it; a large import no longer leaves its size on disk.
WAL_LIMIT = 64 << 20


class Pools(BaseModel):
    """PostgreSQL connections of one process, by who holds them (``OVERREAD_POOLS__<FIELD>``).

    Together well under PostgreSQL's default max_connections (100): room for a second process and
    for ``overread db upgrade``. SQLite has one writer connection and one per reader thread.
    """

    model_config = ConfigDict(frozen=True)

    #: The event loop's (``fhir_server.executor_postgres``): HTTP requests, HL7 messages, reads by id.
    event_loop: int = Field(default=20, ge=2)
    #: The threads' (``Database.begin``, ``transaction``): workers, the CLI, a door without the event loop's.
    threads: int = Field(default=20, ge=1)


DEFAULT_POOLS = Pools()


def make_engine(url: str, pools: Pools = DEFAULT_POOLS, **kwargs: Any) -> Engine:
    """The engine of ``url``; its errors and logs leave out bound parameters (resource content,
    identifiers: PHI) unless ``hide_parameters=False`` is asked (``OVERREAD_LOG_SENSITIVE``)."""
    kwargs.setdefault("hide_parameters", True)
    if url.startswith("sqlite"):
        # The driver must not open transactions by itself: we emit BEGIN ourselves.
        engine = create_engine(
            url, connect_args={"isolation_level": None, "check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # FULL: every COMMIT syncs the WAL, so what was acknowledged (a 201, an HL7 AA) survives
            # a power cut or an OS crash too, not only a crash of the process (NORMAL). With group
            # commit that is one fsync per group (docs/performance.md, "SQLite syncs every commit").
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            # The journal of each unit's savepoint (WriteGroups) and of statements in it: in memory,
            # not a temporary file written a page at a time. It lives only until its transaction
            # ends; durability is the WAL's.
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            # Reads by id over a large store hit random pages: keep them mapped and cached.
            cur.execute("PRAGMA mmap_size=1073741824")
            cur.execute("PRAGMA cache_size=-65536")
            # Checkpoints run off the writer's path (WriteGroups._checkpoints); a COMMIT checkpoints
            # by itself only past 40 MB of WAL, the bound if nothing else does.
            cur.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            cur.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            # Straight to the driver: this runs once per request, and a constant BEGIN needs none of
            # SQLAlchemy's statement machinery.
            options = conn.get_execution_options()
            if options.get("isolation_level") != "AUTOCOMMIT":
                conn.connection.driver_connection.execute(f"BEGIN {options.get('sqlite_begin', 'DEFERRED')}")

        return engine
    # No pre-ping: it costs a round trip per request. A connection the server dropped fails
    # one request (an OperationOutcome 500), and SQLAlchemy then discards the whole pool.
    return create_engine(url, pool_size=pools.threads, max_overflow=0, pool_recycle=1800, **kwargs)


T = TypeVar("T")

#: SQLite virtual machine instructions between two looks at a ``deadline``'s clock.
PROGRESS_STEPS = 10_000


#: The end of the ``deadline`` in force on each SQLite driver connection (by ``id``), for nesting.
_ends: dict[int, float] = {}
#: PostgreSQL's query_canceled: a statement stopped by statement_timeout (or a cancel request).
QUERY_CANCELED = "57014"


@dataclass(frozen=True)
class Deadline:
    """When a piece of work must be done by (``time.perf_counter``)."""

    end: float

    @property
    def passed(self) -> bool:
        return time.perf_counter() > self.end


@contextmanager
def deadline(conn: Connection, seconds: float) -> Iterator[Deadline]:
    """Interrupt SQLite's statements on ``conn`` once ``seconds`` have passed: they raise an
    OperationalError that ``interrupted`` recognises, and leave the connection as it was.

    Deadlines nest: the earlier end is in force, and the outer one again after the inner ends.
    """
    driver = conn.connection.driver_connection
    assert driver is not None
    own = Deadline(time.perf_counter() + seconds)
    outer = _ends.get(id(driver))
    _interrupt_at(driver, own.end if outer is None else min(outer, own.end))
    try:
        yield own
    finally:
        _interrupt_at(driver, outer)


def _interrupt_at(driver: Any, end: float | None) -> None:
    if end is None:
        _ends.pop(id(driver), None)
        driver.set_progress_handler(None, 0)
    else:
        _ends[id(driver)] = end
        driver.set_progress_handler(lambda: time.perf_counter() > end, PROGRESS_STEPS)


@contextmanager
def statement_deadline(conn: Connection, seconds: float) -> Iterator[Deadline]:
    """Stop the statements ``conn`` runs in this block once ``seconds`` have passed, on either database.

    SQLite: a ``deadline``. PostgreSQL: ``SET LOCAL statement_timeout`` (runtime-config-client), which
    bounds each statement, its planning included, and cancels it in the server (the work stops, also
    when the client has left); the session's own value again after the block. It needs the
    transaction ``conn`` is in (every search runs in one); ``timed_out`` recognises what it raises.
    """
    if conn.dialect.name == "sqlite":
        with deadline(conn, seconds) as own:
            yield own
        return
    conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, round(seconds * 1000))}")
    yield Deadline(time.perf_counter() + seconds)
    # Not after a failure: the transaction is aborted, and ends with it.
    conn.exec_driver_sql("SET LOCAL statement_timeout TO DEFAULT")


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` is a SQLite statement stopped by a ``deadline``."""
    return isinstance(exc, OperationalError) and str(exc.orig) == "interrupted"


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` is a statement stopped by a ``statement_deadline`` (either database)."""
    return interrupted(exc) or (isinstance(exc, DBAPIError) and getattr(exc.orig, "sqlstate", None) == QUERY_CANCELED)


class Rollback(Exception):
    """Raised by a unit of work of a group to undo its writes and still answer ``value``."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value


#: What a unit of a group gave: (True, its value) or (False, its exception).
Outcome = tuple[bool, Any]


@dataclass(frozen=True)
class _Unit:
    work: Callable[[Connection], Any]
    answer: asyncio.Future[Any]  # of the event loop that queued the unit
    #: Light enough to run on the event loop that queued it (``WriteGroups.submit``).
    inline: bool


@dataclass
class _Group:
    """One transaction of the writer: the units it took, and what each gave."""

    inline: bool
    deadline: float  # on the event loop, it takes no unit after this (``time.perf_counter``)
    units: list[_Unit] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    conn: Connection | None = None  # None: the group failed whole


class WriteGroups:
    """SQLite's one writer, committing the units of work queued meanwhile in one transaction.

    Each unit runs in a savepoint of its own: an exception (or :class:`Rollback`) undoes it
    alone and reaches its caller. Every unit of a group is answered after the group's COMMIT,
    so none is acknowledged before it is written, and a failed COMMIT fails them all. The
    units of a group run one after the other on one connection, as separate transactions
    would (a conditional create sees the writes of the units before it). SQLite rewrites
    every page a transaction touched at its COMMIT, and syncs it: once per group instead of
    once per request (docs/performance.md, "SQLite commits writes in groups").

    Where a group runs: one drain at a time owns the writer's connection. Units submitted
    ``inline`` (a light REST write, ``api.light``) run on the event loop that queued
    them, and only their COMMIT runs on a thread of its own: the COMMIT releases the GIL while
    it syncs the WAL, and the loop serves requests meanwhile. Between units too the loop serves
    requests, and the writes among them join the open group (for at most INLINE_BUDGET): under
    load a COMMIT answers every client that was waiting, instead of alternating groups of those
    answered by the last COMMIT and the rest. On the writer thread each statement would hand the
    GIL over to the event loop and wait to get it back (docs/performance.md, "Small REST writes
    run on the event loop"). Anything else (HL7 messages,
    Bundles) runs on the writer thread, and the drain moves there as soon as the unit at the
    head of the queue is not inline, or the write lock is taken (a worker's transaction): the
    event loop never waits for this process's other writers. (Its BEGIN IMMEDIATE waits only for
    another process's, such as ``overread db upgrade``.)
    """

    #: The most units one transaction carries.
    LIMIT = 64
    #: Seconds a group on the event loop takes more units for: how long its first unit may wait
    #: for its COMMIT beyond the group's work (the GIL's switch interval, as on a thread).
    INLINE_BUDGET = 0.005
    #: Seconds between checkpoints while groups commit (see ``_checkpoints``).
    CHECKPOINT_EVERY = 1.0

    def __init__(self, db: "Database") -> None:
        self.db = db
        self._queue: deque[_Unit] = deque()
        self._lock = threading.Lock()  # the queue, and whether a drain owns the connection
        self._draining = False
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="sqlite-commit")
        self._inline: set[asyncio.Task[None]] = set()  # drains running on an event loop
        self._written = threading.Event()  # a group committed since the last checkpoint
        self._closed = threading.Event()
        self._checkpointer: threading.Thread | None = None  # started by the first group
        self._conn: Connection | None = None  # the writer's own (``_connection``)

    async def submit(self, work: Callable[[Connection], T], *, inline: bool = False) -> T:
        """Run ``work(conn)`` in the next group; its value once the group is committed.

        ``inline``: the unit is light (one resource, a small body) and may run on this event loop.
        """
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._queue.append(_Unit(work, answer, inline))
            start, self._draining = not self._draining, True
        if start and inline:
            task = loop.create_task(self._drain_inline())
            self._inline.add(task)
            task.add_done_callback(self._inline.discard)
        elif start:
            self._writer.submit(self._drain)
        return await answer

    @property
    def draining(self) -> bool:
        """Whether a drain owns the writer's connection: units are queued or a group is running."""
        with self._lock:
            return self._draining

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._committer.shutdown(wait=True)
        self._closed.set()
        if self._checkpointer is not None:
            self._checkpointer.join()
        self._drop_connection()

    def _connection(self) -> Connection:
        """The writer's connection, kept from group to group.

        SQLite empties a connection's page cache when another connection has written since
        its last transaction. Taking a pooled connection per group, the writer got each of
        the pool's connections in turn and read back from the WAL every page its group
        touched. Its own connection keeps its cache.
        """
        if self._conn is None:
            self._conn = self.db._write_engine.connect()
        return self._conn

    def _drop_connection(self) -> None:
        """Close the writer's connection for good (not back to the pool: it may be broken)."""
        if self._conn is not None:
            self._conn.invalidate()
            self._conn.close()
            self._conn = None

    def _checkpoints(self) -> None:
        """Checkpoint within a second of any group's COMMIT, on a thread of its own.

        SQLite's own checkpoint (copying the WAL into the database file and syncing that) runs
        inside the COMMIT that crosses 1,000 pages of WAL, on the writer's path, where every
        request waits for it (docs/performance.md). A PASSIVE checkpoint waits for no reader
        or writer. It keeps the WAL short; durability does not depend on it (each COMMIT syncs
        the WAL, ``synchronous=FULL``).
        """
        while not self._closed.wait(self.CHECKPOINT_EVERY):
            if self._written.is_set():
                self._written.clear()
                self.checkpoint()

    def checkpoint(self) -> None:
        """Copy the WAL into the database file and sync it (PRAGMA wal_checkpoint(PASSIVE)); a WAL
        of more than WAL_LIMIT bytes is then truncated (TRUNCATE, sqlite.org/pragma.html#pragma_wal_checkpoint).

        TRUNCATE takes the write lock and waits for every reader to leave the WAL: here it waits for
        no one (busy_timeout 0) and gives up if anyone is there; the next checkpoint tries again, and
        the first COMMIT after the WAL restarts truncates it anyway (``journal_size_limit``).
        """
        try:
            with self.db._autocommit.connect() as conn:  # no transaction around it
                _, frames, _ = conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").one()
                if frames * conn.exec_driver_sql("PRAGMA page_size").scalar_one() > WAL_LIMIT:
                    conn.exec_driver_sql("PRAGMA busy_timeout=0")
                    try:
                        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                    finally:
                        conn.exec_driver_sql(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except Exception:  # the next one, or the COMMIT's own past WAL_PAGES, does it
            log.warning("SQLite checkpoint failed", exc_info=True)

    def _drain(self) -> None:
        """On the writer thread: groups of whatever is queued, until nothing is."""
        while self._more():
            self.db.write_lock.acquire()
            group = self._begin(inline=False)
            while self._step(group):
                pass
            self._answer(group.units, self._finish(group))

    async def _drain_inline(self) -> None:
        """On the event loop: groups of inline units, until nothing is queued; the writer thread
        takes over the drain when the next unit is not inline or the write lock is taken."""
        while self._more():
            with self._lock:
                if not self._queue[0].inline or not self.db.write_lock.acquire(blocking=False):
                    break
            group = self._begin(inline=True)
            committed: Future[list[Outcome]] | None = None
            try:
                while self._step(group):
                    # Between units the loop serves requests: those that write join this group,
                    # not the next (the clients its last group answered are sending theirs).
                    await asyncio.sleep(0)
                committed = self._committer.submit(self._finish, group)
                outcomes = await asyncio.shield(asyncio.wrap_future(committed))
            except asyncio.CancelledError:  # the loop is closing: the group is committed all the same,
                committed = committed or self._committer.submit(self._finish, group)
                committed.add_done_callback(partial(self._answer_committed, group.units))
                self._writer.submit(self._drain)  # and the drain moves (it waits for the write lock)
                raise
            self._answer(group.units, outcomes)
        else:
            return
        self._writer.submit(self._drain)  # still owning the connection, the drain moves there

    def _more(self) -> bool:
        """Whether a unit is queued; if not, the drain ends (a later ``submit`` starts the next)."""
        with self._lock:
            self._draining = bool(self._queue)
            return self._draining

    def _take(self, group: _Group) -> _Unit | None:
        """The next unit of ``group``, or None when the group is complete.

        A group ends when the queue is empty or it holds LIMIT units; on the event loop also
        when the next unit is not inline or the group has been open INLINE_BUDGET.
        """
        with self._lock:
            if not self._queue or len(group.units) >= self.LIMIT:
                return None
            head = self._queue[0]
            if group.inline and group.units and (not head.inline or time.perf_counter() > group.deadline):
                return None
            return self._queue.popleft()

    def _begin(self, inline: bool) -> _Group:
        """BEGIN a group on the writer's connection (the caller holds the write lock)."""
        group = _Group(inline, time.perf_counter() + self.INLINE_BUDGET)
        try:
            group.conn = self._connection()
            group.conn.begin()
        except Exception as exc:  # no connection, or no transaction
            self._fail(group, exc)
        return group

    def _step(self, group: _Group) -> bool:
        """Run the group's next unit in a savepoint of its own; False once the group is complete."""
        if group.conn is None or (unit := self._take(group)) is None:
            return False
        group.units.append(unit)
        # Savepoints straight to the driver: SQLAlchemy's begin_nested() compiles its SAVEPOINT
        # and RELEASE anew each time, on every unit. Savepoints the
        # work opens itself nest inside, and are its own to close.
        driver = group.conn.connection.driver_connection
        assert driver is not None
        try:
            driver.execute("SAVEPOINT unit")
            try:
                group.outcomes.append((True, unit.work(group.conn)))
            except Rollback as undo:
                driver.execute("ROLLBACK TO unit")
                group.outcomes.append((True, undo.value))
            except Exception as exc:
                driver.execute("ROLLBACK TO unit")
                group.outcomes.append((False, exc))
            driver.execute("RELEASE unit")
        except Exception as exc:  # the database refused a savepoint: the group fails whole
            self._fail(group, exc)
            return False
        return True

    def _fail(self, group: _Group, exc: Exception) -> None:
        """Fail every unit of the group, and the units it would have taken, with ``exc``."""
        self._drop_connection()  # rolls back what the group wrote; the next group connects again
        group.conn = None
        while (unit := self._take(group)) is not None:
            group.units.append(unit)
        group.outcomes = [(False, exc)] * len(group.units)

    def _finish(self, group: _Group) -> list[Outcome]:
        """COMMIT a group (on the writer thread, or for a group run on the event loop on the
        committer's) and release the write lock: what to answer its units."""
        try:
            return group.outcomes if group.conn is None else self._commit(group.conn, group.outcomes)
        finally:
            self.db.write_lock.release()

    def _commit(self, conn: Connection, outcomes: list[Outcome]) -> list[Outcome]:
        """``outcomes`` once committed; if the COMMIT failed, its error for every unit."""
        try:
            conn.commit()
        except Exception as exc:  # none of the group was written
            self._drop_connection()  # the next group starts on a fresh one
            return [(False, exc)] * len(outcomes)
        self._written.set()
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._checkpoints, name="sqlite-checkpoint", daemon=True)
            self._checkpointer.start()
        return outcomes

    def _answer_committed(self, group: list[_Unit], committed: Future[list[Outcome]]) -> None:
        self._answer(group, committed.result())

    @staticmethod
    def _answer(group: list[_Unit], outcomes: list[Outcome]) -> None:
        """Settle each unit's future: at once on its own event loop, else with one call per loop."""
        try:
            here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # a thread
            here = None
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Unit, Outcome]]] = {}
        for unit, outcome in zip(group, outcomes, strict=True):
            by_loop.setdefault(unit.answer.get_loop(), []).append((unit, outcome))
        for loop, settled in by_loop.items():
            if loop is here:
                _settle(settled)
            elif not loop.is_closed():
                loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[tuple[_Unit, Outcome]]) -> None:
    for unit, (ok, value) in settled:
        if unit.answer.done():  # its request was cancelled meanwhile
            continue
        if ok:
            unit.answer.set_result(value)
        else:
            unit.answer.set_exception(value)


class Database:
    """An engine and the two kinds of transaction the server runs on it."""

    def __init__(self, url: str, pools: Pools = DEFAULT_POOLS, **kwargs: Any) -> None:
        self.url = url
        self.pools = pools
        self.engine = make_engine(url, pools, **kwargs)
        self._autocommit = self.engine.execution_options(isolation_level="AUTOCOMMIT")
        self._reader = threading.local() if self.engine.dialect.name == "sqlite" else None
        self._write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._write = sessionmaker(self._write_engine, expire_on_commit=False)
        # SQLite has one writer at a time, and a connection that finds the database locked
        # sleeps in its busy handler (for up to 100 ms a turn) rather than queueing. Writers
        # of this process queue on a lock instead and never meet SQLite's lock at all.
        self.write_lock = threading.Lock()
        self._writer: AbstractContextManager[object] = (
            self.write_lock if self.engine.dialect.name == "sqlite" else nullcontext()
        )
        #: On SQLite, where requests and messages that write go (one writer, group commit);
        #: PostgreSQL has many writers, and each takes a transaction of its own.
        self.groups = WriteGroups(self) if self.engine.dialect.name == "sqlite" else None

    @property
    def is_postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    @contextmanager
    def autocommit(self) -> Iterator[Connection]:
        """A connection outside any transaction, for a read that is one statement.

        A single SELECT sees one consistent state by itself; leaving out BEGIN and COMMIT
        saves two round trips on PostgreSQL and the transaction bookkeeping on both.
        """
        if self._reader is None:
            with self._autocommit.connect() as fresh:
                yield fresh
            return
        # On SQLite each thread (in the server: the event loop's) keeps its connection open:
        # checking one out of the pool and setting and resetting its isolation level cost
        # as much as the read. One that failed is closed and replaced. (PostgreSQL's pool
        # is shared by many threads and its size bounds their connections: no keeping.)
        conn: Connection | None = getattr(self._reader, "conn", None)
        if conn is None:
            conn = self._reader.conn = self._autocommit.connect()
        try:
            yield conn
        except BaseException:
            self._reader.conn = None
            conn.close()
            raise

    @contextmanager
    def begin(self, write: bool = True) -> Iterator[Connection]:
        """One unit of work on a Core connection: committed on success, rolled back on any
        exception. What the HTTP adapter uses: the repository needs no ORM Session."""
        with self._writer if write else nullcontext(), (self._write_engine if write else self.engine).begin() as conn:
            yield conn

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write unit of work in an ORM Session (for workers, which handle ORM rows such as
        the outbox's): committed on success, rolled back on any exception."""
        with self._writer, self._write() as session, session.begin():
            yield session

    def dispose(self) -> None:
        if self.groups is not None:
            self.groups.close()
        if self._reader is not None and getattr(self._reader, "conn", None) is not None:
            self._reader.conn.close()
            self._reader.conn = None
        self.engine.dispose()
