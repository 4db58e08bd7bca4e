"""Order control codes other than NW: what an ORM^O01/OMI^O23 asks of an existing case.

HL7 v2.5.1 §4.5.1.1 ORC-1 (table 0119 order control codes) and ORC-5 (table 0038 order status).
The case is found by its placer order number (ORC-2, else OBR-2), typed PLAC exactly as the new
order's mapping typed it, so the same identifier finds the same ServiceRequest and Task.
"""

from dataclasses import dataclass

from mappings.bundle_builder import fallback_system
from mappings.errors import REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, MappingError
from mappings.sender import SenderConfig
from mappings.v2 import Message
from mappings.v2_datatypes import Json, ei_identifier

#: Table 0119 codes handled, and the FHIR statuses each sets: (ServiceRequest.status, Task.status).
STATUSES: dict[str, tuple[str | None, str | None]] = {
    "CA": ("revoked", "cancelled"),  # cancel order request
    "DC": ("revoked", "cancelled"),  # discontinue order request
    "HD": ("on-hold", "on-hold"),  # hold order request
    "RL": ("active", "requested"),  # release previous hold
    "SC": (None, None),  # status changed: ORC-5 becomes the case's business status
    "XO": (None, None),  # change order request: the order is mapped again and replaces the old one
}


@dataclass(frozen=True)
class OrderControl:
    code: str
    #: The PLAC Identifier the case is found by.
    placer: Json
    #: ORC-5 (table 0038), e.g. IP (in process), CM (completed); "" when absent.
    order_status: str

    @property
    def statuses(self) -> tuple[str | None, str | None]:
        return STATUSES[self.code]


def order_control(message: Message, config: SenderConfig | None = None) -> OrderControl | None:
    """None for a new order (NW: ``map_message``), else what the message asks of its case."""
    config = config or SenderConfig()
    orc = message.segment("ORC")
    if orc is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "ORC", "The order has no ORC segment")
    code = orc.field(1).value
    if code == "NW":
        return None
    if code not in STATUSES:
        raise MappingError(TABLE_VALUE_NOT_FOUND, "ORC-1", f"Order control {code!r} is not supported")
    obr = message.segment("OBR")
    fallback = fallback_system(message, config)
    placer = ei_identifier(orc.field(2).first, config, fallback, "PLAC")
    if placer is None and obr is not None:
        placer = ei_identifier(obr.field(2).first, config, fallback, "PLAC")
    if placer is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "ORC-2", f"{code} needs the placer order number of the order")
    return OrderControl(code, placer, orc.field(5).value)
