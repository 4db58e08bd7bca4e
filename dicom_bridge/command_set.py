"""DIMSE command sets (PS3.7 6.3 and Annex E): group 0000, always Implicit VR Little Endian.

Only what our Storage SCP and C-GET SCU read and write: C-STORE and C-ECHO requests and their
responses (PS3.7 9.3.1, 9.3.5), a C-GET request and its responses (PS3.7 9.3.3). pydicom would
decode and encode them as Datasets, at a cost per message that is the whole point of
:mod:`dicom_bridge.upper_layer`; a command set is a handful of flat elements.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# Command elements (PS3.7 E.1-1), as (group << 16 | element).
GROUP_LENGTH = 0x0000_0000
AFFECTED_SOP_CLASS = 0x0000_0002
COMMAND_FIELD = 0x0000_0100
MESSAGE_ID = 0x0000_0110
MESSAGE_ID_RESPONDED = 0x0000_0120
DATA_SET_TYPE = 0x0000_0800
STATUS = 0x0000_0900
AFFECTED_SOP_INSTANCE = 0x0000_1000
PRIORITY = 0x0000_0700
COMPLETED = 0x0000_1021
FAILED = 0x0000_1022
#: Command Data Set Type "no data set" (PS3.7 E.1-1); any other value means one follows.
NO_DATA_SET = 0x0101
# Command Field values (PS3.7 E.1-1).
C_STORE_RQ, C_GET_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0010, 0x0030, 0x0FFF
RESPONSE = 0x8000
# Statuses (PS3.7 C.4; Annex C of PS3.4 for C-STORE).
SUCCESS = 0x0000
UNRECOGNIZED_OPERATION = 0x0211
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000  # C-STORE (PS3.4 B.2.3): e.g. an instance whose UIDs are not UIDs


@dataclass(frozen=True)
class Command:
    field: int
    message_id: int
    has_data: bool
    sop_class: str = ""
    sop_instance: str = ""
    status: int | None = None  # responses only
    completed: int = 0  # sub-operations, C-GET and C-MOVE responses (PS3.7 9.3.3.2)
    failed: int = 0


def decode(data: bytes | bytearray) -> Command:
    """The command of an encoded command set; ValueError when it is not one."""
    values: dict[int, bytes] = {}
    position = 0
    try:
        while position < len(data):
            group, element, length = struct.unpack_from("<HHI", data, position)
            position += 8
            if group != 0 or position + length > len(data):
                raise ValueError(f"not a DIMSE command set: ({group:04X},{element:04X}) of length {length}")
            values[element] = bytes(data[position : position + length])
            position += length
        return Command(
            field=_us(values[COMMAND_FIELD]),
            message_id=_us(values.get(MESSAGE_ID) or values[MESSAGE_ID_RESPONDED]),
            has_data=_us(values[DATA_SET_TYPE]) != NO_DATA_SET,
            sop_class=_ui(values.get(AFFECTED_SOP_CLASS, b"")),
            sop_instance=_ui(values.get(AFFECTED_SOP_INSTANCE, b"")),
            status=_us(values[STATUS]) if STATUS in values else None,
            completed=_us(values.get(COMPLETED, b"\0\0")),
            failed=_us(values.get(FAILED, b"\0\0")),
        )
    except (struct.error, KeyError, UnicodeDecodeError) as exc:
        raise ValueError(f"not a DIMSE command set: {exc!r}") from exc


def request(field: int, message_id: int, sop_class: str) -> bytes:
    """An encoded request of medium priority with a data set to follow, e.g. a C-GET-RQ (PS3.7 9.3.3.1)."""
    return _group(
        [
            _element(AFFECTED_SOP_CLASS, _uid(sop_class)),
            _element(COMMAND_FIELD, struct.pack("<H", field)),
            _element(MESSAGE_ID, struct.pack("<H", message_id)),
            _element(PRIORITY, struct.pack("<H", 0)),
            _element(DATA_SET_TYPE, struct.pack("<H", 0)),
        ]
    )


def response(request: Command, status: int) -> bytes:
    """The encoded response to ``request`` (PS3.7 9.3.1.2, 9.3.5.2), without a data set."""
    elements = [
        _element(AFFECTED_SOP_CLASS, _uid(request.sop_class)) if request.sop_class else b"",
        _element(COMMAND_FIELD, struct.pack("<H", request.field | RESPONSE)),
        _element(MESSAGE_ID_RESPONDED, struct.pack("<H", request.message_id)),
        _element(DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        _element(STATUS, struct.pack("<H", status)),
        _element(AFFECTED_SOP_INSTANCE, _uid(request.sop_instance)) if request.sop_instance else b"",
    ]
    return _group(elements)


def _group(elements: list[bytes]) -> bytes:
    body = b"".join(elements)
    return _element(GROUP_LENGTH, struct.pack("<I", len(body))) + body


def _element(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _us(value: bytes) -> int:
    return int(struct.unpack("<H", value)[0])


def _ui(value: bytes) -> str:
    return value.decode("ascii").rstrip("\0 ")


def _uid(value: str) -> bytes:
    encoded = value.encode("ascii")
    return encoded + b"\0" if len(encoded) % 2 else encoded
