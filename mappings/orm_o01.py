"""ORM^O01 (v2.5.1 chapter 4.4.1, general order) → transaction Bundle (IG message map ``ORM_O01``).

Radiology ORMs carry the accession number in OBR-18 (placer field 1, IHE SWF convention) and,
from dcm4che-style senders, the Study Instance UID in a ZDS segment.
"""

from mappings.order_bundle import build
from mappings.order_group import OrderGroup, study_uid_from_zds
from mappings.sender import SenderConfig
from mappings.v2 import Message
from mappings.v2_datatypes import Json


def accession(group: OrderGroup, msg: Message) -> str:
    obr = group.first("OBR")
    return obr.field(18).value if obr else ""


def study_uid(group: OrderGroup, msg: Message) -> str:
    return study_uid_from_zds(msg)


def map_orm_o01(msg: Message, config: SenderConfig) -> Json:
    return build(msg, config, accession, study_uid)
