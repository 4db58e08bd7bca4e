"""MLLP transport (hl7_bridge.mllp): framing codec, server behaviours, client, TLS, a foreign client.

Every socket test binds 127.0.0.1 on a free port and runs in its own ``asyncio.run`` with a hard
timeout, so a hung connection fails one test instead of hanging the run.
"""

import asyncio
import logging
import random
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from hl7_bridge.mllp import (
    OVERSIZE_HEAD,
    Deframer,
    FrameTooLargeError,
    MllpConnectionClosedError,
    MllpServer,
    current_connection,
    frame,
    send,
)
from tests.hl7_golden import DCM4CHE as FIXTURES

HOST = "127.0.0.1"


def run(coro: Awaitable[Any], timeout: float = 15.0) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def fixture_messages() -> dict[str, bytes]:
    """The dcm4che sample messages, segment separators normalised to CR (the files are not edited)."""
    out = {}
    for path in sorted(FIXTURES.glob("*.hl7")):
        data = path.read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r") + b"\r"
        out[path.name] = data
    return out


def control_id(message: bytes) -> bytes:
    """MSH-10, by splitting bytes (enough for a test; the real parser belongs to the HL7 layer)."""
    msh = message.split(b"\r", 1)[0]
    return msh.split(b"|")[9]


def ack(message: bytes, code: bytes = b"AA") -> bytes:
    cid = control_id(message)
    return b"MSH|^~\\&|OVERREAD|OVR|||20260101000000||ACK|A" + cid + b"|P|2.5.1\rMSA|" + code + b"|" + cid + b"\r"


def msg(n: int | str) -> bytes:
    return f"MSH|^~\\&|SND|FAC|OVERREAD|OVR|20260101000000||ORM^O01|{n}|P|2.5.1\rPID|||{n}\r".encode()


async def echo(message: bytes) -> bytes:
    return message


async def ack_handler(message: bytes) -> bytes:
    return ack(message)


async def read_replies(reader: asyncio.StreamReader, count: int, timeout: float = 5.0) -> list[bytes]:
    deframer = Deframer()
    out: list[bytes] = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            data = await reader.read(65536)
            if not data:
                raise MllpConnectionClosedError(f"closed after {len(out)} of {count} replies")
            out += deframer.feed(data)
    return out


async def is_closed_by_server(reader: asyncio.StreamReader, timeout: float = 3.0) -> bool:
    """True when the server closes the connection (EOF or reset) without sending anything more."""
    try:
        async with asyncio.timeout(timeout):
            data = await reader.read(65536)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


async def serving(
    handler: Callable[[bytes], Awaitable[bytes | None]], test: Callable[[MllpServer], Awaitable[Any]], **kw: Any
) -> Any:
    async with MllpServer(handler, HOST, 0, **kw) as server:
        return await test(server)


# --- codec -------------------------------------------------------------------------------


def test_frame_wraps_and_rejects_framing_bytes():
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"
    assert frame(b"") == b"\x0b\x1c\r"
    with pytest.raises(ValueError):
        frame(b"a\x0bb")
    with pytest.raises(ValueError):
        frame(b"a\x1cb")


def test_deframer_roundtrip_split_at_every_byte():
    messages = [msg(1), msg(2), b"", msg(3)]
    stream = b"".join(frame(m) for m in messages)
    # Every single split point, and byte-by-byte: the result never depends on read boundaries.
    for cut in range(len(stream) + 1):
        d = Deframer()
        assert d.feed(stream[:cut]) + d.feed(stream[cut:]) == messages
    d = Deframer()
    out = [m for i in range(len(stream)) for m in d.feed(stream[i : i + 1])]
    assert out == messages
    assert d.pending == 0
    assert d.discarded == 0


def test_deframer_discards_bytes_outside_blocks():
    d = Deframer()
    assert d.feed(b"garbage\r\n" + frame(b"A") + b"\n\n" + frame(b"B") + b"tail") == [b"A", b"B"]
    assert d.discarded == len(b"garbage\r\n") + 2 + 4
    assert d.discarded_whitespace == 2  # only the LF LF between the blocks


