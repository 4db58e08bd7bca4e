"""A crash during a burst loses and duplicates nothing (issue 3's crash test).

10 senders (python-hl7 MLLP clients) send 1,000 orders to `overread serve`; the server is
killed with SIGKILL mid-burst, restarted on the same database, and every sender resends what
it has no ACK for. Every ACKed order must be stored, none twice: exactly 1,000 cases.
"""

import asyncio
import os
import signal
from pathlib import Path

import hl7
import hl7.mllp
import pytest
from sqlalchemy import func, select

from fhir_server.db import Database
from fhir_server.schema import ResourceRow
from hl7_bridge.store import InboundMessage
from tests.hl7_golden import omi_order
from tests.processes import serve_env, start_serve

SENDERS, PER_SENDER, KILL_AFTER = 10, 100, 300


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


@pytest.mark.slow
def test_kill_9_mid_burst_then_resend_gives_exactly_one_case_per_order(database_url: str, tmp_path: Path):
    url = database_url  # SQLite and PostgreSQL
    env = serve_env(url, tmp_path)
    mllp_port = int(env["OVERREAD_MLLP_PORT"])
    batches = [
        [(f"MSG{n:04d}", omi_order(n)) for n in range(s * PER_SENDER, (s + 1) * PER_SENDER)] for s in range(SENDERS)
    ]
    acked: set[str] = set()

    server = start_serve(env)
    asyncio.run(_burst(mllp_port, batches, acked, kill=server.pid))
    server.wait(10)
    assert server.returncode == -signal.SIGKILL
    before_restart = set(acked)
    assert KILL_AFTER <= len(before_restart) < SENDERS * PER_SENDER

    server = start_serve(env)
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
