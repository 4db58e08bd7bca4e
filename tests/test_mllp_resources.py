"""Resources of the MLLP door (issue 15): 1,100 idle MLLP sockets against ``overread serve`` run with
``ulimit -n 1024`` while a client keeps ordering. Every order is answered (the connection idle the
longest makes room: ``MllpServer`` connection limits), the FHIR API keeps answering, and the server
logs no flood of "accept() out of system resource"."""

import contextlib
import socket
import threading
import time
from pathlib import Path

import hl7.client
import httpx
import pytest

from tests.hl7_golden import omi_order
from tests.processes import fhir_base, serve_env, start_serve

IDLE = 1_100
#: The idle sockets come from another loopback address than the orders, as a flood comes from another host.
FLOODER = "127.0.0.2"
ORDERS = 20


def _hold_idle_sockets(port: int, held: list[socket.socket], opened: threading.Event) -> None:
    """Open ``IDLE`` connections that stall after the first bytes of a block; set ``opened`` once each
    is made and the server has taken it off its listen queue (``_queued``), or after a minute.

    Non-blocking, so a full listen queue does not stall the loop. A client sees its connection
    made before the server accepts it, so only the server's queue says when the flood has landed.
    """
    for _ in range(IDLE):
        s = socket.socket()
        s.bind((FLOODER, 0))
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        held.append(s)
    deadline = time.monotonic() + 60
    while _connecting(held) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling a condition, bounded: not a race against a timeout
    # The start of a block, then silence: a connection the kernel let through on a SYN cookie
    # exists for the server only once a segment with data arrives.
    for s in held:
        with contextlib.suppress(OSError):  # one the server has closed already
            s.send(b"\x0bMSH|")
    while _queued(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    opened.set()


def _connecting(sockets: list[socket.socket]) -> int:
    """How many of ``sockets`` are still in their handshake (a SYN dropped on a full queue is retried)."""
    waiting = 0
    for s in sockets:
        try:
            s.getpeername()
        except OSError:
            waiting += 1
    return waiting


def _queued(port: int) -> int:
    """Connections to ``port`` not yet accepted: the listen queue (rx_queue of the LISTEN socket) and
    handshakes the kernel holds back while that queue is full (SYN_RECV), from /proc/net/tcp."""
    queued = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) != port:
            continue
        if fields[3] == "0A":  # LISTEN
            queued += int(fields[4].split(":")[1], 16)
        elif fields[3] == "03":  # SYN_RECV
            queued += 1
    return queued


@pytest.mark.slow
def test_eleven_hundred_idle_mllp_sockets_do_not_stop_orders(database_url: str, tmp_path: Path):
    env = serve_env(database_url, tmp_path)
    log = tmp_path / "serve.log"
    port = int(env["OVERREAD_MLLP_PORT"])
    held: list[socket.socket] = []
    opened = threading.Event()
    flood = threading.Thread(target=_hold_idle_sockets, args=(port, held, opened))
    server = start_serve(env, fd_limit=1024, log=log)
    try:
        flood.start()
        answers = []
        for n in range(ORDERS):  # while the idle sockets pile up, and after
            if n == ORDERS // 2:  # the rest once the server has taken every idle socket (or a minute has passed)
                assert opened.wait(90)
            client = hl7.client.MLLPClient("127.0.0.1", port)
            client.socket.settimeout(30)  # generous: a refused or unanswered order fails, a slow one does not
            try:
                answers.append(client.send_message(omi_order(n)).split(b"\r")[1][:6])
            finally:
                client.close()
        assert answers == [b"MSA|AA"] * ORDERS
        assert httpx.get(f"{fhir_base(env)}/metadata", timeout=30).status_code == 200
    finally:
        if flood.ident is not None:  # started
            flood.join()  # it holds the sockets until each is connected or a minute has passed
        for s in held:
            s.close()
        server.terminate()
        server.wait(30)
    assert log.read_text(errors="replace").count("out of system resource") <= 1