def test_deframer_lone_end_block_is_content_and_start_block_restarts():
    d = Deframer()
    # EB not followed by CR is content (only EB CR ends a block), also across a read boundary.
    assert d.feed(b"\x0ba\x1cb\x1c\r") == [b"a\x1cb"]
    assert d.feed(b"\x0ba\x1c") == []
    assert d.feed(b"b\x1c") == []
    assert d.feed(b"\r") == [b"a\x1cb"]
    # A new SB inside a block abandons the truncated block.
    assert d.feed(b"\x0btrunc") == []
    assert d.pending == 5
    assert d.feed(b"ated\x0bwhole\x1c\r") == [b"whole"]
    assert d.discarded == len(b"\x0btruncated")


def test_deframer_oversize_raises_with_preceding_messages_and_resyncs():
    d = Deframer(max_size=10)
    assert d.feed(frame(b"x" * 10)) == [b"x" * 10]  # exactly the limit is fine
    with pytest.raises(FrameTooLargeError) as info:
        d.feed(frame(b"ok") + b"\x0b" + b"y" * 11)
    assert info.value.messages == [b"ok"]
    assert info.value.limit == 10
    # Detected before the end block arrives (memory is bounded), and the deframer resyncs on the next SB.
    assert d.pending == 0
    assert d.feed(b"yyyy\x1c\r" + frame(b"next")) == [b"next"]


# --- server ------------------------------------------------------------------------------


def test_several_messages_per_connection_nodelay_and_port():
    async def test(server: MllpServer):
        assert server.port > 0
        reader, writer = await asyncio.open_connection(HOST, server.port)
        for i in range(5):
            writer.write(frame(msg(i)))
            assert await read_replies(reader, 1) == [ack(msg(i))]
        [info] = server.connections
        assert info.tcp_nodelay
        assert not info.tls
        writer.close()

    run(serving(ack_handler, test))


def test_garbage_before_frame_is_discarded_and_logged(caplog):
    caplog.set_level(logging.WARNING, logger="hl7_bridge.mllp")

    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"\r\nGET / HTTP/1.0\r\n\x00\xff" + frame(msg(1)))
        assert await read_replies(reader, 1) == [msg(1)]
        # A line end after each block (a common sender habit) is dropped without a warning.
        writer.write(frame(msg(2)) + b"\r\n")
        assert await read_replies(reader, 1) == [msg(2)]
        writer.write(b"\n" + frame(msg(3)))
        assert await read_replies(reader, 1) == [msg(3)]
        writer.close()

    run(serving(echo, test))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["MLLP connection 1: discarded 20 bytes outside MLLP blocks"]


def test_frame_split_byte_by_byte_over_the_socket():
    message = fixture_messages()["ORM_O01-GeneralOrder.hl7"]

    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        for byte in frame(message):
            writer.write(bytes([byte]))
            await writer.drain()
        assert await read_replies(reader, 1) == [message]
        writer.close()

    run(serving(echo, test))


def test_three_frames_in_one_write_answered_in_order():
    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame(msg("A")) + frame(msg("B")) + frame(msg("C")))
        assert await read_replies(reader, 3) == [ack(msg("A")), ack(msg("B")), ack(msg("C"))]
        writer.close()

    run(serving(ack_handler, test))


