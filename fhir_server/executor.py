"""Where a unit of work runs: the one seam between the database and everything that uses it.

The doors on the event loop (HTTP, MLLP) hand the executor a read of one resource (version) or a
unit of work, a function of a ``Connection``; it decides the thread, event loop, connection and
transaction it runs on. Code with a thread of its own (the workers, whose units sit between
blocking network calls; start-up; the CLI) opens its units with ``begin`` and ``session``, on
that thread. Each database has its own executor (``fhir_server.executor_sqlite``,
``fhir_server.executor_postgres``), one per process, made by ``for_database``.
docs/architecture.md, "Threads and event loops", draws where each kind of work ends up.

A unit is all or nothing: committed when it returns, rolled back when it raises; a
:class:`~fhir_server.db.Rollback` undoes a unit of ``run`` and still answers its value. A read
(``write=False``) that is one statement may run outside a transaction (a single SELECT is its
own snapshot).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, AbstractContextManager, contextmanager
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.orm import Session

from fhir_server.db import Database, Rollback
from fhir_server.repository import Repository, Stored
from fhir_server.stored import ReadTarget

T = TypeVar("T")


class Executor(ABC):
    """Runs reads and units of work where they cost the least on its database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    @abstractmethod
    def opened(self) -> AbstractAsyncContextManager[None]:
        """The executor's event-loop resources for as long as the block runs (an application's
        lifespan, the MLLP listener's); blocks may nest, the outermost opens and closes. Outside
        one, everything still runs, on threads."""

    @abstractmethod
    async def read(self, target: ReadTarget) -> Stored | None:
        """The resource (version) ``target`` names, a deletion included; None if it never existed."""

    @abstractmethod
    async def run(self, work: Callable[[Connection], T], *, write: bool, light: bool = False) -> T:
        """``work(conn)`` as one unit; its value once committed.

        ``write``: the unit may write. ``light``: it is cheap enough to run on the event loop (a
        write of one small resource, a search of one page without includes).
        """

    @contextmanager
    def begin(self, *, write: bool = True) -> Iterator[Connection]:
        """A unit on the calling thread, for code with a thread of its own; it blocks that thread.

        On SQLite a write first takes the process's write lock, so the writer's groups wait for
        it rather than meet SQLite's lock; on PostgreSQL it takes a connection of the threads' pool.
        """
        with self.db.begin(write=write) as conn:
            yield conn

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A write unit as ``begin``, in an ORM Session: the workers' outbox rows are ORM rows."""
        with self.db.transaction() as session:
            yield session


def for_database(db: Database) -> Executor:
    """The executor of ``db``'s kind of database (imported here: each needs the ABC above)."""
    if db.is_postgres:
        from fhir_server.executor_postgres import PostgresExecutor

        return PostgresExecutor(db)
    from fhir_server.executor_sqlite import SqliteExecutor

    return SqliteExecutor(db)


def in_transaction(begin: AbstractContextManager[Connection], work: Callable[[Connection], T]) -> T:
    """``work`` in the transaction ``begin`` opens, on the calling thread or greenlet: its value once
    committed, or a :class:`~fhir_server.db.Rollback`'s once rolled back (every executor's unit)."""
    try:
        with begin as conn:
            return work(conn)
    except Rollback as undo:
        return undo.value  # type: ignore[no-any-return]


def find(conn: Connection, target: ReadTarget) -> Stored | None:
    """What a read (``Repository.current``) or vread (``Repository.version``) of ``target`` finds."""
    repo = Repository(conn)
    return (
        repo.current(target.type, target.id)
        if target.version is None
        else repo.version(target.type, target.id, target.version)
    )
