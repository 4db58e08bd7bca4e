"""Order intake end to end: message stored, case created, ACK after commit, resends answered once."""

import asyncio
from collections.abc import Iterator

import hl7
import hl7.mllp
import pytest
from sqlalchemy import func, select

from fhir_server.db import Database
from hl7_bridge.store import InboundMessage
from mappings.v2 import parse
from tests.hl7_golden import GOLDEN, OMI, case_status, mllp_listening, omi_control, omi_order
from tests.intake import receive


def _msa(ack: bytes) -> tuple[str, str]:
    msa = hl7.parse(ack.decode()).segment("MSA")
    return str(msa[1]), str(msa[2])


def _count(db: Database, rtype: str) -> int:
    from fhir_server.schema import ResourceRow

    with db.begin(write=False) as conn:
        return conn.scalar(select(func.count()).where(ResourceRow.type == rtype, ~ResourceRow.deleted)) or 0


def _rows(db: Database) -> list[InboundMessage]:
    with db.transaction() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.pk)))


def test_an_order_becomes_a_case_and_is_acknowledged(db):
    assert b"|1001125|" in OMI  # the fixture's MSH-10, which omi_order() replaces
    ack = receive(db, OMI)
    assert _msa(ack) == ("AA", "1001125")
    assert (_count(db, "Patient"), _count(db, "ServiceRequest"), _count(db, "Task")) == (1, 1, 1)
    (row,) = _rows(db)
    assert (row.status, row.ack_code, row.message_type, row.control_id) == ("processed", "AA", "OMI^O23", "1001125")
    assert row.raw == OMI and row.ack == ack and row.bundle and row.response and row.processing_ms


def test_a_resent_message_gets_the_same_ack_and_changes_nothing(db):
    first = receive(db, OMI)
    again = receive(db, OMI)
    assert again == first
    assert (_count(db, "Patient"), _count(db, "Task"), _count(db, "Provenance")) == (1, 1, 1)
    assert len(_rows(db)) == 1


def test_a_message_that_cannot_be_mapped_is_stored_with_its_error_and_answered_ae(db):
    raw = (GOLDEN / "orm_missing_pid3.hl7").read_bytes()
    ack = receive(db, raw)
    assert _msa(ack) == ("AE", str(parse(raw).msh.field(10).value))
    assert str(hl7.parse(ack.decode()).segment("ERR")[2]) == "PID^1^3"
    assert _count(db, "Patient") == 0 and _count(db, "Task") == 0
    (row,) = _rows(db)
    assert (row.status, row.ack_code) == ("error", "AE") and "101" in (row.error or "")


def test_garbage_is_rejected_and_kept(db):
    ack = receive(db, b"this is not HL7")
    assert _msa(ack) == ("AR", "")
    (row,) = _rows(db)
    assert (row.status, row.raw, row.control_id) == ("rejected", b"this is not HL7", None)


@pytest.fixture
def listener(db: Database) -> Iterator[int]:
    """The intake on a real MLLP listener (127.0.0.1, a free port), as `overread serve` runs it."""

    async def handler(message: bytes) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, receive, db, message)

    with mllp_listening(handler) as port:
        yield port


async def _send_all(port: int, messages: list[bytes]) -> list[str]:
    """One python-hl7 MLLP client connection sending ``messages`` in turn; the MSA-1 of each ACK."""
    reader, writer = await hl7.mllp.open_hl7_connection("127.0.0.1", port, encoding="utf-8")
    try:
        codes = []
        for message in messages:
            writer.writemessage(hl7.parse(message.decode()))
            await writer.drain()
            codes.append(str((await asyncio.wait_for(reader.readmessage(), 30)).segment("MSA")[1]))
        return codes
    finally:
        writer.close()


def test_twenty_senders_over_mllp_each_order_stored_once(db, listener):
    async def main() -> list[list[str]]:
        # 20 senders, 3 orders each, and every sender resends its first order (a lost ACK)
        batches = [[omi_order(10 * s + i) for i in range(3)] for s in range(20)]
        return await asyncio.gather(*(_send_all(listener, [*b, b[0]]) for b in batches))

    results = asyncio.run(main())
    assert results == [["AA", "AA", "AA", "AA"]] * 20
    assert (_count(db, "Patient"), _count(db, "ServiceRequest"), _count(db, "Task")) == (60, 60, 60)
    assert len(_rows(db)) == 60


def test_cancel_revokes_the_order_and_cancels_the_case(db):
    assert b"ORC|NW|" in OMI and b"FillerOrderNumberImagingServiceRequest||SC|" in OMI
    receive(db, OMI)
    assert _msa(receive(db, omi_control("CA", 1))) == ("AA", "CTL0001")
    assert case_status(db, "ServiceRequest")[0] == "revoked"
    assert case_status(db, "Task")[0] == "cancelled"
    assert _count(db, "ServiceRequest") == 1  # changed, not created


def test_hold_release_and_status_change(db):
    receive(db, OMI)
    receive(db, omi_control("HD", 1))
    assert (case_status(db, "ServiceRequest")[0], case_status(db, "Task")[0]) == ("on-hold", "on-hold")
    receive(db, omi_control("RL", 2))
    assert (case_status(db, "ServiceRequest")[0], case_status(db, "Task")[0]) == ("active", "requested")
    assert _msa(receive(db, omi_control("SC", 3, "IP"))) == ("AA", "CTL0003")
    assert case_status(db, "Task") == ("requested", "IP")


def test_cancel_of_an_unknown_order_is_an_application_error(db):
    ack = receive(db, omi_control("CA", 1))
    assert _msa(ack) == ("AE", "CTL0001")
    err = hl7.parse(ack.decode()).segment("ERR")
    assert str(err[2]) == "ORC^1^2" and str(err[3]).startswith("204^Unknown key identifier")
    assert _count(db, "ServiceRequest") == 0


def test_change_order_replaces_the_order_and_keeps_the_case(db):
    receive(db, OMI)
    changed = omi_control("XO", 1).replace(b"10637-7^Microscopic Observation^LN", b"24627-2^CT Chest^LN", 1)
    assert _msa(receive(db, changed)) == ("AA", "CTL0001")
    from fhir_server.search import execute
    from fhir_server.search import parse as parse_search

    with db.begin(write=False) as conn:
        (order,) = execute(conn, parse_search("ServiceRequest", [])).matches
    assert order.version == 2 and order.resource["code"]["coding"][0]["code"] == "24627-2"
    assert (_count(db, "ServiceRequest"), _count(db, "Task")) == (1, 1)
    assert _msa(receive(db, omi_control("XO", 2).replace(b"PlacerOrderNumber", b"Unknown")))[0] == "AE"
