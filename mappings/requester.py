"""Who placed the order and how to call them back: ORC-12 (else OBR-16) ordering provider, ORC-21..24
ordering facility, ORC-14/OBR-17 callback phone (IG ``ORC[ServiceRequest]``, ``OBR[ServiceRequest]``).

As the IG maps them: the requester is the Practitioner, or, when the order names its ordering
facility (ORC-21/22/23), a PractitionerRole of that Practitioner at that Organization (ORC-22 its
address, ORC-23 its phone); ORC-24 is the Practitioner's address. The callback phone is the R4 core
extension ``servicerequest-order-callback-phone-number`` on the ServiceRequest (OBR-17, else ORC-14).
"""

from __future__ import annotations

import uuid

from mappings.bundle_builder import Builder
from mappings.order_group import OrderGroup
from mappings.v2 import Segment
from mappings.v2_datatypes import Json, address, organization, telecom
from mappings.vocabulary import NAMESPACE

CALLBACK_PHONE = "http://hl7.org/fhir/StructureDefinition/servicerequest-order-callback-phone-number"
ROLE_KEY_SYSTEM = "urn:overread:practitioner-role"


def requester(b: Builder, group: OrderGroup, obr: Segment, sr: Json) -> None:
    """Set ``sr``'s requester (and its contained resources) and callback phone from the order's ORC/OBR."""
    orc = group.orc
    seg, field_no = (orc, 12) if not orc.field(12).is_empty() else (obr, 16)
    doctor, contained = b.practitioner(seg.field(field_no).first, "requester")
    doctor_address = address(orc.field(24).first)
    if doctor_address:
        target = contained or (b.resource(doctor["reference"]) if doctor else None)
        if target is not None:
            target["address"] = [doctor_address]
    role = _role(b, orc, doctor, contained)
    if role:
        sr["requester"] = {"reference": role}
    else:
        if contained:
            sr["contained"] = [contained]
        if doctor:
            sr["requester"] = doctor
    phone = telecom(obr.field(17).first, "work") or telecom(orc.field(14).first, "work")
    if phone:
        sr.setdefault("extension", []).append({"url": CALLBACK_PHONE, "valueContactPoint": phone})


def _role(b: Builder, orc: Segment, doctor: Json | None, contained: Json | None) -> str | None:
    """The ordering provider at the ordering facility (ORC-21/22/23) → PractitionerRole entry, or None."""
    facility = organization(orc.field(21).first) or {"resourceType": "Organization"}
    facility_address = address(orc.field(22).first)
    if facility_address:
        facility["address"] = [facility_address]
    phones = [p for rep in orc.field(23).present() if (p := telecom(rep, "work"))]
    if phones:
        facility["telecom"] = phones
    if len(facility) == 1:
        return None
    role: Json = {"resourceType": "PractitionerRole"}
    inner = [contained] if contained else []
    if "identifier" in facility:
        ident = facility["identifier"][0] = {"system": b.fallback, **facility["identifier"][0]}
        org_ref = b.add(f"Organization/ordering-facility/{ident['value']}", facility, ident)
    else:  # a facility without id cannot be matched: it stays inside the role
        inner.append({"id": "facility", **facility})
        org_ref = "#facility"
    # The same doctor at the same facility is one role, whichever message names them.
    who = contained or (b.resource(doctor["reference"])["identifier"][0] if doctor else {})
    where = facility.get("identifier") or facility.get("name") or facility
    basis = "|".join((b.fallback, str(who), str(where)))
    key = {"system": ROLE_KEY_SYSTEM, "value": str(uuid.uuid5(NAMESPACE, basis))}
    role["identifier"] = [key]
    if inner:
        role["contained"] = inner
    if doctor:
        role["practitioner"] = doctor
    role["organization"] = {"reference": org_ref}
    return b.add(f"PractitionerRole/{key['value']}", role, key)
