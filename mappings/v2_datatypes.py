"""HL7 v2 data types to FHIR data types, after the V2-to-FHIR IG data type maps.

Each function cites the IG table it follows (``datatypes/HL7 Data Type - FHIR R4_ <type>[<FHIR>]``);
components the IG maps that Overread has no use for yet are left out, never guessed.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from mappings.errors import DATA_TYPE_ERROR, MappingError
from mappings.sender import SenderConfig
from mappings.v2 import Encoding, Repetition

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
Json = dict[str, Any]

# HL7 table 0396 / common coding system names to FHIR system URIs (IG "CodingSystem" map, abridged).
CODING_SYSTEMS = {
    "LN": "http://loinc.org",
    "SCT": "http://snomed.info/sct",
    "SNM": "http://snomed.info/sct",
    "I10": "http://hl7.org/fhir/sid/icd-10",
    "ICD10": "http://hl7.org/fhir/sid/icd-10",
    "I9CM": "http://hl7.org/fhir/sid/icd-9-cm",
    "I10C": "http://hl7.org/fhir/sid/icd-10-cm",
    "CPT": "http://www.ama-assn.org/go/cpt",
    "C4": "http://www.ama-assn.org/go/cpt",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "RADLEX": "http://radlex.org",
    "RID": "http://radlex.org",
    "UCUM": "http://unitsofmeasure.org",
}
_DTM = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\.\d{1,4})?([+-]\d{4})?$")


def coding_system(name: str) -> str:
    """A FHIR system for a v2 coding system name: known ones, HL7 tables, else a local URN."""
    if name.upper() in CODING_SYSTEMS:
        return CODING_SYSTEMS[name.upper()]
    table = re.fullmatch(r"HL7-?(\d{4})", name)
    if table:
        return f"http://terminology.hl7.org/CodeSystem/v2-{table.group(1)}"
    return f"urn:overread:coding-system:{name}"


def codeable_concept(rep: Repetition, table: str = "") -> Json | None:
    """CWE/CE → CodeableConcept (IG ``CWE[CodeableConcept]``): CWE-1..3 and 4..6 as codings, CWE-9 text.

    ``table`` is the HL7 table of the field: the system of a code sent without one (PV1-15 ``B6``).
    """
    codings: list[Json] = []
    for code_i in (1, 4):
        code, display, system = rep.component(code_i), rep.component(code_i + 1), rep.component(code_i + 2)
        if not code:
            continue
        coding: Json = {}
        if system or table:
            coding["system"] = coding_system(system or f"HL7{table}")
        coding["code"] = code
        if display:
            coding["display"] = display
        codings.append(coding)
    text = rep.component(9) or (rep.component(2) if not codings else "")
    if not codings and not text:
        return None
    result: Json = {}
    if codings:
        result["coding"] = codings
    if text:
        result["text"] = text
    return result


def free_text(rep: Repetition, enc: Encoding) -> str:
    """A free-text value (ST/TX/FT: NTE-3, OBX-5) as sent: whole, even with unescaped delimiters.

    Senders often leave a literal ``^`` or ``&`` in free text unescaped ("BP 120^80", "R&L knee"); the
    parser splits it into components, and reading component 1 alone would cut the text short. Joining
    them with the delimiters they were split on gives back what the sender wrote.
    """
    return enc.component.join(enc.subcomponent.join(sub) for sub in rep.components)


def identifier_type(code: str) -> Json:
    """A CodeableConcept for a table 0203 identifier type (PLAC, FILL, ACSN, MR, VN ...)."""
    return {"coding": [{"system": V2_0203, "code": code}]}


def cx_identifier(rep: Repetition, config: SenderConfig, fallback_system: str) -> Json | None:
    """CX → Identifier (IG ``CX[Identifier]``): CX-1 value, CX-4 system, CX-5 type.

    The assigning authority CX-4 (an HD: 4.1 namespace, 4.2 universal id, 4.3 its type) becomes the
    system through ``SenderConfig.system_for``; no authority means the sender's ``fallback_system``.
    """
    value = rep.component(1)
    if not value:
        return None
    system = config.system_for(rep.subcomponent(4, 1), rep.subcomponent(4, 2), rep.subcomponent(4, 3))
    result: Json = {}
    if rep.component(5):
        result["type"] = identifier_type(rep.component(5))
    result["system"] = system or fallback_system
    result["value"] = value
    return result


def ei_identifier(rep: Repetition, config: SenderConfig, fallback_system: str, type_code: str) -> Json | None:
    """EI → Identifier (IG ``EI[Identifier-Extension]``): EI-1 value, EI-2..4 the authority; typed from 0203."""
    value = rep.component(1)
    if not value:
        return None
    system = config.system_for(rep.component(2), rep.component(3), rep.component(4))
    return {"type": identifier_type(type_code), "system": system or fallback_system, "value": value}


def human_name(rep: Repetition, family_at: int = 1) -> Json | None:
    """XPN → HumanName (IG ``XPN[HumanName]``): family, given (+ second given), suffix, prefix.

    ``family_at`` is 2 for XCN, whose name starts after the XCN-1 id (IG ``XCN[Practitioner]``).
    """
    f = family_at
    name: Json = {}
    if rep.component(f):
        name["family"] = rep.component(f)
    given = [g for g in (rep.component(f + 1), rep.component(f + 2)) if g]
    if given:
        name["given"] = given
    if rep.component(f + 3):
        name["suffix"] = [rep.component(f + 3)]
    if rep.component(f + 4):
        name["prefix"] = [rep.component(f + 4)]
    if family_at == 2 and rep.component(7):
        name.setdefault("suffix", []).append(rep.component(7))  # XCN-7 degree (e.g. MD)
    if not name:
        return None
    use = {"L": "official", "D": "usual", "M": "maiden", "N": "nickname", "A": "anonymous"}.get(
        rep.component(f + 6 if family_at == 1 else 10), ""
    )
    return {"use": use, **name} if use else name


def practitioner(rep: Repetition, config: SenderConfig, fallback_system: str) -> Json | None:
    """XCN → Practitioner (IG ``XCN[Practitioner]``): XCN-1 id with XCN-9 authority, XCN-2..7 name."""
    resource: Json = {"resourceType": "Practitioner"}
    if rep.component(1):
        system = config.system_for(rep.subcomponent(9, 1), rep.subcomponent(9, 2), rep.subcomponent(9, 3))
        ident: Json = {"system": system or fallback_system, "value": rep.component(1)}
        if rep.component(13):
            ident = {"type": identifier_type(rep.component(13)), **ident}
        resource["identifier"] = [ident]
    name = human_name(rep, family_at=2)
    if name:
        resource["name"] = [name]
    return resource if len(resource) > 1 else None


def address(rep: Repetition) -> Json | None:
    """XAD → Address (IG ``XAD[Address]``): street lines, city, state, postal code, country, type."""
    result: Json = {}
    lines = [line for line in (rep.subcomponent(1, 1), rep.component(2)) if line]
    if lines:
        result["line"] = lines
    for key, n in (("city", 3), ("state", 4), ("postalCode", 5), ("country", 6)):
        if rep.component(n):
            result[key] = rep.component(n)
    use = {"H": "home", "O": "work", "C": "temp", "BA": "old"}.get(rep.component(7), "")
    if use:
        result["use"] = use
    return result or None


LOCATION_PHYSICAL_TYPE = "http://terminology.hl7.org/CodeSystem/location-physical-type"
# PL components from the most specific place to the least, with their physical type (IG ``PL[Location]``).
PL_LEVELS = ((3, "bd"), (2, "ro"), (1, "wa"), (8, "lvl"), (7, "bu"), (4, "si"))


def location(rep: Repetition) -> Json | None:
    """PL → Location (IG ``PL[Location]``), one resource for the most specific place named.

    The IG makes a Location per level (bed, room, point of care, floor, building, facility) chained
    by ``partOf``; a reader needs the place, so one Location stands for it: its name the whole path
    (facility to bed), its physical type that of its most specific level, PL-9 its description and
    PL-10 its identifier.
    """
    levels = [(rep.subcomponent(n, 1), kind) for n, kind in PL_LEVELS if rep.subcomponent(n, 1)]
    if not levels:
        return None
    resource: Json = {"resourceType": "Location", "mode": "instance"}
    if rep.component(10):
        resource["identifier"] = [{"value": rep.component(10)}]
    resource["name"] = " / ".join(name for name, _ in reversed(levels))
    if rep.component(9):
        resource["description"] = rep.component(9)
    resource["physicalType"] = {"coding": [{"system": LOCATION_PHYSICAL_TYPE, "code": levels[0][1]}]}
    return resource


def organization(rep: Repetition) -> Json | None:
    """XON → Organization (IG ``XON[Organization]``): XON-1 name, XON-10 (else XON-3) identifier value."""
    resource: Json = {"resourceType": "Organization"}
    value = rep.component(10) or rep.component(3)
    if value:
        resource["identifier"] = [{"value": value}]
    if rep.component(1):
        resource["name"] = rep.component(1)
    return resource if len(resource) > 1 else None


# XTN-3 telecommunication equipment type (table 0202) → ContactPoint.system (IG XTN[ContactPoint]).
XTN_SYSTEM = {"PH": "phone", "CP": "phone", "FX": "fax", "BP": "pager", "Internet": "email", "X.400": "email"}
# XTN-2 telecommunication use code (table 0201) → ContactPoint.use.
XTN_USE = {"PRN": "home", "ORN": "home", "VHN": "home", "WPN": "work", "PRS": "mobile", "EMR": "temp"}


def telecom(rep: Repetition, default_use: str) -> Json | None:
    """XTN → ContactPoint (IG ``XTN[ContactPoint]``): e-mail XTN-4, else XTN-12 unformatted, else area
    code XTN-6 and number XTN-7 (+ extension XTN-8), else the old XTN-1; system XTN-3, use XTN-2."""
    kind = rep.component(3)
    local = " ".join(p for p in (rep.component(6), rep.component(7)) if p)
    if rep.component(8):
        local += f" ext. {rep.component(8)}"
    value = (rep.component(4) if kind in ("Internet", "X.400") else "") or rep.component(12) or local or rep.value
    if not value:
        return None
    point: Json = {"system": XTN_SYSTEM.get(kind, "email" if "@" in value else "phone"), "value": value}
    use = "mobile" if kind == "CP" else XTN_USE.get(rep.component(2), default_use if not rep.component(2) else "")
    if use:
        point["use"] = use
    return point


_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def quantity(number: str, units: Repetition) -> Json | None:
    """NM + CWE units → Quantity (IG ``NM[Quantity]``, ``CQ[Quantity]``); UCUM units also as its code.
    None when ``number`` is not a number."""
    number = number.strip()
    if not _NUMBER.match(number):
        return None
    result: Json = {"value": float(number) if "." in number else int(number)}
    unit = units.component(2) or units.component(1)
    if unit:
        result["unit"] = unit
    if units.component(1) and units.component(3).upper() in ("UCUM", "UCUM1"):
        result |= {"system": "http://unitsofmeasure.org", "code": units.component(1)}
    return result


def cq_quantity(rep: Repetition) -> Json | None:
    """CQ → Quantity (IG ``CQ[Quantity]``): CQ-1 the number, CQ-2 its units (a CWE in subcomponents)."""
    units = rep.components[1] if len(rep.components) > 1 else ()
    return quantity(rep.component(1), Repetition(tuple((sub,) for sub in units)))


def yes_no(value: str) -> bool | None:
    """Table 0136 (Y/N) → boolean; anything else is no value."""
    return {"Y": True, "N": False}.get(value.upper())


def _parts(value: str, location: str) -> re.Match[str]:
    """A DTM's parts (v2.5.1 2.A.22), refused (ERR 102 at ``location``) unless it names a real calendar time.

    Checked here, at every precision, so that ``19800230`` is refused where ``198002301200`` is: at
    mapping, with the field's location, rather than later by the store.
    """
    m = _DTM.match(value.strip())
    if not m:
        raise MappingError(DATA_TYPE_ERROR, location, f"{value!r} is not a DTM (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])")
    year, month, day, hour, minute, second = (int(g) if g else None for g in m.groups()[:6])
    try:
        datetime(year or 0, month or 1, day or 1, hour or 0, minute or 0, second or 0)
    except ValueError as exc:
        raise MappingError(DATA_TYPE_ERROR, location, f"{value!r} is not a valid date/time: {exc}") from exc
    offset = m.group(8)
    if offset and (int(offset[1:3]) > 14 or int(offset[3:]) > 59):
        raise MappingError(DATA_TYPE_ERROR, location, f"{value!r} has no valid time-zone offset")
    return m


def date_time(value: str, config: SenderConfig, location: str) -> str | None:
    """DTM/TS → FHIR dateTime (IG ``DTM[dateTime]``), keeping the precision sent.

    FHIR requires an offset once hours are given; times without one are read in the sender's
    ``SenderConfig.timezone``.
    """
    if not value:
        return None
    m = _parts(value, location)
    year, month, day, hour = m.group(1), m.group(2), m.group(3), m.group(4)
    if not month:
        return year
    if not day:
        return f"{year}-{month}"
    if not hour:
        return f"{year}-{month}-{day}"
    return _with_offset(m, config, location)


def instant(value: str, config: SenderConfig, location: str) -> str | None:
    """DTM/TS → FHIR instant (to the second, with an offset); a date alone counts from midnight."""
    if not value:
        return None
    m = _parts(value, location)
    if not m.group(3):
        raise MappingError(DATA_TYPE_ERROR, location, f"{value!r} is not precise enough for an instant")
    return _with_offset(m, config, location)


def date(value: str, location: str) -> str | None:
    """DTM → FHIR date (IG ``DTM[date]``): the date part only, e.g. PID-7 birth date."""
    if not value:
        return None
    m = _parts(value, location)
    return "-".join(p for p in (m.group(1), m.group(2), m.group(3)) if p)


def _with_offset(m: re.Match[str], config: SenderConfig, location: str) -> str:
    year, month, day = int(m.group(1)), int(m.group(2)), int(m.group(3))
    hour, minute, second = int(m.group(4) or 0), int(m.group(5) or 0), int(m.group(6) or 0)
    try:
        naive = datetime(year, month, day, hour, minute, second)
    except ValueError as exc:
        raise MappingError(DATA_TYPE_ERROR, location, f"{m.group(0)!r} is not a valid date/time: {exc}") from exc
    fraction = m.group(7) or ""
    if m.group(8):
        off = m.group(8)
        offset = f"{off[:3]}:{off[3:]}"
    else:
        local = naive.replace(tzinfo=ZoneInfo(config.timezone))
        raw = local.strftime("%z")
        offset = f"{raw[:3]}:{raw[3:]}"
    return naive.strftime("%Y-%m-%dT%H:%M:%S") + fraction + offset
