"""What intake answers on the wire, through python-hl7's MLLP client: unsupported messages, orders
without MSH-4, a control id reused with other content, and resends."""

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import hl7
import hl7.client
import pytest
from sqlalchemy import func, select

from fhir_server.db import Database
from fhir_server.repository import Repository
from fhir_server.schema import ResourceRow
from hl7_bridge.intake import resend_form
from hl7_bridge.store import InboundMessage
from overread.config import OverreadConfig, load
from tests.hl7_golden import DCM4CHE, NO_MSH4, OMI, mllp_listening
from tests.intake import receive

Send = Callable[[bytes], hl7.Message]


def _config(tmp_path: Path, yaml: str) -> OverreadConfig:
    path = tmp_path / "overread.yaml"
    path.write_text(yaml, encoding="utf-8")
    return load(path)


@pytest.fixture
def config() -> OverreadConfig:
    """The OVERREAD_CONFIG the listener runs with; a test overrides it to configure senders."""
    return OverreadConfig()


@pytest.fixture
def send(db: Database, config: OverreadConfig) -> Iterator[Send]:
    """Send one message over MLLP (python-hl7's client) to the intake listening on 127.0.0.1; its ACK."""

    async def handler(message: bytes) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, receive, db, message, config.sender)

    with mllp_listening(handler) as port:
        client = hl7.client.MLLPClient("127.0.0.1", port)
        try:
            yield lambda raw: hl7.parse(client.send_message(raw.decode("utf-8")).decode("utf-8"))
        finally:
            client.close()


def _answer(ack: hl7.Message) -> tuple[str, str, str, str]:
    """MSA-1, ERR-3.1 (table 0357), ERR-2 (location) and ERR-8 (text); "" where absent."""
    msa = ack.segment("MSA")
    try:
        err = ack.segment("ERR")
    except KeyError:
        return str(msa[1]), "", "", ""
    return str(msa[1]), str(err[3][0][0]), str(err[2]), ack.unescape(str(err[8]))


def _rows(db: Database) -> list[InboundMessage]:
    with db.transaction() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.pk)))


def _count(db: Database, rtype: str) -> int:
    with db.begin(write=False) as conn:
        return conn.scalar(select(func.count()).where(ResourceRow.type == rtype, ~ResourceRow.deleted)) or 0


def _resources(db: Database, rtype: str) -> list[dict[str, object]]:
    with db.begin(write=False) as conn:
        return [m.resource for m in Repository(conn).search(rtype, [])]


# -- unsupported messages ---------------------------------------------------------------------


def test_an_adt_is_rejected_as_an_unsupported_message_type(db, send):
    adt = (DCM4CHE / "ADT_A40-PatientMerge.hl7").read_bytes()
    code, error, location, text = _answer(send(adt))
    assert (code, error, location) == ("AR", "200", "MSH^1^9")
    assert "ADT^A40" in text and "ORC" not in text
    (row,) = _rows(db)
    assert (row.status, row.message_type, row.ack_code) == ("error", "ADT^A40", "AR")
    assert row.error is not None and row.error.startswith("200 at MSH-9")
    assert _count(db, "Patient") == 0


@pytest.mark.parametrize(("kind", "new"), [(b"OMI^O23^OMI_O23", b"OMI^O24"), (b"OMI^O23^OMI_O23", b"ORU^R30")])
def test_a_supported_type_with_another_event_is_rejected_as_an_unsupported_event(db, send, kind, new):
    code, error, location, text = _answer(send(OMI.replace(kind, new)))
    assert (code, error, location) == ("AR", "201", "MSH^1^9^1^2")
    assert new.decode() in text
    assert _rows(db)[0].error.startswith("201 at MSH-9.2")  # type: ignore[union-attr]
    assert _count(db, "ServiceRequest") == 0


# -- MSH-4 ------------------------------------------------------------------------------------


def test_an_order_without_msh4_is_accepted_and_its_sender_is_msh3(db, send):
    assert _answer(send(NO_MSH4)) == ("AA", "", "", "")
    (row,) = _rows(db)
    assert (row.status, row.sending_application, row.sending_facility, row.sender_key) == (
        "processed", "SMALLRIS", "", '["SMALLRIS"]',
    )  # fmt: skip
    (patient,) = _resources(db, "Patient")
    # The application is the authority of its ids: two such RIS never share a patient by accident.
    assert patient["identifier"] == [{"system": "urn:overread:assigning-authority:SMALLRIS", "value": "MRN-9"}]
    (provenance,) = _resources(db, "Provenance")
    assert provenance["agent"][0]["who"] == {  # type: ignore[index]
        "type": "Device",
        "identifier": {"system": "urn:overread:sending-application", "value": "SMALLRIS"},
        "display": "SMALLRIS",
    }
    assert _count(db, "Organization") == 0 and _count(db, "Task") == 1


