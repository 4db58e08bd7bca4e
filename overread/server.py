"""Run the HTTP server: uvicorn with what its protocol lacks against idle and partial connections.

``running`` serves in a background thread (the demo, and tests that need a real socket);
``overread serve`` uses ``http_config`` too.
"""

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fhir_server.errors import FhirError, error
from overread.settings import Settings


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol, bounded (docs/reliability.md#http-and-fhir).

    uvicorn times out only an idle keep-alive connection: one that sends nothing at all, or
    part of its headers or body, holds its socket (and its request's task) for ever. Here a
    request's headers must arrive whole within ``header_timeout`` seconds of its first byte (or of
    the connection), and its body within ``body_timeout`` seconds of its headers, else 408 (RFC
    9110 §15.5.9) and close; unfinished headers over ``max_header_bytes`` are 431 (RFC 6585 §5) and
    close, so they cannot grow in memory; a connection over ``max_connections`` open at once is
    503 and closed at once, before it costs more than its socket.
    """

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 256

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None  # headers' or body's, one at a time
        self._reading_headers, self._header_bytes = True, 0
        if len(self.connections) > self.max_connections:
            self._refuse(error(503, "transient", f"The server holds {self.max_connections} connections already"))
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._reading_headers:
            self._header_bytes += len(data)
        super().data_received(data)
        if self._reading_headers and self._header_bytes > self.max_header_bytes and not self.transport.is_closing():
            self._refuse(error(431, "too-costly", f"Request headers may have at most {self.max_header_bytes} bytes"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers = True
        self._arm()

    def on_headers_complete(self) -> None:
        self._reading_headers, self._header_bytes = False, 0
        self._disarm()
        self._timer = self.loop.call_later(self.body_timeout, self._body_late)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()
        self._reading_headers = True  # what comes next on this connection is another request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if self._reading_headers and self._header_bytes:
            self._refuse(error(408, "timeout", f"The request headers did not arrive within {self.header_timeout} s"))
        elif not self.transport.is_closing():
            self.transport.close()  # nothing sent at all: nothing to answer

    def _body_late(self) -> None:
        self._timer = None
        if self.flow.read_paused:  # we are not reading (the app is behind, or a pipelined request waits)
            self._timer = self.loop.call_later(self.body_timeout, self._body_late)
        elif self.cycle.response_started:  # answered without the whole body: no room for a 408
            self.transport.close()
        else:
            self.cycle.disconnected = True  # the app's answer, if it still sends one, goes nowhere
            self._refuse(error(408, "timeout", f"The request body did not arrive within {self.body_timeout} s"))

    def _refuse(self, refusal: FhirError) -> None:
        """Answer ``refusal`` as an OperationOutcome and close the connection."""
        body = orjson.dumps(refusal.outcome)
        head = (
            f"HTTP/1.1 {refusal.status} {_REASONS[refusal.status]}\r\ncontent-type: application/fhir+json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self._disarm()
        self._reading_headers = False
        self.transport.write(head.encode() + body)
        self.transport.close()


_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable"}


def http_config(app: Starlette, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` with ``settings``' connection limits."""
    protocol = type(
        "GuardedHttp",
        (GuardedHttp,),
        {
            "header_timeout": settings.http_header_timeout,
            "body_timeout": settings.http_body_timeout,
            "max_header_bytes": settings.http_max_header_bytes,
            "max_connections": settings.http_max_connections,
        },
    )
    config = uvicorn.Config(
        _quiet_when_left(app), http=protocol, timeout_keep_alive=settings.http_keep_alive_timeout, **options
    )
    access = logging.getLogger("uvicorn.access")  # configured by the Config above
    for old in [f for f in access.filters if isinstance(f, WithoutQuery)]:
        access.removeFilter(old)
    if not settings.log_sensitive:
        access.addFilter(WithoutQuery())
    return config


def _quiet_when_left(app: ASGIApp) -> ASGIApp:
    """``app``, where a request whose client left before its body arrived (or was cut off for
    ``body_timeout``) just ends: no one is there to answer, and a traceback per slow client
    would flood the log."""

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        with suppress(ClientDisconnect):
            await app(scope, receive, send)

    return guarded


class WithoutQuery(logging.Filter):
    """Leaves the query string out of uvicorn's access log lines: searches carry PHI
    (``Patient?name=Haugen&birthdate=1961-04-17``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client, method, path with query, HTTP version, status)
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(path := args[2], str):
            record.args = (*args[:2], path.split("?", 1)[0], *args[3:])
        return True


@contextmanager
def running(app: Starlette, host: str = "127.0.0.1", port: int = 0, settings: Settings | None = None) -> Iterator[str]:
    """Serve ``app`` until the block ends; yields the server's root URL, e.g. http://127.0.0.1:4711.

    The socket is bound before the server starts (port 0: a free one), so no other
    process can take the port in between and the URL is known at once.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = http_config(app, settings or Settings(), log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="http-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
