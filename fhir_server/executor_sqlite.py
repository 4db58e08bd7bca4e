"""Where work runs on SQLite: the event loop for what is light, the writer's groups, reader threads.

- A read of one resource is one SELECT on the event loop's own connection: it takes less time
  than handing it to a thread would.
- A write is a unit of the writer's groups (``db.groups``, ``fhir_server.db.WriteGroups``); a
  light one runs on the event loop, its COMMIT on a thread.
- A light search is tried on the event loop under a deadline first: on a reader thread every
  SQLite call waits for the GIL the event loop holds. Past the deadline SQLite interrupts it, and
  it runs again on a reader thread, as other reads do, in a transaction of its own.
"""

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, nullcontext
from functools import partial
from typing import TypeVar

from sqlalchemy import Connection

from fhir_server.db import Database, Rollback, WriteGroups, deadline, interrupted
from fhir_server.executor import Executor, find, in_transaction
from fhir_server.repository import Stored
from fhir_server.stored import ReadTarget

T = TypeVar("T")
#: Threads that run reads (other than reads by id and light searches), each on a connection of its own.
READERS = 4


class SqliteExecutor(Executor):
    def __init__(self, db: Database) -> None:
        assert db.groups is not None, "a SQLite database has its writer"
        super().__init__(db)
        self._groups = db.groups
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="sqlite-reader")

    def opened(self) -> AbstractAsyncContextManager[None]:
        return nullcontext()  # nothing lives on the event loop: its connection is per thread (``Database.autocommit``)

    async def read(self, target: ReadTarget) -> Stored | None:
        with self.db.autocommit() as conn:
            return find(conn, target)

    async def run(self, work: Callable[[Connection], T], *, write: bool, light: bool = False) -> T:
        if write:
            return await self._groups.submit(work, inline=light)
        if light:
            with self.db.autocommit() as conn:  # caught inside: the loop's connection stays open
                try:
                    with deadline(conn, WriteGroups.INLINE_BUDGET):
                        return work(conn)
                except Rollback as undo:
                    return undo.value  # type: ignore[no-any-return]
                except Exception as exc:
                    if not interrupted(exc):
                        raise
            # past the time a write group may hold the loop: again on a reader thread
        return await asyncio.get_running_loop().run_in_executor(
            self._readers, partial(in_transaction, self.db.begin(write=False), work)
        )
