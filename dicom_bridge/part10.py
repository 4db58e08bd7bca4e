"""What the Storage SCP needs of a received instance, without pydicom on the hot path.

A C-STORE brings an encoded Data Set. Keeping it means writing it as a Part 10 file behind
its File Meta Information (PS3.10 7.1) and knowing which study and series it belongs to.
pydicom does both (``pynetdicom``'s ``Event.encoded_dataset()``, ``read_dataset``) by decoding
elements the store never looks at, on every instance (docs/performance.md).
Here the meta group is packed with :mod:`struct` and the header is walked element by element
up to the Series Instance UID; whatever this walk does not handle (big endian, deflate, an
undefined length before the UIDs, a non-ASCII accession number) answers ``None`` and the
caller asks pydicom. Tests compare both with pydicom's output.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

ACCESSION_NUMBER, STUDY_UID, SERIES_UID = 0x00080050, 0x0020000D, 0x0020000E
#: Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2, Table 7.1-1).
LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
UNDEFINED = 0xFFFFFFFF


@dataclass(frozen=True)
class Header:
    study_uid: str
    series_uid: str
    accession: str


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1), Explicit VR Little Endian.

    The same elements and bytes as pynetdicom's ``Event.encoded_dataset()`` writes.
    """
    elements = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _uid(sop_class)),
            _element(0x0002, 0x0003, b"UI", _uid(sop_instance)),
            _element(0x0002, 0x0010, b"UI", _uid(transfer_syntax)),
            _element(0x0002, 0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _element(0x0002, 0x0013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")),
        )
    )
    group_length = _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + group_length + elements


def header(data: bytes, implicit_vr: bool) -> Header | None:
    """Accession number, Study and Series Instance UID of a little-endian Data Set, or None.

    Elements are in ascending tag order (PS3.5 7.1), so the walk stops past (0020,000E).
    """
    try:
        found = _elements(data, implicit_vr)
    except struct.error:
        return None  # truncated: pydicom says what is wrong with it
    if found is None or STUDY_UID not in found or SERIES_UID not in found:
        return None
    try:  # UIs are ASCII (PS3.5 9.1); an SH may not be
        study, series, accession = (
            found.get(tag, b"").decode("ascii") for tag in (STUDY_UID, SERIES_UID, ACCESSION_NUMBER)
        )
    except UnicodeDecodeError:
        return None  # an accession number in an extended character set: pydicom knows them
    return Header(study.rstrip("\0 "), series.rstrip("\0 "), accession.strip("\0 "))


def _elements(data: bytes, implicit_vr: bool) -> dict[int, bytes] | None:
    found: dict[int, bytes] = {}
    position = 0
    while position + 8 <= len(data):
        group, number = struct.unpack_from("<HH", data, position)
        tag = group << 16 | number
        if tag > SERIES_UID:
            break
        if implicit_vr:
            (length,) = struct.unpack_from("<I", data, position + 4)
            position += 8
        elif data[position + 4 : position + 6] in LONG_VRS:
            (length,) = struct.unpack_from("<I", data, position + 8)
            position += 12
        else:
            (length,) = struct.unpack_from("<H", data, position + 6)
            position += 8
        if length == UNDEFINED:
            return None  # a sequence of undefined length: its items would have to be walked
        if position + length > len(data):
            raise struct.error("an element runs past the end of the data set")
        if tag in (ACCESSION_NUMBER, STUDY_UID, SERIES_UID):
            found[tag] = data[position : position + length]
        position += length
    return found


def _element(group: int, number: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xI", group, number, vr, len(value)) + value
    return struct.pack("<HH2sH", group, number, vr, len(value)) + value


def _uid(value: str) -> bytes:
    return _padded(value.encode("ascii"), b"\0")


def _padded(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value
