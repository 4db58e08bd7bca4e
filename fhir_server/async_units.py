"""PostgreSQL requests on the event loop: SQLAlchemy's asyncio bridge over asyncpg.

Through a thread pool each round trip of a request would hand the GIL between the pool's
threads and the event loop (docs/performance.md, "PostgreSQL requests run on the event loop").
Here a request's unit of work, the same sync code on a ``Connection`` (``router.handle``),
runs in a greenlet on the event loop: each statement awaits asyncpg, and the loop serves other
requests meanwhile. There is no thread to hand over to.

The whole unit (checkout, BEGIN, the work, COMMIT, return to the pool) runs in one greenlet,
on the async engine's ``sync_engine``, as ``AsyncConnection.run_sync`` runs its function:
``AsyncEngine.begin()`` would spawn one greenlet for each of those steps, and each new
greenlet maps and unmaps a frame stack of its own.

The unit is still one transaction: committed when it answers below 400, rolled back (and
still answered) otherwise, rolled back and raised on any exception. Workers and the HL7
listener keep the sync engine (psycopg) on their threads; both write the same rows
(``fhir_server.compiled`` compiles its statements per driver).
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from sqlalchemy import URL, Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from fhir_server.db import Rollback

T = TypeVar("T")


class AsyncUnits:
    """Units of work on an asyncpg engine of their own, while ``opened`` lasts."""

    def __init__(self, url: URL, hide_parameters: bool = True) -> None:
        self._url = url.set(drivername="postgresql+asyncpg")
        self._hide_parameters = hide_parameters
        self._engine: AsyncEngine | None = None

    @property
    def ready(self) -> bool:
        """Whether the engine is open (the application's lifespan is running)."""
        return self._engine is not None

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """The engine for the life of the application (its event loop); its connections closed after."""
        # At most 20 transactions at once: one event loop gains nothing from more, and the sync
        # engine (workers, HL7) keeps its own 50 under PostgreSQL's default max_connections (100).
        engine = create_async_engine(
            self._url, pool_size=10, max_overflow=10, pool_recycle=1800, hide_parameters=self._hide_parameters
        )
        self._engine = engine
        try:
            yield
        finally:
            self._engine = None
            await engine.dispose()

    async def run(self, work: Callable[[Connection], T]) -> T:
        """``work(conn)`` in a transaction of its own; its value (a :class:`Rollback`'s, rolled back)."""
        engine = self._engine
        assert engine is not None, "AsyncUnits used outside opened()"

        def unit() -> T:
            with engine.sync_engine.begin() as conn:
                return work(conn)

        try:
            return await greenlet_spawn(unit)
        except Rollback as undo:
            return undo.value  # type: ignore[no-any-return]
