"""Reads of one row on PostgreSQL, on the event loop, batched on one connection.

A read or vread is one SELECT. Run through a thread, the hop to it and back, the pool checkout
and the GIL handovers while the thread waits for its round trip would cost more than the read
itself (docs/performance.md, "A read by id is one SELECT"). Here they run on the event loop, on
one connection of the event loop's engine (``fhir_server.executor_postgres``), held while the
engine is open and used outside any transaction (a single SELECT is its own snapshot): the loop
serves other requests while PostgreSQL answers.

Reads that arrive while a SELECT is on its way wait for it and then go together: reads by id as
one ``id = ANY(…)`` SELECT per type (Prisma batches its ``findUnique`` calls the same way), each
vread after them. Each read still sees a state committed before it arrived, and the server and
PostgreSQL pay one round trip for the lot instead of one each.

A vread is the repository's statement (``Repository.vread``); a read by id is
``Repository.current``'s with the ids as an array. Both are compiled once for the asyncpg
dialect (``fhir_server.compiled``) and run on asyncpg's connection itself.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import asyncpg
from sqlalchemy import ARRAY, String, any_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from fhir_server.compiled import Compiled
from fhir_server.repository import VERSION, Stored
from fhir_server.schema import ResourceRow
from fhir_server.stored import ReadTarget
from fhir_server.validation import ID, SUPPORTED_TYPES

_r = ResourceRow.__table__.c
_CURRENT_MANY = select(_r.id, _r.version, _r.last_updated, _r.content).where(
    _r.type == bindparam("type"), _r.id == any_(bindparam("ids", type_=ARRAY(String)))
)


class AsyncReads:
    """Reads by id and vreads of one event loop, batched on one connection of ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._current = Compiled(_CURRENT_MANY, engine.dialect, ("type", "ids"))
        self._version = Compiled(VERSION, engine.dialect, ("type", "id", "version"))
        self._held: AsyncConnection | None = None
        self._driver: asyncpg.Connection | None = None
        self._waiting: dict[ReadTarget, list[asyncio.Future[Stored | None]]] = {}
        self._sender: asyncio.Task[None] | None = None

    async def fetch(self, target: ReadTarget) -> Stored | None:
        """What ``Repository.current`` (a read) or ``Repository.version`` (a vread) finds, or None."""
        if target.type not in SUPPORTED_TYPES or not ID.fullmatch(target.id):
            return None  # nothing stored has it, and it must not fail the reads it would go with
        found: asyncio.Future[Stored | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(target, []).append(found)
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await found

    async def close(self) -> None:
        """Give the connection back (the engine is closing); the sender has nothing left to send."""
        if self._held is not None:
            await self._held.close()
            self._held = self._driver = None

    async def _send(self) -> None:
        """Read what is waiting, reads by id in one SELECT per type, until nothing is."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, {}
                try:
                    found = await self._found(list(batch))
                except Exception as exc:  # each waiting request answers with it (an OperationOutcome 500)
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(exc)
                    await self._drop()  # PostgreSQL restarted, say: the next reads get a new connection
                    continue
                for target, futures in batch.items():
                    for future in futures:
                        if not future.done():  # its client may have gone
                            future.set_result(found.get(target))
        finally:
            self._sender = None

    async def _found(self, targets: list[ReadTarget]) -> dict[ReadTarget, Stored]:
        ids: dict[str, list[str]] = defaultdict(list)
        for target in targets:
            if target.version is None:
                ids[target.type].append(target.id)
        found = {
            ReadTarget(rtype, row[0], None): Stored(rtype, *row)
            for rtype, of_type in ids.items()
            for row in await self._rows(self._current, {"type": rtype, "ids": of_type})
        }
        for target in targets:
            if target.version is not None and (rows := await self._rows(self._version, target._asdict())):
                found[target] = Stored(target.type, target.id, target.version, *rows[0])
        return found

    async def _rows(self, compiled: Compiled, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        if self._driver is None:
            self._held = await self._engine.connect()
            self._driver = (await self._held.get_raw_connection()).driver_connection
        assert self._driver is not None
        rows: list[tuple[Any, ...]] = await self._driver.fetch(compiled.sql, *compiled.params(params))
        return rows

    async def _drop(self) -> None:
        """Invalidate the held connection: closed, not given back to the pool."""
        if self._held is not None:
            held, self._held, self._driver = self._held, None, None
            try:
                await held.invalidate()
                await held.close()
            except Exception:  # it is gone either way
                pass
