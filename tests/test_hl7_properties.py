"""Property-based tests (hypothesis) over MLLP framing and HL7 parsing (issue 15): whatever bytes
arrive, the parser answers a ``Message`` or a ``MappingError``, every ACK is framable, and the
listener of ``overread serve`` answers every block (or closes cleanly) within a bound, never hangs,
and logs no unhandled exception. Bounded by ``max_examples`` so the file runs in seconds.
"""

import asyncio
import logging
from collections.abc import Iterator
from datetime import datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhir_server.db import Database
from fhir_server.executor import for_database
from hl7_bridge.ack import acknowledge
from hl7_bridge.mllp import Deframer, frame, running_in_thread
from mappings.errors import MappingError
from mappings.v2 import header, parse
from overread.app import mllp_listener
from overread.config import OverreadConfig
from overread.settings import Settings
from tests.hl7_golden import omi_order

# Pieces HL7 is made of, and the ones that broke it: escapes of the block characters, charsets, NUL.
PIECES = [
    b"MSH|^~\\&|", b"MSH||", b"|", b"^", b"~", b"\\", b"&", b"\r", b"\n", b"\r\n", b"PID", b"ORC", b"NTE", b"OBX",
    b"NW", b"ORM^O01", b"OMI^O23", b"ORU^R01", b"\\X0B\\", b"\\X1C\\", b"\\XE282AC\\", b"\\.br\\", b"\x1c", b"\x00",
    b"\xff", "\u00e9".encode(), b"8859/5", b"ISO IR87", b"BIG-5", b"UNICODE UTF-16", b"2.5.1", b"P", b"C1", b"x" * 300,
]  # fmt: skip
hl7ish = st.lists(st.sampled_from(PIECES) | st.binary(max_size=8), max_size=40).map(b"".join)
messages = st.one_of(st.binary(max_size=300), hl7ish, hl7ish.map(lambda b: b"MSH|^~\\&|" + b))
NOW = datetime(2026, 1, 1)
PROBE = omi_order(1).replace(b"|MSG0001|", b"|PROBE|")


@settings(max_examples=400, deadline=None)
@given(messages)
def test_parsing_any_bytes_gives_a_message_or_a_mapping_error_and_a_framable_ack(raw):
    try:
        message, error = parse(raw), None
    except MappingError as exc:
        message, error = header(raw), exc
    ack = acknowledge(message, error or MappingError(207, "MSH-10", "x"), control_id="c", now=NOW)
    assert b"\x0b" not in ack and b"\x1c" not in ack
    frame(ack)


@pytest.fixture
def listener(db: Database) -> Iterator[int]:
    """The listener of ``overread serve`` with small limits, so generated input crosses them."""
    settings = Settings(database_url=db.url, mllp_port=0, mllp_max_message_size=2048, mllp_max_segments=50)
    with running_in_thread(mllp_listener(settings, for_database(db), OverreadConfig())) as port:
        yield port


def _exchange(port: int, data: bytes, probe: bytes) -> tuple[list[bytes], bool]:
    """Send ``data`` then the probe block; the replies until the probe's ACK, and whether it came."""

    async def talk() -> tuple[list[bytes], bool]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data + frame(probe))
        deframer, replies = Deframer(), list[bytes]()
        try:
            async with asyncio.timeout(20):  # generous: a hang fails, a slow loaded machine does not
                while not any(b"|MSA|" in b"|" + r.replace(b"\r", b"|") and b"|PROBE" in r for r in replies):
                    received = await reader.read(65536)
                    if not received:
                        return replies, False
                    replies += deframer.feed(received)
            return replies, True
        finally:
            writer.close()

    return asyncio.run(talk())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(messages, st.binary(max_size=64)), max_size=4), st.booleans())
def test_any_bytes_over_mllp_get_answers_or_a_clean_close_never_a_hang(listener, caplog, chunks, as_blocks):
    caplog.clear()
    data = b"".join(b"\x0b" + c + b"\x1c\r" if as_blocks else c for c in chunks)
    with caplog.at_level(logging.ERROR):
        replies, answered = _exchange(listener, data, PROBE)
    for reply in replies:  # every reply is an ACK
        assert reply.startswith(b"MSH") and b"\rMSA|" in reply
    assert answered  # an oversize block is answered too (AE), and the connection goes on
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_the_probe_is_answered_alone(listener):
    replies, answered = _exchange(listener, b"", PROBE)
    assert answered and len(replies) == 1
