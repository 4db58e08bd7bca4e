"""Durable HL7 order intake beside a bare MLLP server, in the same run (issue 3's benchmark).

``python -m bench.hl7_intake [--seconds 10] [--senders 8] [--database-url URL]``

- intake: ``overread serve`` (its MLLP listener on a free port, SQLite in a temporary
  directory unless ``--database-url``, e.g. an empty PostgreSQL database, which the bench
  migrates first): every message is stored, mapped, written as one transaction and
  acknowledged after the commit.
- ceiling: a bare MLLP server in another process that only parses each message with the
  same parser and answers AA (``python -m bench.hl7_intake --bare PORT``).
Each sender is one MLLP connection sending distinct ORM^O01/OMI^O23 orders (the dcm4che
fixture shape, a new MSH-10, patient and placer number each) one after the other.
"""

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from fhir_server.db import Database
from hl7_bridge.ack import acknowledge
from hl7_bridge.mllp import Deframer, MllpServer, frame
from mappings.v2 import parse
from overread.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
ORDER = (ROOT / "overread" / "samples" / "second-opinion-order.hl7").read_bytes()


def order(n: int) -> bytes:
    text = b"\r".join(ORDER.splitlines()) + b"\r"
    return (
        text.replace(b"MSG-000812", f"B{n:08d}".encode())
        .replace(b"MRN-004211", f"MRN-B{n:08d}".encode())
        .replace(b"ORD-88121", f"ORD-B{n:08d}".encode())
    )


async def sender(port: int, first: int, stop: float, latencies: list[float]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    deframer, sent = Deframer(), 0
    try:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            writer.write(frame(order(first + sent)))
            await writer.drain()
            replies: list[bytes] = []
            while not replies:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("the server closed the connection")
                replies = deframer.feed(data)
            if b"MSA|AA|" not in replies[0]:
                raise RuntimeError(f"not an AA: {replies[0][:200]!r}")
            latencies.append(time.perf_counter() - started)
            sent += 1
    finally:
        writer.close()
    return sent


def measure(port: int, senders: int, seconds: float, offset: int) -> tuple[float, float, float]:
    """(messages/s, p50 ms, p99 ms) over ``seconds`` after a 1 s warm-up."""
    latencies: list[float] = []

    async def run(duration: float, base: int) -> int:
        stop = time.perf_counter() + duration
        counts = await asyncio.gather(*(sender(port, base + i * 10_000_000, stop, latencies) for i in range(senders)))
        return sum(counts)

    asyncio.run(run(1.0, offset))
    latencies.clear()
    started = time.perf_counter()
    done = asyncio.run(run(seconds, offset + 5_000_000))
    elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return done / elapsed, statistics.median(ordered) * 1000, p99 * 1000


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.1)


def bare(port: int) -> None:
    """The ceiling: parse and acknowledge, nothing stored."""

    async def answer(message: bytes) -> bytes:
        return acknowledge(parse(message), None, control_id="BARE", now=datetime.now())

    async def main() -> None:
        async with MllpServer(answer, "127.0.0.1", port):
            await asyncio.Event().wait()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hl7_intake", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--senders", type=int, default=8)
    parser.add_argument("--database-url", default="")
    parser.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        return bare(args.bare)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'intake.db'}"
        if args.database_url:  # overread serve migrates only its embedded SQLite by itself
            db = Database(url)
            upgrade(db.engine)
            db.dispose()
        rows: list[tuple[str, float, float, float]] = []
        bare_port, mllp_port = free_port(), free_port()
        env = {**os.environ, "OVERREAD_DATABASE_URL": url, "OVERREAD_HTTP_PORT": str(free_port()),
               "OVERREAD_MLLP_PORT": str(mllp_port)}  # fmt: skip
        for label, cmd, port in (
            ("bare MLLP server: parse + AA (ceiling)", [sys.executable, "-m", "bench.hl7_intake", "--bare",
                                                         str(bare_port)], bare_port),
            ("overread serve: store, map, write, AA", [sys.executable, "-m", "overread.cli", "serve"], mllp_port),
        ):  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_for(port, proc)
                rows.append((label, *measure(port, args.senders, args.seconds, offset=len(rows) * 100_000_000)))
            finally:
                proc.terminate()
                proc.wait(20)
    print(f"HL7 intake, {args.senders} senders, {args.seconds:g} s each, database {url.split(':')[0]}\n")
    print("| measurement | messages/s | p50 ms | p99 ms | share of bare |")
    print("|---|---|---|---|---|")
    ceiling = rows[0][1]
    for label, rate, p50, p99 in rows:
        print(f"| {label} | {rate:,.0f} | {p50:.2f} | {p99:.2f} | {rate / ceiling:.1%} |")
    share = rows[1][1] / ceiling
    print(f"\ngoal: intake at least 10% of the bare server: {'pass' if share >= 0.10 else 'FAIL'} ({share:.1%})")


if __name__ == "__main__":
    main()
