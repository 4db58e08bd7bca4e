"""PID (+ PD1) → Patient (IG segment maps ``PID[Patient]``, ``PD1[Patient]``), and how a later message
updates a stored patient (``merged``).

The first PID-3 repetition is the sender's primary id: the one a patient is matched on. A patient
already stored under it is updated by the message (demographic corrections) under one rule: what the
message carries replaces what is stored, what it does not carry (an empty or null field) stays, and
identifiers are never removed, so ids other senders or an operator added are kept.
"""

from __future__ import annotations

from urllib.parse import quote

from mappings.bundle_builder import Builder
from mappings.errors import REQUIRED_FIELD_MISSING, MappingError
from mappings.v2 import Segment
from mappings.v2_datatypes import (
    Json,
    address,
    codeable_concept,
    cx_identifier,
    date,
    date_time,
    human_name,
    identifier_type,
    organization,
    telecom,
    yes_no,
)
from mappings.vocabulary import GENDER

SSN = "http://hl7.org/fhir/sid/us-ssn"
DRIVERS_LICENSE = "urn:overread:drivers-license"
EXTENSION = "http://hl7.org/fhir/StructureDefinition/"
#: PID/PD1 fields that are one extension with a CodeableConcept (IG PID-17, PD1-6).
CONCEPT_EXTENSIONS = (("PID", 17, "patient-religion"), ("PD1", 6, "patient-disability"))
#: PID fields that are a complex extension with a CodeableConcept in a sub-extension (IG PID-26/28/39).
NESTED_EXTENSIONS = ((26, "patient-citizenship", "code"), (28, "patient-nationality", "code"))


def patient(b: Builder, pid: Segment, pd1: Segment | None) -> str:
    """PID (+ PD1) → Patient; the entry's reference. A conditional create on the first PID-3 id."""
    identifiers = [i for rep in pid.field(3).present() if (i := cx_identifier(rep, b.config, b.fallback))]
    if not identifiers:
        raise MappingError(REQUIRED_FIELD_MISSING, "PID-3", "Patient identifier list is missing")
    resource: Json = {"resourceType": "Patient", "identifier": identifiers + _more_identifiers(b, pid)}
    # PID-5 name, PID-9 alias (IG name[1], name[2]).
    names = [n for field_no in (5, 9) for rep in pid.field(field_no).present() if (n := human_name(rep))]
    if names:
        resource["name"] = names
    sex = pid.field(8).value
    if sex:
        resource["gender"] = GENDER.get(sex, "unknown")
    birth = date(pid.field(7).value, "PID-7")
    if birth:
        resource["birthDate"] = birth
    addresses = [a for rep in pid.field(11).present() if (a := address(rep))]
    county = pid.field(12).value
    if county:  # IG PID-12: the district of the (first) address
        addresses[:1] = [{**(addresses[0] if addresses else {}), "district": county}]
    if addresses:
        resource["address"] = addresses
    _more_demographics(b, pid, resource)
    extensions = _extensions(pid, pd1)
    if extensions:
        resource["extension"] = extensions
    if pd1:
        _primary_care(b, pd1, resource)
    return b.add("Patient", resource, identifiers[0])


def _more_identifiers(b: Builder, pid: Segment) -> list[Json]:
    """IG PID-2/4 (CX), PID-19 SSN and PID-20 driver's license (DLN-1 number, DLN-2 issuing state)."""
    more = [i for n in (2, 4) for rep in pid.field(n).present() if (i := cx_identifier(rep, b.config, b.fallback))]
    ssn = pid.field(19).value
    if ssn:
        more.append({"type": identifier_type("SS"), "system": SSN, "value": ssn})
    license_number, state = pid.field(20).component(1), pid.field(20).component(2)
    if license_number:
        system = f"{DRIVERS_LICENSE}:{quote(state, safe='')}" if state else DRIVERS_LICENSE
        more.append({"type": identifier_type("DL"), "system": system, "value": license_number})
    return more


