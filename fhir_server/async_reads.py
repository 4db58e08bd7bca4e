"""Reads of one row on PostgreSQL, on the event loop (asyncpg).

A read or vread is one SELECT. Through a thread pool, the hop to a thread and back, the pool
checkout and the GIL handovers while the thread waits for its round trip would cost more than
the read itself (docs/performance.md, "A read by id is one SELECT"). Here they run on the event
loop, on an asyncpg pool of their own outside any transaction (a single SELECT is its own
snapshot), and the loop serves other requests while PostgreSQL answers.

Reads by id that arrive while one is on its way to PostgreSQL wait for it and then go
together, as one ``id = ANY(…)`` SELECT per type (Prisma batches its ``findUnique`` calls the
same way). Each read still sees a state committed before it arrived, and the server and
PostgreSQL pay one round trip for the lot instead of one each.

A vread is the repository's statement (``Repository.vread``); a read by id is
``Repository.current``'s with the ids as an array. Both are compiled once for SQLAlchemy's
asyncpg dialect (``fhir_server.compiled``), the one the rest of the event loop's PostgreSQL
work uses (``fhir_server.async_units``).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from sqlalchemy import ARRAY, Engine, String, any_, bindparam, select
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg

from fhir_server.compiled import Compiled
from fhir_server.repository import VERSION, Stored
from fhir_server.router import ReadTarget
from fhir_server.schema import ResourceRow
from fhir_server.validation import ID, SUPPORTED_TYPES

#: Connections of the pool: reads by id use one at a time, vreads one each.
POOL_SIZE = 4

_r = ResourceRow.__table__.c
_CURRENT_MANY = select(_r.id, _r.version, _r.last_updated, _r.content).where(
    _r.type == bindparam("type"), _r.id == any_(bindparam("ids", type_=ARRAY(String)))
)


class AsyncReads:
    """Read by id and vread on their own pool of async connections, while ``opened`` lasts."""

    def __init__(self, engine: Engine, size: int = POOL_SIZE) -> None:
        self._conninfo = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._size = size
        dialect = PGDialect_asyncpg()  # type: ignore[no-untyped-call]
        self._current = Compiled(_CURRENT_MANY, dialect, ("type", "ids"))
        self._version = Compiled(VERSION, dialect, ("type", "id", "version"))
        self._pool: asyncpg.Pool | None = None
        self._waiting: dict[tuple[str, str], list[asyncio.Future[Stored | None]]] = {}
        self._sender: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """Whether the pool is open (the application's lifespan is running)."""
        return self._pool is not None

    @asynccontextmanager
    async def opened(self) -> AsyncIterator[None]:
        """Open the pool for the life of the application (its event loop); close it after."""
        pool = await asyncpg.create_pool(self._conninfo, min_size=1, max_size=self._size)
        self._pool = pool
        try:
            yield
        finally:
            self._pool = None
            await pool.close()

    async def fetch(self, target: ReadTarget) -> Stored | None:
        """What ``Repository.current`` (a read) or ``Repository.vread`` (a vread) finds, or None."""
        if target.type not in SUPPORTED_TYPES or not ID.fullmatch(target.id):
            return None  # nothing stored has it, and it must not fail the reads it would go with
        if target.version is not None:
            rows = await self._rows(self._version, target._asdict())
            return Stored(target.type, target.id, target.version, *rows[0]) if rows else None
        found: asyncio.Future[Stored | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((target.type, target.id), []).append(found)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await found

    async def _send(self) -> None:
        """Read what is waiting, in one SELECT per type, until nothing is."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                ids: dict[str, list[str]] = defaultdict(list)
                for rtype, rid in batch:
                    ids[rtype].append(rid)
                try:
                    found = {
                        (rtype, row[0]): Stored(rtype, *row)
                        for rtype, of_type in ids.items()
                        for row in await self._rows(self._current, {"type": rtype, "ids": of_type})
                    }
                except Exception as exc:  # each waiting request answers with it (an OperationOutcome 500)
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    if self._pool is not None:  # PostgreSQL restarted, say: the next reads get new connections
                        await self._pool.expire_connections()
                    continue
                for key, futures in batch.items():
                    for future in futures:
                        if not future.done():  # its client may have gone
                            future.set_result(found.get(key))
        finally:
            self._sender = None

    async def _rows(self, compiled: Compiled, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        assert self._pool is not None, "AsyncReads used outside opened()"
        async with self._pool.acquire() as conn:
            rows: list[tuple[Any, ...]] = await conn.fetch(compiled.sql, *compiled.params(params))
            return rows
