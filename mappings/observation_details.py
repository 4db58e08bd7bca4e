"""The rest of IG ``OBX[Observation]`` for an order's observations: who and what produced them, and how
the sender groups and types them (OBX-4/10/15/16/18/19/21/23/24/25/29/30).

Performers are referenced as the Practitioner or Organization they are (Observation.performer takes
both): OBX-16 responsible observer, OBX-25 medical director, OBX-23 performing organization with its
OBX-24 address, else OBX-15 producer. The IG's PractitionerRole for OBX-16/25 would only carry a
role code. OBX-18 equipment is a logical Device reference (its identifier): the store keeps no Devices.
"""

from __future__ import annotations

from mappings.bundle_builder import Builder
from mappings.v2 import Segment
from mappings.v2_datatypes import Json, address, codeable_concept, date_time, ei_identifier, organization

EXTENSION = "http://hl7.org/fhir/StructureDefinition/"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/v2-0936"


def add_details(b: Builder, at: str, obx: Segment, obs: Json) -> None:
    """Add OBX-4/10/15/16/18/19/21/23/24/25/29/30 to ``obs`` (and its performers to the Bundle)."""
    instance = ei_identifier(obx.field(21).first, b.config, b.fallback, "FILL")
    if instance:
        obs["identifier"].append(instance)
    kind = codeable_concept(obx.field(29).first, "0936")
    if kind:
        obs["category"] = [kind]
    performers = _performers(b, obx, obs)
    if performers:
        obs["performer"] = performers
    device = ei_identifier(obx.field(18).first, b.config, b.fallback, "")
    if device:
        obs["device"] = {"type": "Device", "identifier": {k: v for k, v in device.items() if k != "type"}}
    extensions = _extensions(b, at, obx)
    if extensions:
        obs["extension"] = extensions


def _performers(b: Builder, obx: Segment, obs: Json) -> list[Json]:
    refs: list[Json] = []
    for field_no, local_id in ((16, "observer"), (25, "director")):
        ref, contained = b.practitioner(obx.field(field_no).first, local_id)
        if contained:
            obs.setdefault("contained", []).append(contained)
        if ref:
            refs.append(ref)
    performing = organization(obx.field(23).first)
    producer = codeable_concept(obx.field(15).first)
    if performing is None and producer:  # OBX-15 CWE: 1 id, 2 name
        performing = {"resourceType": "Organization", **_producer(obx)}
    if performing is None:
        return refs
    org_address = address(obx.field(24).first)
    if org_address:
        performing["address"] = [org_address]
    if "identifier" in performing:
        ident = performing["identifier"][0] = {"system": b.fallback, **performing["identifier"][0]}
        refs.append({"reference": b.add(f"Organization/performer/{ident['value']}", performing, ident)})
    else:
        obs.setdefault("contained", []).append({"id": "performer", **performing})
        refs.append({"reference": "#performer"})
    return refs


def _producer(obx: Segment) -> Json:
    rep = obx.field(15).first
    result: Json = {}
    if rep.component(1):
        result["identifier"] = [{"value": rep.component(1)}]
    if rep.component(2):
        result["name"] = rep.component(2)
    return result


def _extensions(b: Builder, at: str, obx: Segment) -> list[Json]:
    """OBX-4 sub-id (``observation-v2-subid``), OBX-10 nature of abnormal test, OBX-19 analysis time,
    OBX-30 sub-type (``observation-structure-type``), as the IG names them."""
    result: list[Json] = []
    sub_id = obx.field(4).value
    if sub_id:
        inner = [{"url": "original-sub-identifier", "valueString": sub_id}]
        result.append({"url": EXTENSION + "observation-v2-subid", "extension": inner})
    nature = codeable_concept(obx.field(10).first, "0080")
    if nature:
        result.append({"url": EXTENSION + "observation-nature-of-abnormal-test", "valueCodeableConcept": nature})
    analysed = date_time(obx.field(19).component(1), b.config, f"{at}-19")
    if analysed:
        result.append({"url": EXTENSION + "observation-analysis-date-time", "valueDateTime": analysed})
    sub_type = obx.field(30).value
    if sub_type:
        coding = {"system": EXTENSION + "observation-structure-type", "code": sub_type}
        result.append({"url": EXTENSION + "observation-structure-type", "valueCodeableConcept": {"coding": [coding]}})
    return result
