"""A crash during a burst loses and duplicates nothing (issue 3's crash test).

10 senders (python-hl7 MLLP clients) send 1,000 orders to `overread serve`; the server is
killed with SIGKILL mid-burst, restarted on the same database, and every sender resends what
it has no ACK for. Every ACKed order must be stored, none twice: exactly 1,000 cases.
"""

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import hl7
import hl7.mllp
from sqlalchemy import func, select

from fhir_server.db import Database
from fhir_server.schema import ResourceRow
from hl7_bridge.store import InboundMessage
from tests.test_hl7_intake import _order

SENDERS, PER_SENDER, KILL_AFTER = 10, 100, 300


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _start(env: dict[str, str], mllp_port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen([sys.executable, "-m", "overread.cli", "serve"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", mllp_port), timeout=1).close()
            return server
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, "the server did not come up"
            time.sleep(0.1)


async def _send(port: int, messages: list[tuple[str, bytes]], acked: set[str]) -> None:
    """Send in order what has no ACK yet; stop quietly when the server goes away."""
    try:
        reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    except OSError:
        return
    try:
        for control_id, message in messages:
            if control_id in acked:
                continue
            writer.writemessage(hl7.parse(message.decode()))
            await writer.drain()
            ack = await asyncio.wait_for(reader.readmessage(), 30)
            assert (str(ack.segment("MSA")[1]), str(ack.segment("MSA")[2])) == ("AA", control_id)
            acked.add(control_id)
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return
    finally:
        writer.close()


async def _burst(port: int, batches: list[list[tuple[str, bytes]]], acked: set[str], kill: int | None) -> None:
    async def killer() -> None:
        while len(acked) < KILL_AFTER:
            await asyncio.sleep(0.01)
        os.kill(kill, signal.SIGKILL)  # type: ignore[arg-type]

    tasks = [_send(port, batch, acked) for batch in batches]
    await asyncio.gather(*tasks, *([killer()] if kill else []))


def test_kill_9_mid_burst_then_resend_gives_exactly_one_case_per_order(database_url: str, tmp_path: Path):
    url = database_url  # SQLite and PostgreSQL
    http_port, mllp_port = _free_port(), _free_port()
    env = {**os.environ, "OVERREAD_DATABASE_URL": url, "OVERREAD_HTTP_PORT": str(http_port),
           "OVERREAD_MLLP_PORT": str(mllp_port), "OVERREAD_DICOM_PORT": str(_free_port()),
           "OVERREAD_IMAGE_STORE": str(tmp_path / "images")}  # fmt: skip
    batches = [
        [(f"MSG{n:04d}", _order(n)) for n in range(s * PER_SENDER, (s + 1) * PER_SENDER)] for s in range(SENDERS)
    ]
    acked: set[str] = set()

    server = _start(env, mllp_port)
    asyncio.run(_burst(mllp_port, batches, acked, kill=server.pid))
    server.wait(10)
    assert server.returncode == -signal.SIGKILL
    before_restart = set(acked)
    assert KILL_AFTER <= len(before_restart) < SENDERS * PER_SENDER

    server = _start(env, mllp_port)
    try:
        asyncio.run(_burst(mllp_port, batches, acked, kill=None))
    finally:
        server.terminate()
        server.wait(20)

    assert len(acked) == SENDERS * PER_SENDER
    db = Database(url)
    with db.begin(write=False) as conn:
        count = {t: conn.scalar(select(func.count()).where(ResourceRow.type == t)) for t in ("Task", "ServiceRequest")}
        stored = set(conn.scalars(select(InboundMessage.control_id).where(InboundMessage.status == "processed")))
        rows = conn.scalar(select(func.count()).select_from(InboundMessage))
    db.dispose()
    assert count == {"Task": 1000, "ServiceRequest": 1000}
    assert before_restart <= stored and len(stored) == rows == 1000
