"""The audit log of the MLLP and DICOM doors, on SQLite and PostgreSQL: each HL7 message (python-hl7's
MLLP client) leaves an AuditEvent with its control id, sender, address and outcome, in the message's
own transaction; each DICOM association (pynetdicom) one of it, accepted or rejected, and one of the
instances it stored."""

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7.client
import pytest
from pydicom.uid import CTImageStorage
from sqlalchemy import func, select

from dicom_bridge.image_store import ImageStore
from dicom_bridge.storage_scp import Limits, StorageScp
from dicom_bridge.upper_layer import ASSOCIATE_RJ, ASSOCIATE_RQ, pdu
from fhir_server.audit_log import AuditLog
from fhir_server.db import Database
from fhir_server.executor import for_database
from hl7_bridge.audit import HL7_SENDER
from hl7_bridge.store import InboundMessage
from overread.app import mllp_listener
from overread.config import OverreadConfig
from overread.settings import Settings
from tests.hl7_golden import DCM4CHE, OMI
from tests.test_audit import client_agent, events, subtype
from tests.test_storage_scp import AE_TITLE, associate, dcmtk, sample


@pytest.fixture
def audit(db: Database) -> Iterator[AuditLog]:
    log = AuditLog(for_database(db))
    yield log
    log.close()


def send_all(db: Database, audit: AuditLog, *messages: bytes, **options: Any) -> list[str]:
    """Each message over MLLP to the intake of ``overread serve`` (``options``: its settings); MSA-1 of each answer."""
    settings = Settings(database_url=db.url, mllp_port=0, **options)

    async def run() -> list[str]:
        async with mllp_listener(settings, for_database(db), OverreadConfig(), audit) as server:
            client = hl7.client.MLLPClient("127.0.0.1", server.port)
            try:
                acks = [await asyncio.to_thread(client.send_message, m.decode()) for m in messages]
            finally:
                client.close()
        return [str(hl7.parse(ack.decode())["MSA"][0][1]) for ack in acks]

    return asyncio.run(run())


def test_every_mllp_message_is_audited_in_its_transaction(db, audit):
    adt = (DCM4CHE / "ADT_A40-PatientMerge.hl7").read_bytes()
    assert send_all(db, audit, OMI, adt) == ["AA", "AR"]
    with db.begin(write=False) as conn:
        stored = conn.scalar(select(func.count()).select_from(InboundMessage))
    accepted, refused = events(db)  # written with the messages: nothing queued
    assert stored == 2
    for event, outcome, kind in ((accepted, "0", "OMI^O23"), (refused, "8", "ADT^A40")):
        assert (event["type"]["code"], event["action"], event["outcome"]) == ("110107", "C", outcome)
        (entity,) = event["entity"]
        assert entity["name"] == kind and entity["detail"][0]["type"] == "MSH-10"
        agent = client_agent(event)
        assert agent["who"]["identifier"]["system"] == HL7_SENDER and agent["network"]["address"] == "127.0.0.1"
    assert subtype(accepted) == "O23" and accepted["entity"][0]["detail"][0]["valueString"] == _control_id(OMI)
    assert "ADT^A40" in refused["outcomeDesc"]


def test_a_message_answered_without_the_database_is_audited_through_the_queue(db, audit):
    assert send_all(db, audit, OMI, mllp_max_message_size=256) == ["AE"]
    audit.flush()
    (event,) = events(db)
    assert (event["outcome"], event["entity"][0]["detail"][0]["valueString"]) == ("4", _control_id(OMI))


def _control_id(raw: bytes) -> str:
    return str(hl7.parse(raw.decode())["MSH"][0][10])


def audited_scp(tmp_path: Path, audit: AuditLog, admits: Any = None, **limits: Any) -> StorageScp:
    """A Storage SCP (not yet started: enter it) that records to ``audit``; ``limits``: its :class:`Limits`."""
    store = ImageStore(tmp_path / "store")
    return StorageScp(AE_TITLE, "127.0.0.1", 0, store, limits=Limits(**limits), audit=audit.record, admits=admits)


def test_dicom_associations_and_what_they_stored_are_audited(db, audit, tmp_path):
    with audited_scp(tmp_path, audit) as scp:
        assoc = associate(scp.port, CTImageStorage, ae_title="MODALITY1")
        assert assoc.is_established
        ds = sample("CT_small.dcm")
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
    audit.flush()
    opened, stored = events(db)
    assert (opened["type"]["code"], subtype(opened), opened["outcome"]) == ("110114", "110122", "0")
    assert client_agent(opened)["name"] == "MODALITY1"
    assert client_agent(opened)["network"]["address"] == "127.0.0.1"
    assert (stored["type"]["code"], stored["action"], stored["outcome"]) == ("110104", "C", "0")
    (study,) = stored["entity"]
    assert study["name"] == ds.StudyInstanceUID and study["detail"] == [{"type": "instances", "valueString": "1"}]


def test_a_rejected_association_is_audited(db, audit, tmp_path):
    with audited_scp(tmp_path, audit, max_associations=0) as scp:
        refused = dcmtk("echoscu", "-aet", "STRANGER", "-aec", AE_TITLE, "127.0.0.1", str(scp.port))
        assert "Reason: Local Limit Exceeded" in refused.stderr
    audit.flush()
    (rejected,) = events(db)
    assert (rejected["outcome"], client_agent(rejected)["name"]) == ("4", "STRANGER")
    assert "0 associations at once" in rejected["outcomeDesc"]


def test_an_association_refused_for_its_request_is_audited_with_its_calling_ae(db, audit, tmp_path):
    with audited_scp(tmp_path, audit) as scp, socket.create_connection(("127.0.0.1", scp.port)) as sock:
        body = struct.pack(">HH16s16s32x", 2, 0, AE_TITLE.encode().ljust(16), b"OLDPROTOCOL".ljust(16))
        sock.sendall(pdu(ASSOCIATE_RQ, body))  # protocol version bit 0 unset: not one we speak
        assert sock.recv(6)[0] == ASSOCIATE_RJ
    audit.flush()
    (rejected,) = events(db)
    assert (rejected["outcome"], client_agent(rejected)["name"]) == ("4", "OLDPROTOCOL")


def test_an_association_off_the_allow_list_is_audited(db, audit, tmp_path):
    with audited_scp(tmp_path, audit, admits=lambda ae, host: ae == "MODALITY1") as scp:
        refused = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", AE_TITLE, "127.0.0.1", str(scp.port))
        assert "Calling AE Title Not Recognized" in refused.stderr
    audit.flush()
    (rejected,) = events(db)
    assert (rejected["outcome"], client_agent(rejected)["name"]) == ("4", "INTRUDER")
    assert "allow-list" in rejected["outcomeDesc"]