def _more_demographics(b: Builder, pid: Segment, resource: Json) -> None:
    """IG PID-13/14/40 telecom, PID-15 language, PID-16 marital status, PID-24/25 multiple birth,
    PID-29/30 deceased."""
    points = [
        p for n, use in ((13, "home"), (14, "work"), (40, "")) for r in pid.field(n).present() if (p := telecom(r, use))
    ]
    if points:
        resource["telecom"] = points
    language = codeable_concept(pid.field(15).first)
    if language:
        resource["communication"] = [{"language": language}]
    marital = codeable_concept(pid.field(16).first)
    if marital:
        resource["maritalStatus"] = marital
    order, multiple = pid.field(25).value, yes_no(pid.field(24).value)
    if order.isdigit():
        resource["multipleBirthInteger"] = int(order)
    elif multiple is not None:
        resource["multipleBirthBoolean"] = multiple
    died, deceased = date_time(pid.field(29).component(1), b.config, "PID-29"), yes_no(pid.field(30).value)
    if died:
        resource["deceasedDateTime"] = died
    elif deceased is not None:
        resource["deceasedBoolean"] = deceased


def _extensions(pid: Segment, pd1: Segment | None) -> list[Json]:
    """The IG's Patient extensions: PID-6 mother's maiden name, PID-17 religion, PID-23 birth place,
    PID-26/28/39 citizenship, nationality and tribal citizenship, PID-35/36 species and breed,
    PD1-6 disability, PD1-14 place of worship (congregation)."""
    result: list[Json] = []
    maiden = human_name(pid.field(6).first)
    if maiden:
        result.append({"url": EXTENSION + "patient-mothersMaidenName", "valueString": maiden.get("family", "")})
    segments = {"PID": pid, "PD1": pd1}
    for name, field_no, url in CONCEPT_EXTENSIONS:
        seg = segments[name]
        concept = codeable_concept(seg.field(field_no).first) if seg else None
        if concept:
            result.append({"url": EXTENSION + url, "valueCodeableConcept": concept})
    birth_place = pid.field(23).value
    if birth_place:
        result.append({"url": EXTENSION + "patient-birthPlace", "valueAddress": {"text": birth_place}})
    for field_no, url, part in (*NESTED_EXTENSIONS, (39, "patient-citizenship", "code")):
        concept = codeable_concept(pid.field(field_no).first)
        if concept:
            result.append({"url": EXTENSION + url, "extension": [{"url": part, "valueCodeableConcept": concept}]})
    animal = [
        {"url": part, "valueCodeableConcept": concept}
        for field_no, part in ((35, "species"), (36, "breed"))
        if (concept := codeable_concept(pid.field(field_no).first))
    ]
    if animal:
        result.append({"url": EXTENSION + "patient-animal", "extension": animal})
    congregation = pd1.field(14).component(1) if pd1 else ""
    if congregation:
        result.append({"url": EXTENSION + "patient-congregation", "valueString": congregation})
    return result


def _primary_care(b: Builder, pd1: Segment, resource: Json) -> None:
    """IG PD1-3 primary facility (XON → Organization) and PD1-4 primary care provider → generalPractitioner."""
    references: list[Json] = []
    contained: list[Json] = []
    facility = organization(pd1.field(3).first)
    if facility and "identifier" in facility:
        ident = facility["identifier"][0] = {"system": b.fallback, **facility["identifier"][0]}
        references.append({"reference": b.add("Organization/primary-facility", facility, ident)})
    elif facility:  # a name alone cannot be matched: kept inside the patient, as an unidentified doctor is
        contained.append({"id": "primary-facility", **facility})
        references.append({"reference": "#primary-facility"})
    doctor, unidentified = b.practitioner(pd1.field(4).first, "primary-care-provider")
    if unidentified:
        contained.append(unidentified)
    if doctor:
        references.append(doctor)
    if contained:
        resource["contained"] = contained
    if references:
        resource["generalPractitioner"] = references


def merged(stored: Json, update: Json) -> Json:
    """``update`` applied to the ``stored`` Patient: its elements replace the stored ones, the stored
    elements it lacks stay, and the stored identifiers stay, before the new ones."""
    result = {**stored, **{k: v for k, v in update.items() if k != "identifier"}}
    known = {(i.get("system"), i.get("value")) for i in stored.get("identifier", [])}
    news = [i for i in update.get("identifier", []) if (i.get("system"), i.get("value")) not in known]
    result["identifier"] = [*stored.get("identifier", []), *news]
    return result