def test_oversize_frame_closes_connection_without_reply_server_keeps_serving(caplog):
    caplog.set_level(logging.WARNING, logger="hl7_bridge.mllp")
    handled: list[bytes] = []

    async def handler(message: bytes) -> bytes:
        handled.append(message)
        return ack(message)

    async def test(server: MllpServer):
        # A good block then an oversize one in the same write: the first is answered, the second is
        # not, and the connection is closed.
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame(msg(1)) + frame(b"MSH|" + b"x" * 5000) + frame(msg(2)))
        assert await read_replies(reader, 1) == [ack(msg(1))]
        assert await is_closed_by_server(reader)
        writer.close()
        # An oversize block whose end never comes: closed as soon as the limit is crossed.
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"\x0b" + b"x" * 5000)
        assert await is_closed_by_server(reader)
        writer.close()
        # Other connections are unaffected.
        assert await send(HOST, server.port, msg(3), timeout=5) == ack(msg(3))

    run(serving(handler, test, max_message_size=4096))
    assert handled == [msg(1), msg(3)]
    assert "exceeds 4096 bytes" in caplog.text


def test_idle_timeout_closes_connection_also_mid_frame():
    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame(msg(1)))
        assert await read_replies(reader, 1) == [msg(1)]
        started = time.monotonic()
        assert await is_closed_by_server(reader, timeout=3)  # idle after a reply
        assert 0.25 < time.monotonic() - started < 2.5
        writer.close()
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(b"\x0bMSH|stalled")  # stalls mid-frame
        assert await is_closed_by_server(reader, timeout=3)
        writer.close()
        while server.connections:  # forgotten as the server closes them (run() bounds the wait)
            await asyncio.sleep(0.01)

    run(serving(echo, test, idle_timeout=0.3))


def test_slow_handler_does_not_count_as_idle():
    async def slow(message: bytes) -> bytes:
        await asyncio.sleep(0.5)
        return message

    async def test(server: MllpServer):
        assert await send(HOST, server.port, msg(1), timeout=5) == msg(1)

    run(serving(slow, test, idle_timeout=0.2))


def test_twenty_concurrent_clients_ten_messages_each_strict_order_per_connection():
    in_flight: dict[int, int] = {}
    seen: dict[int, list[bytes]] = {}
    max_concurrent = 0

    async def handler(message: bytes) -> bytes:
        nonlocal max_concurrent
        conn = current_connection()
        assert conn is not None
        # Strictly in order per connection: never two messages of one connection in the handler.
        assert in_flight.get(conn.id, 0) == 0
        in_flight[conn.id] = 1
        max_concurrent = max(max_concurrent, sum(in_flight.values()))
        seen.setdefault(conn.id, []).append(message)
        await asyncio.sleep(random.uniform(0, 0.01))
        in_flight[conn.id] = 0
        return ack(message)

    async def client(c: int, pipelined: bool, port: int) -> None:
        messages = [msg(f"{c}-{i}") for i in range(10)]
        reader, writer = await asyncio.open_connection(HOST, port)
        if pipelined:  # all ten at once: replies must still come one per message, in order
            writer.write(b"".join(frame(m) for m in messages))
            assert await read_replies(reader, 10) == [ack(m) for m in messages]
        else:
            for m in messages:
                writer.write(frame(m))
                assert await read_replies(reader, 1) == [ack(m)]
        writer.close()
        await writer.wait_closed()

    async def test(server: MllpServer):
        await asyncio.gather(*(client(c, c % 2 == 0, server.port) for c in range(20)))

    run(serving(handler, test))
    assert len(seen) == 20
    for messages in seen.values():
        assert [control_id(m).split(b"-")[1] for m in messages] == [str(i).encode() for i in range(10)]
    assert max_concurrent > 1  # connections really were handled concurrently


def test_handler_exception_sends_on_error_reply_and_connection_stays_usable(caplog):
    caplog.set_level(logging.ERROR, logger="hl7_bridge.mllp")
    errors: list[tuple[bytes, Exception]] = []

    async def handler(message: bytes) -> bytes:
        if b"BAD" in message:
            raise RuntimeError("mapping exploded")
        if b"FRAMING" in message:
            return b"reply with \x0b inside"  # cannot be framed: treated like a handler error
        return ack(message)

    def on_error(message: bytes, exc: Exception) -> bytes:
        errors.append((message, exc))
        return ack(message, b"AE")

    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        for m in (msg("BAD1"), msg(1), msg("FRAMING2"), msg(2)):
            writer.write(frame(m))
        assert await read_replies(reader, 4) == [
            ack(msg("BAD1"), b"AE"),
            ack(msg(1)),
            ack(msg("FRAMING2"), b"AE"),
            ack(msg(2)),
        ]
        writer.close()

    run(serving(handler, test, on_error=on_error))
    assert [m for m, _ in errors] == [msg("BAD1"), msg("FRAMING2")]
    assert isinstance(errors[0][1], RuntimeError)
    assert "mapping exploded" in caplog.text


