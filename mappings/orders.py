"""Intake entry point: dispatch a parsed message on MSH-9 (never on a file name).

Orders (ORM^O01, OMI^O23) open or change a case; a result (ORU^R01) from the source RIS is the
original report a case is compared with (``mappings.original_report``).
"""

from collections.abc import Callable

from mappings.errors import UNSUPPORTED_MESSAGE_TYPE, MappingError
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


def map_order(message: Message, config: SenderConfig | None = None) -> Json:
    """Map an ORM^O01, OMI^O23 or ORU^R01 to one FHIR R4 transaction Bundle; anything else is error 200."""
    mapper = MAPPERS.get(message.message_type)
    if mapper is None:
        raise MappingError(
            UNSUPPORTED_MESSAGE_TYPE, "MSH-9", f"Message type {message.message_type} is not an order Overread maps"
        )
    return mapper(message, config or SenderConfig())