def test_a_known_sender_without_msh4_gets_its_settings(db, tmp_path, send, config):
    config.hl7 = _config(tmp_path, "hl7: {senders: [{sending_application: SMALLRIS, timezone: Europe/Stockholm}]}").hl7
    assert _answer(send(NO_MSH4))[0] == "AA"
    (task,) = _resources(db, "Task")
    assert task["authoredOn"] == "2025-03-06T09:00:00+01:00"  # MSH-7 read in the sender's zone


def test_a_sender_identified_by_msh3_and_msh4_must_send_msh4(db, tmp_path, send, config):
    yaml = "hl7: {senders: [{sending_application: SMALLRIS, identified_by: msh3+msh4}]}"
    config.hl7 = _config(tmp_path, yaml).hl7
    assert _answer(send(NO_MSH4))[:3] == ("AE", "101", "MSH^1^4")
    assert _count(db, "Patient") == 0


def test_control_ids_are_unique_per_sender_identity(db, tmp_path, send, config):
    one, other = OMI, OMI.replace(b"|XYZ_RADIOLOGY|", b"|OTHER_SITE|")
    # By default MSH-3 and MSH-4 identify the sender: another facility may use the same MSH-10.
    assert [_answer(send(m))[0] for m in (one, other)] == ["AA", "AA"]
    assert [r.sender_key for r in _rows(db)] == ['["MESA_OF","XYZ_RADIOLOGY"]', '["MESA_OF","OTHER_SITE"]']
    # A sender identified by MSH-3 alone has one MSH-10 sequence, whatever its MSH-4 says.
    config.hl7 = _config(tmp_path, "hl7: {senders: [{sending_application: MESA_OF, identified_by: msh3}]}").hl7
    third = OMI.replace(b"|1001125|", b"|1001126|")
    assert _answer(send(third))[0] == "AA"
    assert _answer(send(third.replace(b"|XYZ_RADIOLOGY|", b"|OTHER_SITE|")))[:2] == ("AE", "207")
    assert _rows(db)[2].sender_key == '["MESA_OF"]'


# -- resends and conflicts --------------------------------------------------------------------


def test_a_reused_control_id_with_other_content_is_refused_and_stored(db, send):
    first_ack = send(OMI)
    (first,) = _rows(db)
    other = OMI.replace(b"PlacerOrderNumberImagingServiceRequest", b"ANOTHER-ORDER").replace(b"PID_1^", b"PID_2^")
    code, error, location, text = _answer(send(other))
    assert (code, error, location) == ("AE", "207", "MSH^1^10")
    assert f"MSH-10 1001125 was already used by message #{first.pk} received at " in text
    assert text.endswith("with other content")
    assert str(first_ack.segment("MSA")[1]) == "AA"

    before, refused = _rows(db)
    assert (before.status, before.raw, before.ack, before.bundle) == (first.status, first.raw, first.ack, first.bundle)
    assert (refused.status, refused.conflict_of, refused.raw, refused.sender_key) == ("refused", first.pk, other, None)
    assert (refused.control_id, refused.ack_code, refused.placer_number) == ("1001125", "AE", "ANOTHER-ORDER")
    # Only the first message's resources exist, as it wrote them.
    (order,) = _resources(db, "ServiceRequest")
    assert order["meta"]["versionId"] == "1"  # type: ignore[index]
    assert "ANOTHER-ORDER" not in str(order) and _count(db, "Patient") == 1


def test_an_exact_resend_gets_the_original_ack(db, send):
    first = send(OMI)
    # Resent by an engine that ends segments in CRLF and stamps MSH-7 anew: still the same message.
    resent = OMI.replace(b"|20220324193155|", b"|20220324200000|").replace(b"\r", b"\r\n")
    assert str(send(OMI)) == str(first)
    assert str(send(resent)) == str(first)
    assert len(_rows(db)) == 1 and _count(db, "ServiceRequest") == 1


def test_resend_form_ignores_only_what_a_resend_may_change():
    msh = b"MSH|^~\\&|RIS|H|OVR|OVR|20250101120000||ORM^O01|X1|P|2.5.1"
    base = resend_form(msh + b"\rPID|||1\r")
    assert resend_form(b"\xef\xbb\xbf" + msh.replace(b"20250101120000", b"20250102") + b"\r\n\r\nPID|||1||  \n") == base
    assert resend_form(msh + b"\rPID|||2\r") != base  # a field
    assert resend_form(msh + b"\rPID|||1\\T\\\r") != base  # an escape
    assert resend_form(msh.replace(b"2.5.1", b"2.3") + b"\rPID|||1\r") != base  # another MSH field
    assert resend_form(msh + b"\rPID|||1\rNTE|1\r") != base  # a segment