def test_handler_exception_default_no_reply_connection_kept_and_on_error_failure_survived():
    async def handler(message: bytes) -> bytes | None:
        if b"BAD" in message:
            raise RuntimeError("boom")
        if b"SILENT" in message:
            return None  # the handler may choose not to reply
        return ack(message)

    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame(msg("BAD")) + frame(msg("SILENT")) + frame(msg(1)))
        assert await read_replies(reader, 1) == [ack(msg(1))]  # nothing for BAD or SILENT
        writer.close()

    run(serving(handler, test))

    def broken_on_error(message: bytes, exc: Exception) -> bytes:
        raise ValueError("on_error broken too")

    async def test2(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame(msg("BAD")) + frame(msg(2)))
        assert await read_replies(reader, 1) == [ack(msg(2))]
        writer.close()

    run(serving(handler, test2, on_error=broken_on_error))


def test_peer_reset_and_truncated_frames_do_not_affect_others():
    async def test(server: MllpServer):
        # A sender that dies mid-frame, and one that resets the connection.
        _, w1 = await asyncio.open_connection(HOST, server.port)
        w1.write(b"\x0bMSH|half a mess")
        await w1.drain()
        w1.close()
        _, w2 = await asyncio.open_connection(HOST, server.port)
        w2.transport.abort()
        await asyncio.sleep(0.05)
        assert await send(HOST, server.port, msg(1), timeout=5) == msg(1)

    run(serving(echo, test))


def test_close_waits_for_the_running_handler_then_refuses_connections():
    async def test_body():
        entered = asyncio.Event()

        async def slow(message: bytes) -> bytes:
            entered.set()
            await asyncio.sleep(0.3)
            return ack(message)

        server = MllpServer(slow, HOST, 0)
        await server.start()
        port = server.port
        _, idle_writer = await asyncio.open_connection(HOST, port)  # an idle connection
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(frame(msg(1)))
        await entered.wait()
        await server.close()
        # The in-flight message was still answered before the connection closed.
        assert await read_replies(reader, 1) == [ack(msg(1))]
        assert await is_closed_by_server(reader)
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        writer.close()
        idle_writer.close()

    run(test_body())


def test_send_client_errors():
    async def never_replies(message: bytes) -> None:
        return None

    async def test(server: MllpServer):
        with pytest.raises(TimeoutError):
            await send(HOST, server.port, msg(1), timeout=0.3)

    run(serving(never_replies, test))
    # A payload with 0x0B cannot be framed: refused before touching the network (port 1 is never dialled).
    with pytest.raises(ValueError):
        run(send(HOST, 1, b"MSH|\x0b", timeout=1))


def test_send_client_gets_closed_error_on_oversize():
    async def test(server: MllpServer):
        with pytest.raises(MllpConnectionClosedError):
            await send(HOST, server.port, b"x" * 200, timeout=3)

    run(serving(echo, test, max_message_size=100))


# --- TLS ---------------------------------------------------------------------------------


