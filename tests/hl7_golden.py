"""HL7 test material: the golden-file cases of intake (which .hl7 files, where their expected .json lives)
and the dcm4che OMI^O23 order turned into as many distinct orders and order controls as a test needs."""

import json
from pathlib import Path
from typing import Any

from fhir_server.db import Database
from hl7_bridge.mllp import serving_in_thread
from mappings.errors import MappingError
from mappings.orders import map_message
from mappings.sender import SenderConfig, sender_settings
from mappings.v2 import Message, parse
from overread.config import load

GOLDEN = Path(__file__).parent / "golden" / "hl7"
# Real-world radiology messages, copied into the repository with their source (tests/fixtures/SOURCES.md).
DCM4CHE = Path(__file__).parent / "fixtures" / "hl7" / "dcm4che"
#: The dcm4che OMI^O23 fixture, segments ending in CR as on the wire.
OMI = (DCM4CHE / "OMI_O23-ImagingOrder.hl7").read_bytes().replace(b"\r\n", b"\r").replace(b"\n", b"\r")
#: A small RIS's ORM^O01 (v2.3): no MSH-4, a patient id without assigning authority.
NO_MSH4 = (GOLDEN / "orm_no_msh4.hl7").read_bytes()
# The order messages among the fixtures (OMG^O19 is an order too, one Overread refuses).
DCM4CHE_ORDERS = ["OMI_O23-ImagingOrder", "ORM_O01-GeneralOrder", "OMG_O19-GeneralClinicalOrder-Eyecare"]
# The results (ORU^R01: an original report as the source RIS sends it). The PDF one breaks its OBX-5
# with a bare CR after 4,096 bytes; the parser joins the piece back (mappings/v2.py ``_unwrap``).
DCM4CHE_REPORTS = ["ORU_R01-CDA", "ORU_R01-PDF", "ORU_R01-SR"]


def cases() -> list[tuple[Path, Path]]:
    """(message, expected) pairs: the dcm4che orders and reports, then our own edge cases."""
    names = DCM4CHE_ORDERS + DCM4CHE_REPORTS
    dcm4che = [(DCM4CHE / f"{name}.hl7", GOLDEN / f"dcm4che-{name}.json") for name in names]
    own = [(path, path.with_suffix(".json")) for path in sorted(GOLDEN.glob("*.hl7"))]
    return dcm4che + own


def sender_config(message: Path, parsed: Message) -> SenderConfig | None:
    """A case's sender settings: ``<case>.config.yaml`` beside the ``.hl7``, an OVERREAD_CONFIG file, if any."""
    config = message.with_suffix(".config.yaml")
    if not config.exists():
        return None
    return sender_settings(parsed, load(config).sender)


def outcome(message: Path) -> dict[str, Any]:
    """The Bundle a message maps to (with its sender's settings), or ``{"error": ...}`` for its MappingError."""
    try:
        parsed = parse(message.read_bytes())
        return map_message(parsed, sender_config(message, parsed))
    except MappingError as exc:
        return {"error": {"code": exc.code, "location": exc.location, "text": exc.text}}


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


mllp_listening = serving_in_thread  # the tests' name for it


def omi_order(n: int) -> bytes:
    """The OMI fixture as the n-th distinct order: its own MSH-10, patient and placer number."""
    return (
        OMI.replace(b"|1001125|", f"|MSG{n:04d}|".encode())
        .replace(b"PID_1^^^ADT1", f"PID_{n}^^^ADT1".encode())
        .replace(b"PlacerOrderNumberImagingServiceRequest", f"PLAC{n:04d}".encode())
    )


def omi_control(code: str, n: int, order_status: str = "") -> bytes:
    """The fixture order as an order control message: its own MSH-10, ORC-1 and ORC-5."""
    return (
        OMI.replace(b"|1001125|", f"|CTL{n:04d}|".encode())
        .replace(b"ORC|NW|", f"ORC|{code}|".encode())
        .replace(
            b"FillerOrderNumberImagingServiceRequest||SC|",
            f"FillerOrderNumberImagingServiceRequest||{order_status}|".encode(),
        )
    )


def case_status(db: Database, rtype: str) -> tuple[str, str]:
    from fhir_server.search import execute
    from fhir_server.search import parse as parse_search

    with db.begin(write=False) as conn:
        (match,) = execute(conn, parse_search(rtype, [])).matches
    resource = match.resource
    business = resource.get("businessStatus", {}).get("coding", [{}])[0].get("code", "")
    return resource["status"], business
