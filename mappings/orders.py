"""Intake entry point: dispatch a parsed message on MSH-9 (never on a file name).

Orders (ORM^O01, OMI^O23) open or change a case; a result (ORU^R01) from the source RIS is the
original report a case is compared with (``mappings.original_report``).
"""

from collections.abc import Callable

from mappings.errors import UNSUPPORTED_EVENT, UNSUPPORTED_MESSAGE_TYPE, MappingError
from mappings.hl7_null import without_nulls
from mappings.omi_o23 import map_omi_o23
from mappings.original_report import map_oru_r01
from mappings.orm_o01 import map_orm_o01
from mappings.sender import SenderConfig
from mappings.v2 import Message
from mappings.v2_datatypes import Json

MAPPERS: dict[str, Callable[[Message, SenderConfig], Json]] = {
    "ORM^O01": map_orm_o01,
    "OMI^O23": map_omi_o23,
    "ORU^R01": map_oru_r01,
}
#: Message types that carry no order control (ORC-1): never a change of a case.
RESULTS = frozenset({"ORU^R01"})


def check_supported(message: Message) -> None:
    """Refuse what Overread does not map, before anything reads the message's body.

    HL7 v2.5.1 §2.9.2 / table 0357: a message type (MSH-9.1) Overread has no mapping for at
    all is error 200 (unsupported message type) at MSH-9; a known type with another trigger
    event (MSH-9.2), such as ORU^R30, is error 201 (unsupported event code) at MSH-9.2.
    Both are answered AR (``hl7_bridge.ack.REJECT_CODES``).
    """
    kind = message.message_type
    if kind in MAPPERS:
        return
    known = sorted(t for t in MAPPERS if t.partition("^")[0] == kind.partition("^")[0])
    if known:
        raise MappingError(
            UNSUPPORTED_EVENT, "MSH-9.2", f"Message type {kind} is not supported: Overread maps {', '.join(known)}"
        )
    raise MappingError(UNSUPPORTED_MESSAGE_TYPE, "MSH-9", f"Message type {kind} is not an order Overread maps")


def map_message(message: Message, config: SenderConfig | None = None) -> Json:
    """Map an ORM^O01, OMI^O23 or ORU^R01 to one FHIR R4 transaction Bundle (else error 200 or 201).

    HL7 nulls (``""``) are no value in every field (``mappings.hl7_null``).
    """
    check_supported(message)
    return MAPPERS[message.message_type](without_nulls(message), config or SenderConfig())