def make_cert(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for CN=name and SAN IP 127.0.0.1, by the openssl CLI."""
    key, cert = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")


@needs_openssl
def test_tls_server_certificate(tmp_path):
    cert, key = make_cert(tmp_path, "overread-test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    seen: list[Any] = []

    async def handler(message: bytes) -> bytes:
        seen.append(current_connection())
        return ack(message)

    async def test(server: MllpServer):
        assert await send(HOST, server.port, msg(1), timeout=5, ssl=client_ctx) == ack(msg(1))
        # Plain MLLP to a TLS port gets no reply; the listener survives it.
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame(msg(2)))
        assert await is_closed_by_server(reader)
        writer.close()
        assert await send(HOST, server.port, msg(3), timeout=5, ssl=client_ctx) == ack(msg(3))

    run(serving(handler, test, ssl=server_ctx))
    assert seen[0].tls
    assert seen[0].peer_certificate in (None, {})  # no client certificate asked for


@needs_openssl
def test_tls_client_certificate_required(tmp_path):
    server_cert, server_key = make_cert(tmp_path, "overread-server")
    client_cert, client_key = make_cert(tmp_path, "ris-sender")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_cert))
    server_ctx.load_cert_chain(server_cert, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    with_cert = ssl.create_default_context(cafile=str(server_cert))
    with_cert.load_cert_chain(client_cert, client_key)
    without_cert = ssl.create_default_context(cafile=str(server_cert))
    subjects: list[Any] = []

    async def handler(message: bytes) -> bytes:
        conn = current_connection()
        assert conn is not None and conn.peer_certificate
        subjects.append(dict(x[0] for x in conn.peer_certificate["subject"]))
        return ack(message)

    async def test(server: MllpServer):
        with pytest.raises(OSError):  # handshake refused (TLS 1.3 reports it on the first read)
            await send(HOST, server.port, msg(1), timeout=5, ssl=without_cert)
        assert await send(HOST, server.port, msg(2), timeout=5, ssl=with_cert) == ack(msg(2))

    run(serving(handler, test, ssl=server_ctx))
    assert subjects == [{"commonName": "ris-sender"}]


# --- a real MLLP client from another library (python-hl7) ---------------------------------


def test_python_hl7_asyncio_client_sends_every_fixture():
    hl7_mllp = pytest.importorskip("hl7.mllp")
    messages = fixture_messages()
    assert len(messages) >= 10

    async def test(server: MllpServer):
        reader, writer = await hl7_mllp.open_hl7_connection(HOST, server.port, limit=1024 * 1024)
        for data in messages.values():
            writer.writeblock(data)
            await writer.drain()
            assert await reader.readblock() == data  # byte-exact echo, non-ASCII included
        writer.close()
        await writer.wait_closed()

    run(serving(echo, test))


def test_python_hl7_asyncio_client_reads_ack():
    hl7 = pytest.importorskip("hl7")
    hl7_mllp = pytest.importorskip("hl7.mllp")
    orm = fixture_messages()["OMI_O23-ImagingOrder.hl7"]

    async def test(server: MllpServer):
        reader, writer = await hl7_mllp.open_hl7_connection(HOST, server.port)
        writer.writeblock(orm)
        ack_message = await reader.readmessage()
        writer.close()
        await writer.wait_closed()
        return ack_message

    ack_message = run(serving(ack_handler, test))
    assert isinstance(ack_message, hl7.Message)
    assert str(ack_message.segment("MSA")[1]) == "AA"
    assert str(ack_message.segment("MSA")[2]) == control_id(orm).decode()


@pytest.mark.slow
def test_mllp_send_command_line_tool(tmp_path):
    pytest.importorskip("hl7")
    mllp_send = Path(sys.executable).parent / "mllp_send"
    if not mllp_send.exists():
        pytest.skip("mllp_send not installed")
    names = ["ORM_O01-GeneralOrder.hl7", "OMI_O23-ImagingOrder.hl7", "ORU_R01-CDA.hl7"]
    batch = tmp_path / "batch.hl7"
    # Several messages in one file with LF line ends: --loose turns them into CR-separated messages.
    batch.write_bytes(b"\n".join(fixture_messages()[n].replace(b"\r", b"\n") for n in names))

    async def test(server: MllpServer):
        proc = await asyncio.create_subprocess_exec(
            str(mllp_send), "--loose", "-f", str(batch), "-p", str(server.port), HOST,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0, err
        return out

    out = run(serving(ack_handler, test))
    for n in names:
        assert b"MSA|AA|" + control_id(fixture_messages()[n]) in out


# --- limits (issue 15: no input freezes the door) ----------------------------------------


def test_an_oversize_block_is_answered_by_on_oversize_and_the_connection_goes_on(caplog):
    caplog.set_level(logging.WARNING, logger="hl7_bridge.mllp")
    heads: list[bytes] = []

    def refuse(head: bytes, limit: int) -> bytes:
        heads.append(head)
        return ack(head.split(b"\r", 1)[0] + b"\r", b"AE")

    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        big = msg(1) + b"NTE|" + b"x" * 200_000 + b"\r"  # in many chunks: its tail is dropped quietly
        writer.write(frame(big) + frame(msg(2)))
        assert await read_replies(reader, 2) == [ack(msg(1), b"AE"), ack(msg(2))]
        writer.close()

    run(serving(ack_handler, test, max_message_size=4096, on_oversize=refuse))
    assert [h[:60] for h in heads] == [msg(1)[:60]] and len(heads[0]) <= OVERSIZE_HEAD
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()] != []
    assert not [r for r in caplog.records if "discarded" in r.getMessage()]  # no log per chunk of the tail


def test_connections_past_the_cap_close_the_one_idle_the_longest():
    async def test(server: MllpServer):
        idle = [await asyncio.open_connection(HOST, server.port) for _ in range(5)]
        while sorted(c.id for c in server.connections) != [3, 4, 5]:
            await asyncio.sleep(0.01)  # the server evicts as it accepts (run() bounds the wait)
        # The first two, idle the longest, were closed; a sender still gets through.
        assert [await is_closed_by_server(r, timeout=5) for r, _ in idle[:2]] == [True, True]
        assert await send(HOST, server.port, msg(1), timeout=5) == ack(msg(1))
        assert len(server.connections) <= 3
        for _, w in idle:
            w.close()

    run(serving(ack_handler, test, max_connections_per_address=3))
    run(serving(ack_handler, test, max_connections=3))


def test_a_busy_connection_is_never_evicted_the_new_one_is_refused():
    release = asyncio.Event()

    async def blocking(message: bytes) -> bytes:
        await release.wait()
        return ack(message)

    async def test(server: MllpServer):
        reader, writer = await asyncio.open_connection(HOST, server.port)
        writer.write(frame(msg(1)))
        while not any(c.busy for c in server._connections):
            await asyncio.sleep(0.01)
        other, _ = await asyncio.open_connection(HOST, server.port)
        assert await is_closed_by_server(other, timeout=5)
        release.set()
        assert await read_replies(reader, 1) == [ack(msg(1))]
        writer.close()

    run(serving(blocking, test, max_connections=1))


def test_accept_errors_are_logged_once_per_interval(caplog):
    from hl7_bridge.mllp import AcceptErrorLog

    now = [0.0]
    others: list[dict[str, Any]] = []
    handler = AcceptErrorLog(60.0, lambda loop, context: others.append(context), clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        context = {"message": AcceptErrorLog.MESSAGE, "exception": OSError(24, "Too many open files")}
        with caplog.at_level(logging.ERROR, logger="hl7_bridge.mllp"):
            for second in range(120):  # asyncio retries once a second per listener
                now[0] = float(second)
                for _ in range(50):
                    handler(loop, context)
            handler(loop, {"message": "something else"})
    finally:
        loop.close()
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 2
    assert "(2999 more since the last report)" in reports[1]
    assert others == [{"message": "something else"}]


def test_the_default_idle_timeout_is_well_under_ten_minutes():
    from hl7_bridge.mllp import DEFAULT_IDLE_TIMEOUT
    from overread.settings import Settings

    assert DEFAULT_IDLE_TIMEOUT == Settings().mllp_idle_timeout == 60.0
