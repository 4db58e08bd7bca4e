"""PV1 and PV2 → Encounter, with its Locations (IG segment maps ``PV1[Encounter]``, ``PV2[Encounter]``).

Choices where the IG is silent or R4 cannot say it:

- A PL (PV1-3/6/11/42, PV2-1) is one Location (``v2_datatypes.location``), a conditional create on a
  key identifier made of the sender's system and the place, so every message naming the same bed
  references the same Location. PV1-40 bed status is that PV1-3 Location's ``operationalStatus``.
- PV1-37 discharged-to location (DLD-1, a code) is a Location named by it.
- PV2-8/9 expected admit/discharge dates use the R5 ``plannedStartDate``/``plannedEndDate`` extensions
  the IG names; PV2-11 length of stay is in days.
"""

from __future__ import annotations

import uuid
from html import escape

from mappings.bundle_builder import Builder
from mappings.v2 import Segment
from mappings.v2_datatypes import Json, codeable_concept, cx_identifier, date_time, identifier_type, location
from mappings.vocabulary import NAMESPACE, PARTICIPATION_TYPE, V3_ACT_CODE

LOCATION_KEY_SYSTEM = "urn:overread:location"
# PatientClass[EncounterClass] concept map.
ENCOUNTER_CLASS = {
    "E": (V3_ACT_CODE, "EMER", "emergency"),
    "I": (V3_ACT_CODE, "IMP", "inpatient encounter"),
    "O": (V3_ACT_CODE, "AMB", "ambulatory"),
    "P": (V3_ACT_CODE, "PRENC", "pre-admission"),
}
# (segment, field, participation type, contained id) of IG PV1-7/8/9/17/52 and PV2-13.
PARTICIPANTS = (
    ("PV1", 7, "ATND", "attender"),
    ("PV1", 8, "REF", "referrer"),
    ("PV1", 9, "CON", "consultant"),
    ("PV1", 17, "ADM", "admitter"),
    ("PV1", 52, "PART", "participation"),
    ("PV2", 13, "REF", "referral-source"),
)
# (segment, field, Encounter.location.status) of the IG's location rows; PV1-3 is planned for a pre-admit.
LOCATIONS = (("PV1", 3, "active"), ("PV1", 6, "completed"), ("PV1", 11, "active"), ("PV1", 42, "reserved"))
# Encounter.hospitalization elements of IG PV1-13/15/16/36/38 and their tables (R4 repeats all but two).
HOSPITALIZATION = (
    (13, "reAdmission", "0092"),
    (15, "specialArrangement", "0009"),
    (16, "specialCourtesy", "0099"),
    (36, "dischargeDisposition", "0112"),
    (38, "dietPreference", "0114"),
)
PLANNED_START = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedStartDate"
PLANNED_END = "http://hl7.org/fhir/5.0/StructureDefinition/extension-Encounter.plannedEndDate"
MODE_OF_ARRIVAL = "http://hl7.org/fhir/StructureDefinition/encounter-modeOfArrival"
BED_STATUS = "http://terminology.hl7.org/CodeSystem/v2-0116"


def encounter(b: Builder, pv1: Segment, pv2: Segment | None, patient_ref: str) -> str:
    """PV1 (+ PV2) → Encounter; the entry's reference."""
    klass = pv1.field(2).value
    system, code, display = ENCOUNTER_CLASS.get(
        klass, ("http://terminology.hl7.org/CodeSystem/v2-0004", klass or "U", "")
    )
    coding: Json = {"system": system, "code": code}
    if display:
        coding["display"] = display
    enc: Json = {"resourceType": "Encounter", "status": "unknown", "class": coding}
    visit = cx_identifier(pv1.field(19).first, b.config, b.fallback)
    if visit:
        visit.setdefault("type", identifier_type("VN"))
    alternate = cx_identifier(pv1.field(50).first, b.config, b.fallback)
    identifiers = [i for i in (visit, alternate) if i]
    if identifiers:
        enc["identifier"] = identifiers
    admission_type = codeable_concept(pv1.field(4).first, "0007")
    if admission_type:
        enc["type"] = [admission_type]
    service = codeable_concept(pv1.field(10).first, "0069")
    if service:
        enc["serviceType"] = service
    enc["subject"] = {"reference": patient_ref}
    segments = {"PV1": pv1, "PV2": pv2}
    for seg_name, field_no, part_code, local_id in PARTICIPANTS:
        seg = segments[seg_name]
        ref, contained = b.practitioner(seg.field(field_no).first, local_id) if seg else (None, None)
        if contained:
            enc.setdefault("contained", []).append(contained)
        if ref:
            part_type = {"coding": [{"system": PARTICIPATION_TYPE, "code": part_code}]}
            enc.setdefault("participant", []).append({"type": [part_type], "individual": ref})
    admitted = date_time(pv1.field(44).component(1), b.config, "PV1-44")
    discharged = date_time(pv1.field(45).component(1), b.config, "PV1-45")
    if admitted or discharged:
        enc["period"] = {k: v for k, v in (("start", admitted), ("end", discharged)) if v}
    if discharged:
        enc["status"] = "finished"  # IG: PV1-45 valued
    hospitalization = _hospitalization(b, pv1)
    if hospitalization:
        enc["hospitalization"] = hospitalization
    places = _locations(b, pv1, pv2, klass)
    if places:
        enc["location"] = places
    if pv2:
        _pv2(b, pv2, enc)
    return b.add("Encounter", enc, visit)


