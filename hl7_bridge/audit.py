"""The AuditEvent of an HL7 v2 message received over MLLP (``fhir_server.balp``'s shape).

DICOM "Import" (PS3.15 A.5.3: data brought into the system), action C; the message's type as
subtype (MSH-9, its trigger event from table 0003); outcome from the ACK (MSA-1): AA 0, AE 4,
AR 8 (the enhanced CA/CE/CR alike). The agent is the sender: MSH-3^MSH-4 and its address. The
entity is the message: its control id (MSH-10) and type.
"""

from datetime import datetime
from typing import Any

from fhir_server import balp
from mappings.errors import MappingError
from mappings.v2 import header, parse

#: Who a sender is: MSH-3^MSH-4 (sending application and facility).
HL7_SENDER = "https://overread.org/fhir/sid/hl7-sender"
EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0003"
OUTCOMES = {"AA": "0", "CA": "0", "AE": "4", "CE": "4", "AR": "8", "CR": "8"}


def message_event(raw: bytes, ack: bytes | None, recorded: datetime, address: str | None) -> dict[str, Any]:
    """The AuditEvent of ``raw`` answered ``ack`` (None: not answered)."""
    msh = header(raw)
    sender = control_id = message_type = None
    if msh is not None:
        sender = "^".join(v for v in (msh.msh.field(3).value, msh.msh.field(4).value) if v) or None
        control_id, message_type = msh.msh.field(10).value or None, msh.message_type
    code, text = _acknowledgement(ack)
    kind = balp.coding(balp.DCM, "110107", "Import")
    trigger = message_type.split("^")[-1] if message_type else ""
    subtype = [balp.coding(EVENT_TYPE, trigger, message_type)] if trigger else []
    entity: dict[str, Any] = {"type": balp.coding(balp.ENTITY_TYPE, "2", "System Object")}
    if control_id:
        entity["what"] = {"identifier": {"system": HL7_SENDER + (f"/{sender}" if sender else ""), "value": control_id}}
        entity["detail"] = [{"type": "MSH-10", "valueString": control_id}]
    entity["name"] = message_type or "unreadable message"
    agent = balp.Agent(sender, address, system=HL7_SENDER)
    status = OUTCOMES.get(code, "8")
    return balp.event(
        kind, subtype, "C", recorded, status, text or (f"MSA-1 {code}" if code else None), agent, [entity]
    )


def _acknowledgement(ack: bytes | None) -> tuple[str, str | None]:
    """MSA-1 of an ACK, and its ERR's text (ERR-8) when it has one."""
    try:
        message = parse(ack or b"")
    except MappingError:
        return "", "no acknowledgement was sent"
    msa, err = message.segment("MSA"), message.segment("ERR")
    return (msa.field(1).value if msa else ""), (err.field(8).value if err else None) or None
