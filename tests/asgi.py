"""Talking to the FHIR API of a database through its ASGI app, on this thread's event loop."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx
from starlette.applications import Starlette

from fhir_server.api import mount
from fhir_server.db import Database
from fhir_server.executor import for_database

T = TypeVar("T")


def talk(db: Database, conversation: Callable[[httpx.AsyncClient], Awaitable[T]]) -> T:
    """``conversation(client)`` against ``db``'s FHIR API, the client sending FHIR JSON."""
    app = Starlette()
    mount(app, for_database(db))

    async def run() -> T:
        transport = httpx.ASGITransport(app=app)
        headers = {"content-type": "application/fhir+json"}
        async with httpx.AsyncClient(transport=transport, base_url="http://test", headers=headers) as client:
            return await asyncio.wait_for(conversation(client), 60)  # a request left unanswered fails, not hangs

    return asyncio.run(run())
