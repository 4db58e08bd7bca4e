"""OMI^O23 (v2.5.1 chapter 4.4.5, imaging order) → transaction Bundle (IG message map ``OMI_O23``).

IPC-1 is the accession number and IPC-3 the Study Instance UID (IG ``IPC[ServiceRequest]``); senders
that omit IPC (the dcm4che sample does) fall back on OBR-18 and ZDS-1 as in ORM^O01.
"""

from mappings import orm_o01
from mappings.order_bundle import build
from mappings.order_group import OrderGroup
from mappings.sender import SenderConfig
from mappings.v2 import Message
from mappings.v2_datatypes import Json


def accession(group: OrderGroup, msg: Message) -> str:
    ipc = group.first("IPC")
    return (ipc.field(1).value if ipc else "") or orm_o01.accession(group, msg)


def study_uid(group: OrderGroup, msg: Message) -> str:
    ipc = group.first("IPC")
    return (ipc.field(3).value if ipc else "") or orm_o01.study_uid(group, msg)


def map_omi_o23(msg: Message, config: SenderConfig) -> Json:
    return build(msg, config, accession, study_uid)
