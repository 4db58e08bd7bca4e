"""Where a unit of work runs: the one seam between the doors (HTTP, MLLP) and the database.

A door hands the executor a read of one resource (version) or a unit of work, a function of a
``Connection``; the executor decides the thread, event loop, connection and transaction it runs
on. Each database has its own (``fhir_server.executor_sqlite``, ``fhir_server.executor_postgres``),
chosen once at start-up by ``for_database``. docs/architecture.md, "Threads and event loops",
draws where each kind of work ends up.

A unit is all or nothing: committed when it returns, rolled back when it raises; a
:class:`~fhir_server.db.Rollback` undoes it and still answers its value. A read (``write=False``)
that is one statement may run outside a transaction (a single SELECT is its own snapshot).
"""

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TypeVar

from sqlalchemy import Connection

from fhir_server.db import Database, Rollback
from fhir_server.repository import Repository, Stored
from fhir_server.router import ReadTarget

T = TypeVar("T")


class Executor(ABC):
    """Runs reads and units of work where they cost the least on its database."""

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


def for_database(db: Database) -> Executor:
    """The executor of ``db``'s kind of database (imported here: each needs the ABC above)."""
    if db.is_postgres:
        from fhir_server.executor_postgres import PostgresExecutor

        return PostgresExecutor(db)
    from fhir_server.executor_sqlite import SqliteExecutor

    return SqliteExecutor(db)


def in_transaction(db: Database, work: Callable[[Connection], T], write: bool) -> T:
    """``work`` in a transaction of its own on the calling thread (the executors' way off the event loop)."""
    try:
        with db.begin(write=write) as conn:
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
