"""IN1 → Coverage (IG segment map ``IN1[Coverage]``): the patient's insurance, its payor and subscriber.

The insured (IN1-16, with IN1-17 their relationship to the patient) is the patient when IN1-17 says
self (``SEL``), else a RelatedPerson contained in the Coverage (the store keeps no RelatedPersons);
IN1-10/11 insured's group employer is the policy holder, an Organization (contained without an id).
"""

from __future__ import annotations

from mappings.bundle_builder import Builder
from mappings.errors import REQUIRED_FIELD_MISSING, MappingError
from mappings.v2 import Segment
from mappings.v2_datatypes import Json, address, codeable_concept, cx_identifier, date_time, human_name

SELF = "SEL"  # table 0063: the insured is the patient


def policy_system(fallback: str) -> str:
    """The system of IN1-36 policy numbers: the sender's fallback system with ``:policy``, unless that
    would not be a URI of its kind (``urn:oid:1.2:policy`` is no OID): then ``urn:overread:policy:<system>``."""
    if fallback.startswith(("urn:oid:", "urn:uuid:")):
        return f"urn:overread:policy:{fallback}"
    return f"{fallback}:policy"


def coverage(b: Builder, n: int, in1: Segment, patient_ref: str) -> str:
    """IN1 → Coverage (IG ``IN1[Coverage]``): IN1-3/4 payor, IN1-2 plan, IN1-49 subscriber id.

    Deviation from the IG, on purpose: the IG makes IN1-2 (health plan id) the Coverage identifier,
    but a plan id is shared by every member of the plan, so matching on it would merge patients'
    coverages. The policy number IN1-36 (which the IG leaves unmapped) is the identifier and the
    conditional-create key here; IN1-2 goes to ``class`` (plan).
    """
    payor_id = cx_identifier(in1.field(3).first, b.config, b.fallback)
    payor_name = in1.field(4).component(1)
    if not payor_id and not payor_name:
        raise MappingError(REQUIRED_FIELD_MISSING, f"IN1[{n}]-3", "Insurance company id and name are missing")
    payor: Json = {"resourceType": "Organization"}
    if payor_id:
        payor["identifier"] = [payor_id]
    if payor_name:
        payor["name"] = payor_name
    payor_address = address(in1.field(5).first)
    if payor_address:
        payor["address"] = [payor_address]
    resource: Json = {"resourceType": "Coverage", "status": "active"}
    policy = in1.field(36).value
    policy_id = {"system": policy_system(b.fallback), "value": policy} if policy else None
    if policy_id:
        resource["identifier"] = [policy_id]
    plan = codeable_concept(in1.field(2).first)
    if plan:
        plan_type = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan"}]}
        resource["class"] = [{"type": plan_type, "value": in1.field(2).component(1) or plan.get("text", "")}]
    insurance_type = codeable_concept(in1.field(15).first)
    if insurance_type:
        resource["type"] = insurance_type
    effective = date_time(in1.field(12).component(1), b.config, f"IN1[{n}]-12")
    expires = date_time(in1.field(13).component(1), b.config, f"IN1[{n}]-13")
    if effective or expires:
        resource["period"] = {k: v for k, v in (("start", effective), ("end", expires)) if v}
    subscriber = in1.field(49).component(1)
    if subscriber:
        resource["subscriberId"] = subscriber
    _insured(b, in1, resource, patient_ref)
    resource["beneficiary"] = {"reference": patient_ref}
    relationship = codeable_concept(in1.field(17).first, "0063")
    if relationship:
        resource["relationship"] = relationship
    if payor_id:
        resource["payor"] = [{"reference": b.add(f"Organization/payor/{n}", payor, payor_id)}]
    else:
        resource["contained"] = [*resource.get("contained", []), {"id": "payor", **payor}]
        resource["payor"] = [{"reference": "#payor"}]
    return b.add(f"Coverage/{n}", resource, policy_id)


def _insured(b: Builder, in1: Segment, resource: Json, patient_ref: str) -> None:
    """IN1-16/17 → ``subscriber``; IN1-10/11 → ``policyHolder`` (IG IN1-10, IN1-11, IN1-16)."""
    contained: list[Json] = []
    employer_id = cx_identifier(in1.field(10).first, b.config, b.fallback)
    employer_name = in1.field(11).component(1)
    if employer_id or employer_name:
        employer: Json = {"resourceType": "Organization"}
        if employer_id:
            employer["identifier"] = [employer_id]
        if employer_name:
            employer["name"] = employer_name
        if employer_id:
            resource["policyHolder"] = {
                "reference": b.add(f"Organization/employer/{employer_id['value']}", employer, employer_id)
            }
        else:
            contained.append({"id": "policy-holder", **employer})
            resource["policyHolder"] = {"reference": "#policy-holder"}
    insured = human_name(in1.field(16).first)
    if in1.field(17).component(1) == SELF:
        resource["subscriber"] = {"reference": patient_ref}
    elif insured:
        person: Json = {"id": "subscriber", "resourceType": "RelatedPerson", "patient": {"reference": patient_ref}}
        relationship = codeable_concept(in1.field(17).first, "0063")
        if relationship:
            person["relationship"] = [relationship]
        person["name"] = [insured]
        contained.append(person)
        resource["subscriber"] = {"reference": "#subscriber"}
    if contained:
        resource["contained"] = [*resource.get("contained", []), *contained]
