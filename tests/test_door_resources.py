"""Resources of every door at once (issue 15): ``overread serve`` run with ``ulimit -n 1024`` on free
ports, SQLite and PostgreSQL, while 1,100 idle MLLP sockets and 40 idle DICOM sockets are held open and a
client keeps creating (FHIR POST), ordering (MLLP, on a connection opened before the flood and on new
ones) and storing (C-STORE with DCMTK's storescu). Every request is served (idle MLLP connections make
room: ``MllpServer``'s limits; idle DICOM connections are no associations: the Storage SCP's), and the
server's log stays short."""

import contextlib
import select
import socket
import threading
import time
from pathlib import Path

import hl7.client
import httpx
import pytest

from tests.hl7_golden import omi_order
from tests.processes import fhir_base, serve_env, start_serve
from tests.test_storage_scp import AE_TITLE, dcmtk, saved

IDLE = 1_100
IDLE_DICOM = 40  # more than the 32 associations the Storage SCP takes at once
#: The idle sockets come from another loopback address than the clients, as a flood comes from another host.
FLOODER = "127.0.0.2"
ROUNDS = 20
#: Generous: a bound for a loaded machine; a refused or unanswered request fails, a slow one does not.
WAIT = 30.0


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
def test_idle_sockets_at_every_door_do_not_stop_creating_ordering_and_storing(database_url: str, tmp_path: Path):
    # The idle DICOM sockets are held as long as the test lasts: no ARTIM timeout closes them meanwhile.
    env = serve_env(database_url, tmp_path, dicom_associate_timeout="600")
    log = tmp_path / "serve.log"
    mllp, dicom = int(env["OVERREAD_MLLP_PORT"]), int(env["OVERREAD_DICOM_PORT"])
    held: list[socket.socket] = []  # the MLLP flood's
    opened = threading.Event()
    flood = threading.Thread(target=_hold_idle_sockets, args=(mllp, held, opened))
    server = start_serve(env, fd_limit=1024, log=log)
    engine = hl7.client.MLLPClient("127.0.0.1", mllp)  # an engine's connection, open before the flood
    engine.socket.settimeout(WAIT)
    idle_dicom: list[socket.socket] = []
    try:
        idle_dicom += [socket.create_connection(("127.0.0.1", dicom), WAIT, (FLOODER, 0)) for _ in range(IDLE_DICOM)]
        flood.start()
        with httpx.Client(base_url=fhir_base(env), timeout=WAIT) as fhir:
            for n in range(ROUNDS):  # while the idle sockets pile up, and after
                if n == ROUNDS // 2:  # the rest once the server has taken every idle socket (or a minute has passed)
                    assert opened.wait(90)
                created = fhir.post("/Patient", json={"resourceType": "Patient", "name": [{"family": f"Door{n}"}]})
                assert created.status_code == 201, created.text
                assert _order(engine, n) if n % 2 else _order_anew(mllp, n)
                # DCMTK, a process of its own: this one holds over 1,024 descriptors, past select()'s reach
                path, _ = saved(tmp_path, "CT_small.dcm", f"ACC-DOOR-{n}")
                stored = dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(dicom), str(path))
                assert stored.returncode == 0, stored.stderr
        assert not select.select(idle_dicom, [], [], 0)[0]  # still open: waiting, not closed to make room
    finally:
        engine.close()
        if flood.ident is not None:  # started
            flood.join(120)  # it holds the sockets until each is connected or a minute has passed
        for s in [*held, *idle_dicom]:
            s.close()
        server.terminate()
        server.wait(30)
    assert len(list((tmp_path / "images").glob("*/*/*.dcm"))) == ROUNDS  # study/series/instance
    lines = log.read_text(errors="replace").splitlines()
    assert sum("out of system resource" in line for line in lines) <= 1
    # start and stop, and a few warnings (before: a WARNING for each idle MLLP socket closed mid-block)
    assert len(lines) < 50, lines[-50:]


def _order(client: hl7.client.MLLPClient, n: int) -> bool:
    """Whether order ``n`` sent on ``client`` is accepted (AA)."""
    return bytes(client.send_message(omi_order(n))).split(b"\r")[1].startswith(b"MSA|AA")


def _order_anew(port: int, n: int) -> bool:
    """Whether order ``n`` sent on a connection of its own is accepted."""
    client = hl7.client.MLLPClient("127.0.0.1", port)
    client.socket.settimeout(WAIT)
    try:
        return _order(client, n)
    finally:
        client.close()
