"""The HTTP server's own limits against idle and partial connections (docs/reliability.md#http-and-fhir):
a real uvicorn on 127.0.0.1 with ``overread.server.GuardedHttp``, raw sockets as the clients."""

import logging
import select
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import orjson
import pytest

from fhir_server.db import Database
from overread.app import create_app
from overread.server import running
from overread.settings import Settings

#: Generous: a bound for a loaded machine, not a latency claim.
WAIT = 20.0


@pytest.fixture
def server(sqlite_db: Database) -> Iterator[tuple[str, tuple[str, int]]]:
    settings = Settings(database_url=sqlite_db.url, http_header_timeout=0.5, http_body_timeout=0.5,
                        http_max_connections=5, http_max_header_bytes=8192)  # fmt: skip
    with running(create_app(settings, sqlite_db), settings=settings) as root:
        host, port = root.removeprefix("http://").split(":")
        yield root, (host, int(port))


def connect(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=WAIT)
    return sock


def answer(sock: socket.socket) -> tuple[bytes, dict[str, Any]]:
    """What the server sends until it closes the connection: (status line, JSON body)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], orjson.loads(body)


def test_headers_that_do_not_arrive_whole_get_408_and_the_socket_is_closed(server):
    _, address = server
    with connect(address) as sock:
        sock.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        status, body = answer(sock)
    assert status.startswith(b"HTTP/1.1 408")
    assert body["resourceType"] == "OperationOutcome" and body["issue"][0]["code"] == "timeout"


def test_a_connection_that_sends_nothing_is_closed(server):
    _, address = server
    with connect(address) as sock:
        assert sock.recv(1) == b""  # closed by the server, not by WAIT's timeout (which raises)


def test_unfinished_headers_over_the_limit_get_431(server):
    _, address = server
    with connect(address) as sock:
        sock.sendall(b"GET /fhir/metadata HTTP/1.1\r\nHost: x\r\nx-big: " + b"v" * 9000)
        status, body = answer(sock)
    assert status.startswith(b"HTTP/1.1 431")
    assert body["issue"][0]["code"] == "too-costly"


def test_connections_over_the_cap_get_503_and_requests_are_served_again_after(server):
    root, address = server
    with ExitStack() as idle:
        for _ in range(5):
            sock = idle.enter_context(connect(address))
            sock.sendall(b"GET /fhir/metadata HTTP/1.1\r\n")  # held open, partial: the cap counts them
        with connect(address) as extra:
            status, body = answer(extra)
        assert status.startswith(b"HTTP/1.1 503"), status
        assert body["issue"][0]["code"] == "transient"
    # The held sockets are closed (by us, or their header timeout): the server answers again, as
    # soon as it has seen them close; the loop waits for that, bounded by WAIT.
    deadline = time.monotonic() + WAIT
    with httpx.Client(timeout=WAIT) as client:
        while (status_code := client.get(f"{root}/fhir/metadata").status_code) == 503 and time.monotonic() < deadline:
            continue
    assert status_code == 200


POST = b"POST /fhir/Patient HTTP/1.1\r\nHost: x\r\nContent-Type: application/fhir+json\r\n"


def test_a_body_that_stalls_gets_408_and_the_socket_is_closed(server, caplog):
    root, address = server
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.addHandler(caplog.handler)  # it does not propagate to the root
    try:
        with connect(address) as sock:
            sock.sendall(POST + b"Content-Length: 100\r\n\r\n" + b'{"resourceType": "Patient"')  # and no more
            status, body = answer(sock)
        assert status.startswith(b"HTTP/1.1 408")
        assert body["issue"][0]["code"] == "timeout" and "body" in body["issue"][0]["diagnostics"]
        # the request's task ends after the close: a request served after it is served after that too
        assert httpx.get(f"{root}/fhir/metadata", timeout=WAIT).status_code == 200
    finally:
        uvicorn_log.removeHandler(caplog.handler)  # not left on a logger that outlives the test
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_body_that_trickles_is_cut_at_the_timeout_too(server):
    _, address = server
    with connect(address) as sock:
        sock.sendall(POST + b"Transfer-Encoding: chunked\r\n\r\n")
        # A byte of body every 50 ms never leaves the connection idle for the timeout: only a
        # deadline for the whole body ends it. The loop ends when the server answers or closes.
        deadline = time.monotonic() + WAIT
        while not select.select([sock], [], [], 0.05)[0] and time.monotonic() < deadline:
            sock.sendall(b"1\r\n \r\n")
        status, _ = answer(sock)
    assert status.startswith(b"HTTP/1.1 408")


def test_a_body_that_arrives_in_pieces_in_time_is_served(server):
    _, address = server
    payload = b'{"resourceType": "Patient"}'
    with connect(address) as sock:
        sock.sendall(POST + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for piece in (payload[:10], payload[10:]):
            sock.sendall(piece)
        status, body = answer(sock)
    assert status.startswith(b"HTTP/1.1 201") and body["resourceType"] == "Patient"


def test_a_request_whose_headers_arrive_in_pieces_in_time_is_served(server):
    _, address = server
    with connect(address) as sock:
        for piece in (b"GET /fhir/Patient HTTP/1.1\r\n", b"Host: x\r\n", b"Connection: close\r\n\r\n"):
            sock.sendall(piece)
        status, body = answer(sock)
    assert status.startswith(b"HTTP/1.1 200") and body["resourceType"] == "Bundle"