def _hospitalization(b: Builder, pv1: Segment) -> Json:
    """IG PV1-5 preadmit number, PV1-14 admit source, PV1-13/15/16/36/38 codes, PV1-37 destination."""
    result: Json = {}
    preadmit = cx_identifier(pv1.field(5).first, b.config, b.fallback)
    if preadmit:
        result["preAdmissionIdentifier"] = preadmit
    source = codeable_concept(pv1.field(14).first)
    if source:
        result["admitSource"] = source
    for field_no, element, table in HOSPITALIZATION:
        concepts = [c for rep in pv1.field(field_no).present() if (c := codeable_concept(rep, table))]
        if concepts:
            result[element] = concepts[0] if element in ("reAdmission", "dischargeDisposition") else concepts
    destination = pv1.field(37).component(1)
    if destination:
        place: Json = {"resourceType": "Location", "mode": "instance", "name": destination}
        result["destination"] = {"reference": _add_location(b, place)}
    return result


def _locations(b: Builder, pv1: Segment, pv2: Segment | None, klass: str) -> list[Json]:
    """Encounter.location for each PL the IG maps, with the status its row assigns."""
    rows = [(pv1, n, "planned" if n == 3 and klass == "P" else status) for _, n, status in LOCATIONS]
    if pv2:
        rows.append((pv2, 1, "planned"))
    result: list[Json] = []
    for seg, field_no, status in rows:
        place = location(seg.field(field_no).first)
        if place is None:
            continue
        if seg is pv1 and field_no == 3 and pv1.field(40).value:
            place["operationalStatus"] = {"system": BED_STATUS, "code": pv1.field(40).value}
        result.append({"location": {"reference": _add_location(b, place)}, "status": status})
    return result


def _add_location(b: Builder, place: Json) -> str:
    """A conditional create on the place's key (the sender's system, its name and PL-10)."""
    sent = place.get("identifier", [])
    for ident in sent:
        ident["system"] = b.fallback
    basis = "|".join((b.fallback, place["name"], *(i["value"] for i in sent)))
    key = {"system": LOCATION_KEY_SYSTEM, "value": str(uuid.uuid5(NAMESPACE, basis))}
    place = {"resourceType": "Location", "identifier": [key, *sent], **place}
    return b.add(f"Location/{key['value']}", place, key)


def _pv2(b: Builder, pv2: Segment, enc: Json) -> None:
    """IG ``PV2[Encounter]``: PV2-3 admit reason, PV2-8/9 expected dates, PV2-11 length of stay,
    PV2-12 visit description, PV2-25 visit priority, PV2-38 mode of arrival."""
    reason = codeable_concept(pv2.field(3).first)
    if reason:
        enc["reasonCode"] = [reason]
    extensions: list[Json] = []
    for field_no, url in ((8, PLANNED_START), (9, PLANNED_END)):
        when = date_time(pv2.field(field_no).component(1), b.config, f"PV2-{field_no}")
        if when:
            extensions.append({"url": url, "valueDateTime": when})
    arrival = codeable_concept(pv2.field(38).first)
    if arrival and "coding" in arrival:
        extensions.append({"url": MODE_OF_ARRIVAL, "valueCoding": arrival["coding"][0]})
    if extensions:
        enc["extension"] = extensions
    days = pv2.field(11).value
    if days.isdigit():
        enc["length"] = {"value": int(days), "unit": "d", "system": "http://unitsofmeasure.org", "code": "d"}
    description = pv2.field(12).value
    if description:
        enc["text"] = {
            "status": "generated",
            "div": f'<div xmlns="http://www.w3.org/1999/xhtml">{escape(description)}</div>',
        }
    priority = codeable_concept(pv2.field(25).first)
    if priority:
        enc["priority"] = priority
