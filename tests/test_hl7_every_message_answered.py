"""Every HL7 message gets an ACK whose MSA-2 is its MSH-10 (issue 15, "Messages that get no ACK").

Through the listener ``overread serve`` runs (``overread.app.mllp_listener``) and python-hl7's MLLP
client, on SQLite and PostgreSQL: escapes of the MLLP block characters and characters the declared
set cannot encode in mirrored fields, fields longer than their columns (a DataError on PostgreSQL),
a bad segment after a readable MSH, ``MSH||``, UTF-16, and a failure of intake itself.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import hl7.client
import pytest
from sqlalchemy import select

import overread.app
from fhir_server.db import Database
from fhir_server.executor import for_database
from hl7_bridge.intake import last_resort
from hl7_bridge.mllp import running_in_thread
from hl7_bridge.store import InboundMessage
from overread.app import mllp_listener
from overread.config import OverreadConfig
from overread.settings import Settings
from tests.hl7_golden import OMI, omi_order

Send = Callable[[bytes], bytes]


@contextmanager
def listening(db: Database, **settings: Any) -> Iterator[Send]:
    """Send messages, on one connection, to the listener of ``overread serve``; the content of each reply."""
    server = mllp_listener(Settings(database_url=db.url, mllp_port=0, **settings), for_database(db), OverreadConfig())
    with running_in_thread(server) as port:
        client = hl7.client.MLLPClient("127.0.0.1", port)
        client.socket.settimeout(20)  # a message left unanswered fails the test instead of hanging it
        try:
            yield lambda raw: client.send_message(raw).removeprefix(b"\x0b").removesuffix(b"\x1c\r")
        finally:
            client.close()


@pytest.fixture
def send(db: Database) -> Iterator[Send]:
    with listening(db) as send:
        yield send


def with_msh(raw: bytes, n: int, value: bytes) -> bytes:
    """``raw`` with MSH-n set to ``value`` (MSH-1 is the separator: MSH-n is item n - 1)."""
    msh, rest = raw.split(b"\r", 1)
    fields = msh.split(b"|")
    fields += [b""] * (n - len(fields))
    fields[n - 1] = value
    return b"|".join(fields) + b"\r" + rest


def msh(raw: bytes, n: int) -> bytes:
    return raw.split(b"\r", 1)[0].split(b"|")[n - 1]


def answer(ack: bytes) -> dict[str, bytes]:
    """MSA-1, MSA-2, ERR-2 and ERR-3.1 of an ACK, as sent ("" where absent)."""
    segments = {s[:3]: s.split(b"|") for s in ack.split(b"\r") if s}
    msa, err = segments[b"MSA"], segments.get(b"ERR", [b""] * 4)
    return {"MSA-1": msa[1], "MSA-2": msa[2], "ERR-2": err[2], "ERR-3": err[3].split(b"^")[0]}


def rows(db: Database) -> list[InboundMessage]:
    with db.transaction() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.pk)))


def framable(ack: bytes) -> bool:
    return b"\x0b" not in ack and b"\x1c" not in ack


@pytest.mark.parametrize(("n", "value"), [(3, rb"RIS\X0B\A"), (10, rb"C\X1C\1"), (10, rb"C\X0B\\X1C\2")])
def test_block_characters_escaped_in_a_mirrored_field_are_answered_and_resends_too(db, send, n, value):
    message = with_msh(omi_order(1), n, value)
    ack = send(message)
    assert framable(ack)
    assert answer(ack)["MSA-1"] == b"AA"
    assert answer(ack)["MSA-2"] == msh(message, 10)
    assert send(message) == ack  # a resend: the stored ACK, framable too
    assert [r.status for r in rows(db)] == ["processed"]


CHARSETS = [("8859/3", "iso-8859-3"), ("8859/5", "iso-8859-5"), ("ISO IR87", "iso2022_jp"), ("BIG-5", "big5")]


@pytest.mark.parametrize(("charset", "codec"), CHARSETS)
def test_a_character_the_declared_set_cannot_encode_is_escaped_in_the_ack(db, send, charset, codec):
    message = with_msh(with_msh(omi_order(2), 18, charset.encode()), 10, rb"C\XE282AC\1")  # a euro sign
    ack = send(message)
    ack.decode(codec)  # the ACK is in the declared set
    assert answer(ack)["MSA-1"] == b"AA"
    assert answer(ack)["MSA-2"] == rb"C\XE282AC\1"
    assert rows(db)[0].control_id == "C\u20ac1"  # the value itself is stored


LONG = [
    ("MSH-10", lambda m: with_msh(m, 10, b"C" * 200), b"MSH^1^10"),
    ("MSH-10", lambda m: with_msh(m, 10, b"C\x00D"), b"MSH^1^10"),
    ("MSH-3", lambda m: with_msh(m, 3, b"A" * 228), b"MSH^1^3"),
    ("MSH-9", lambda m: with_msh(m, 9, b"OMIOMIOMIOMIOMIO^O23^OMI_O23"), b"MSH^1^9"),
    ("ORC-2", lambda m: m.replace(b"PLAC0003", b"P" * 200), b"ORC^1^2"),
]


@pytest.mark.parametrize(("field", "change", "location"), LONG, ids=["msh10", "msh10-nul", "msh3", "msh9", "orc2"])
def test_a_field_its_column_cannot_hold_is_refused_with_err_102_naming_it(db, send, field, change, location):
    message = change(omi_order(3))
    ack = send(message)
    assert answer(ack) == {"MSA-1": b"AE", "MSA-2": msh(message, 10), "ERR-2": location, "ERR-3": b"102"}
    (row,) = rows(db)
    assert row.raw == message and row.ack == ack
    assert row.error.startswith(f"102 at {field}: {field} ")
    # Outside the key, the message is still keyed: a resend is answered from its row.
    keyed = field not in ("MSH-3", "MSH-10")
    assert (row.sender_key is not None, row.status) == (keyed, "error" if keyed else "rejected")
    if keyed:
        assert send(message) == ack and len(rows(db)) == 1


def test_a_bad_segment_after_a_readable_msh_is_rejected_keyed_and_deduplicated(db, send):
    message = omi_order(4).replace(b"\rPV1|", b"\rHELLO WORLD\rPV1|")
    ack = send(message)
    assert answer(ack) == {"MSA-1": b"AR", "MSA-2": b"MSG0004", "ERR-2": b"", "ERR-3": b"102"}
    assert send(message) == ack  # a resend, answered from the row
    other = send(message.replace(b"HELLO WORLD", b"HELLO AGAIN"))  # same key, other content
    assert answer(other)["MSA-1"] == b"AE" and answer(other)["MSA-2"] == b"MSG0004"
    assert [(r.status, r.control_id, r.sender_key) for r in rows(db)] == [
        ("rejected", "MSG0004", '["MESA_OF","XYZ_RADIOLOGY"]'),
        ("refused", "MSG0004", None),
    ]
    assert "'HELLO WORLD'" in rows(db)[0].error


def test_an_empty_msh_2_is_refused_at_msh_2(db, send):
    ack = send(OMI.replace(b"MSH|^~\\&|", b"MSH||~\\&|", 1))
    assert answer(ack) == {"MSA-1": b"AR", "MSA-2": b"", "ERR-2": b"MSH^1^2", "ERR-3": b"102"}
    assert [r.status for r in rows(db)] == ["rejected"]


def test_utf_16_is_refused_with_a_clear_error_at_msh_18(db, send):
    message = with_msh(omi_order(5), 18, b"UNICODE UTF-16")
    ack = send(message)
    assert answer(ack) == {"MSA-1": b"AR", "MSA-2": b"MSG0005", "ERR-2": b"MSH^1^18", "ERR-3": b"102"}
    assert b"send UNICODE UTF-8" in ack
    assert [r.status for r in rows(db)] == ["rejected"]


def _broken(*args: object, **kwargs: object) -> bytes:
    raise RuntimeError("intake broke")


def test_a_failure_of_intake_is_stored_and_answered_ar_207_and_a_resend_is_processed(db, send, monkeypatch):
    monkeypatch.setattr(overread.app, "receive_in", _broken)
    ack = send(omi_order(6))
    assert answer(ack) == {"MSA-1": b"AR", "MSA-2": b"MSG0006", "ERR-2": b"", "ERR-3": b"207"}
    ((status, key, error),) = [(r.status, r.sender_key, r.error) for r in rows(db)]
    assert (status, key) == ("rejected", None) and "RuntimeError" in error
    monkeypatch.undo()
    assert answer(send(omi_order(6)))["MSA-1"] == b"AA"  # the receiver's failure does not hold the key


def test_when_nothing_can_be_stored_the_last_resort_still_answers(db, send, monkeypatch):
    monkeypatch.setattr(overread.app, "receive_in", _broken)
    monkeypatch.setattr(overread.app, "failed", _broken)
    ack = send(omi_order(7))
    assert answer(ack) == {"MSA-1": b"AR", "MSA-2": b"MSG0007", "ERR-2": b"", "ERR-3": b"207"}
    assert rows(db) == []


def test_the_last_resort_answers_anything():
    assert answer(last_resort(b"not hl7", RuntimeError()))["MSA-1"] == b"AR"
    assert answer(last_resort(with_msh(OMI, 10, rb"X\X1C\Y"), RuntimeError()))["MSA-2"] == rb"X\X1C\Y"


def test_a_message_with_more_segments_than_the_limit_is_refused_before_mapping(db):
    with listening(db, mllp_max_segments=20) as send:
        message = omi_order(8).replace(b"\rPV1|", b"\rNTE|1||x" * 20 + b"\rPV1|")
        assert answer(send(message)) == {"MSA-1": b"AR", "MSA-2": b"MSG0008", "ERR-2": b"MSH", "ERR-3": b"102"}
        assert answer(send(omi_order(9)))["MSA-1"] == b"AA"
    assert [r.status for r in rows(db)] == ["rejected", "processed"]
    assert "at most 20 are accepted" in rows(db)[0].error


def test_an_oversize_message_is_answered_ae_and_the_connection_serves_the_next(db):
    with listening(db, mllp_max_message_size=4096) as send:
        message = omi_order(10).replace(b"\rPV1|", b"\rNTE|1||" + b"x" * 100_000 + b"\rPV1|")
        assert answer(send(message)) == {"MSA-1": b"AE", "MSA-2": b"MSG0010", "ERR-2": b"", "ERR-3": b"102"}
        assert answer(send(omi_order(11)))["MSA-1"] == b"AA"
    assert [r.control_id for r in rows(db)] == ["MSG0011"]
