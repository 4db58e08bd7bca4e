"""Resources of the MLLP door (issue 15): 1,100 idle MLLP sockets against ``overread serve`` run with
``ulimit -n 1024`` while a client keeps ordering. Every order is answered (the connection idle the
longest makes room: ``MllpServer`` connection limits), the FHIR API keeps answering, and the server
logs no flood of "accept() out of system resource"."""

import selectors
import socket
import threading
import time
from pathlib import Path

import hl7.client
import httpx

from tests.hl7_golden import omi_order
from tests.processes import fhir_base, serve_env, start_serve

IDLE = 1_100
ORDERS = 20


def _hold_idle_sockets(port: int, held: list[socket.socket], opened: threading.Event) -> None:
    """Open ``IDLE`` connections that never send a byte, and wait (60 s at most) until each is made.

    Non-blocking, so a full listen backlog does not stall the loop; a connection is made once the
    server has taken earlier ones off its backlog, which it does only while it can accept.
    """
    with selectors.DefaultSelector() as selector:  # epoll: more sockets than select() takes
        for _ in range(IDLE):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            held.append(s)
            selector.register(s, selectors.EVENT_WRITE)
        deadline, pending = time.monotonic() + 60, IDLE
        while pending and time.monotonic() < deadline:
            for key, _ in selector.select(1):
                selector.unregister(key.fileobj)
                pending -= 1
    opened.set()


def test_eleven_hundred_idle_mllp_sockets_do_not_stop_orders(database_url: str, tmp_path: Path):
    env = serve_env(database_url, tmp_path)
    log = tmp_path / "serve.log"
    server = start_serve(env, fd_limit=1024, log=log)
    held: list[socket.socket] = []
    try:
        port = int(env["OVERREAD_MLLP_PORT"])
        opened = threading.Event()
        flood = threading.Thread(target=_hold_idle_sockets, args=(port, held, opened))
        flood.start()
        answers = []
        for n in range(ORDERS):  # while the idle sockets pile up, and after
            if n == ORDERS // 2:  # the rest once every idle socket is connected (or a minute has passed)
                assert opened.wait(90)
            client = hl7.client.MLLPClient("127.0.0.1", port)
            client.socket.settimeout(30)  # generous: a refused or unanswered order fails, a slow one does not
            try:
                answers.append(client.send_message(omi_order(n)).split(b"\r")[1][:6])
            finally:
                client.close()
        flood.join()
        assert answers == [b"MSA|AA"] * ORDERS
        assert httpx.get(f"{fhir_base(env)}/metadata", timeout=30).status_code == 200
    finally:
        for s in held:
            s.close()
        server.terminate()
        server.wait(30)
    assert log.read_text(errors="replace").count("out of system resource") <= 1
