"""Where work runs on PostgreSQL: on the event loop, over SQLAlchemy's asyncio bridge to asyncpg.

Through a thread pool each round trip would hand the GIL between the pool's threads and the
event loop (docs/performance.md, "PostgreSQL requests run on the event loop"). Here a unit, the
same sync code on a ``Connection``, runs in a greenlet on the event loop: each statement awaits
asyncpg, and the loop serves other requests meanwhile.

The whole unit (checkout, BEGIN, the work, COMMIT, return to the pool) runs in one greenlet, on
the async engine's ``sync_engine``, as ``AsyncConnection.run_sync`` runs its function: each new
greenlet maps and unmaps a frame stack, and ``AsyncEngine.begin()`` spawns one per step.

Reads by id are batched on one connection of the same engine (``fhir_server.async_reads``). The
engine lives on the event loop that opened it; before it is open (or without an event loop:
workers, the CLI) units run on a thread, on the database's own engine (``Database.begin``).
"""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn
from starlette.concurrency import run_in_threadpool

from fhir_server.async_reads import AsyncReads
from fhir_server.db import Database
from fhir_server.executor import Executor, find, in_transaction
from fhir_server.repository import Stored
from fhir_server.stored import ReadTarget

T = TypeVar("T")


class PostgresExecutor(Executor):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self._engine: AsyncEngine | None = None
        self._reads: AsyncReads | None = None
        self._opens = 0  # nested ``opened`` blocks

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        self._opens += 1
        if self._opens == 1:
            self._engine = create_async_engine(
                self.db.engine.url.set(drivername="postgresql+asyncpg"),
                pool_size=self.db.pools.event_loop,
                max_overflow=0,
                pool_recycle=1800,
                hide_parameters=self.db.engine.hide_parameters,
            )
            self._reads = AsyncReads(self._engine)
        try:
            yield
        finally:
            self._opens -= 1
            if self._opens == 0 and self._engine is not None and self._reads is not None:
                engine, reads, self._engine, self._reads = self._engine, self._reads, None, None
                await reads.close()
                await engine.dispose()

    async def read(self, target: ReadTarget) -> Stored | None:
        if self._reads is not None:
            return await self._reads.fetch(target)
        return await run_in_threadpool(in_transaction, self.db.begin(write=False), partial(find, target=target))

    async def run(self, work: Callable[[Connection], T], *, write: bool, light: bool = False) -> T:
        engine = self._engine
        if engine is None:
            return await run_in_threadpool(in_transaction, self.db.begin(write=write), work)
        return await greenlet_spawn(in_transaction, engine.sync_engine.begin(), work)
