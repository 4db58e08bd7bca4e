"""What an order carries besides the request itself, for the second reader: its diagnoses, the patient's
allergies, and the order's observations (weight, height, pregnancy, clinical information).

IG segment maps ``DG1[Condition]``, ``AL1[AllergyIntolerance]``, ``OBX[Observation]`` and ``NTE[Observation]``
with their vocabulary maps (``AllergenType[AllergyIntoleranceCategory]``, ``AllergySeverity[...]``,
``ObservationResultStatusCodesInterpretation``), placed as the IG message maps ``ORM_O01`` / ``OMI_O23``
place them: DG1 → ``ServiceRequest.reasonReference`` (and ``Encounter.diagnosis``), order OBX →
``ServiceRequest.supportingInfo``. Choices where the IG is silent or R4 cannot say it:

- Each resource gets a key identifier (uuid5 of what makes it the same fact) and is a conditional
  update on it, so a resent or changed (XO) order updates the same resource rather than adding one.
- OBR-13 (relevant clinical information) goes to ``supportingInfo`` as an Observation (LOINC 55752-0,
  clinical information): the IG's R5 ``CodeableReference`` extension has no R4 form.
- An ST OBX whose value is a number and which has units (OBX-6) is a ``valueQuantity``, so that
  "65" with "kg" keeps its unit (the IG would make it a ``valueString`` and drop OBX-6).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

from mappings.bundle_builder import Builder, annotation
from mappings.errors import DATA_TYPE_ERROR, MappingError
from mappings.observation_details import add_details
from mappings.order_group import OrderGroup
from mappings.v2 import Segment
from mappings.v2_datatypes import Json, codeable_concept, date_time, ei_identifier, free_text, quantity
from mappings.vocabulary import NAMESPACE, REPORT_TYPES

CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
KEY_SYSTEM = "urn:overread:order-detail"
CONDITION_DUE_TO = "http://hl7.org/fhir/StructureDefinition/condition-dueTo"
# IG AllergenType[AllergyIntoleranceCategory]; MA and MC have no FHIR category.
ALLERGY_CATEGORY = {
    "DA": "medication",
    "FA": "food",
    "EA": "environment",
    "AA": "biologic",
    "PA": "environment",
    "LA": "environment",
}
# IG AllergySeverity[AllergyIntolerance.criticality] and [AllergyIntolerance.reaction.severity].
ALLERGY_CRITICALITY = {"SV": "high", "MI": "low"}
REACTION_SEVERITY = {"SV": "severe", "MO": "moderate", "MI": "mild"}
# IG ObservationResultStatusCodesInterpretation (table 0085 → observation-status); X by R4's own name.
OBSERVATION_STATUS = {
    "A": "amended",
    "C": "corrected",
    "D": "entered-in-error",
    "F": "final",
    "P": "preliminary",
    "W": "entered-in-error",
    "X": "cancelled",
}
CLINICAL_INFORMATION = {
    "coding": [{"system": "http://loinc.org", "code": "55752-0", "display": "Clinical information"}]
}


def key(*parts: str) -> Json:
    """The identifier that makes a detail the same resource across resends and changes of its order."""
    return {"system": KEY_SYSTEM, "value": str(uuid.uuid5(NAMESPACE, "|".join(parts)))}


def conditions(
    b: Builder, dg1s: Iterable[Segment], patient: Json, patient_ref: str, encounter_ref: str | None
) -> list[str]:
    """DG1 → Condition (IG ``DG1[Condition]``), category encounter-diagnosis; the entries' references."""
    refs: list[str] = []
    for dg1 in dg1s:
        code = codeable_concept(dg1.field(3).first)
        text = dg1.field(4).value
        if text:
            code = {**(code or {}), "text": text}
        if code is None:
            continue  # a DG1 without code or description says nothing a reader can use
        condition: Json = {"resourceType": "Condition"}
        ident = dg1.field(20).value
        condition["identifier"] = [key("DG1", _id(patient), _concept_key(code), dg1.field(5).value)]
        if ident:
            condition["identifier"].append({"system": b.fallback, "value": ident})
        if dg1.field(21).value == "D":
            condition["verificationStatus"] = {
                "coding": [{"system": CONDITION_VERIFICATION, "code": "entered-in-error"}]
            }
        condition["category"] = [{"coding": [{"system": CONDITION_CATEGORY, "code": "encounter-diagnosis"}]}]
        condition["code"] = code
        condition["subject"] = {"reference": patient_ref}
        if encounter_ref:
            condition["encounter"] = {"reference": encounter_ref}
        onset = date_time(dg1.field(5).component(1), b.config, "DG1-5")
        if onset:
            condition["onsetDateTime"] = onset
        recorded = date_time(dg1.field(19).component(1), b.config, "DG1-19")
        if recorded:
            condition["recordedDate"] = recorded
        parent = ei_identifier(dg1.field(22).first, b.config, b.fallback, "FILL")
        if parent:  # IG DG1-22: the diagnosis this one is due to, by its DG1-20 identifier
            due_to = {"type": "Condition", "identifier": {k: v for k, v in parent.items() if k != "type"}}
            condition["extension"] = [{"url": CONDITION_DUE_TO, "valueReference": due_to}]
        asserter, contained = b.practitioner(dg1.field(16).first, "asserter")
        if contained:
            condition["contained"] = [contained]
        if asserter:
            condition["asserter"] = asserter
        refs.append(_add(b, condition))
    return refs


def allergies(b: Builder, al1s: Iterable[Segment], patient: Json, patient_ref: str) -> None:
    """AL1 → AllergyIntolerance (IG ``AL1[AllergyIntolerance]``): category, code, criticality, reaction, onset."""
    for al1 in al1s:
        code = codeable_concept(al1.field(3).first)
        if code is None:
            continue  # AL1-3 is required: without an allergen there is no allergy to record
        allergy: Json = {
            "resourceType": "AllergyIntolerance",
            "identifier": [key("AL1", _id(patient), _concept_key(code))],
            "clinicalStatus": {"coding": [{"system": ALLERGY_CLINICAL, "code": "active"}]},
        }
        category = ALLERGY_CATEGORY.get(al1.field(2).value)
        if category:
            allergy["category"] = [category]
        severity = al1.field(4).value
        if severity in ALLERGY_CRITICALITY:
            allergy["criticality"] = ALLERGY_CRITICALITY[severity]
        allergy["code"] = code
        allergy["patient"] = {"reference": patient_ref}
        onset = date_time(al1.field(6).component(1), b.config, "AL1-6")
        if onset:
            allergy["onsetDateTime"] = onset
        reactions = [{"text": r.value} for r in al1.field(5).present() if r.value]
        if reactions:
            reaction: Json = {"manifestation": reactions}
            if severity in REACTION_SEVERITY:
                reaction["severity"] = REACTION_SEVERITY[severity]
            allergy["reaction"] = [reaction]
        _add(b, allergy)


def observations(
    b: Builder, n: int, group: OrderGroup, placer: Json, patient_ref: str, encounter_ref: str | None
) -> list[str]:
    """OBR-13 and the order's OBX (not report types) → Observations for ``supportingInfo``; NTE after an OBX → note."""
    refs: list[str] = []
    obr = group.first("OBR")
    clinical = free_text(obr.field(13).first, b.msg.encoding) if obr else ""
    if clinical:
        info: Json = {"resourceType": "Observation", "identifier": [key("OBR-13", _id(placer))], "status": "final"}
        info |= {"code": CLINICAL_INFORMATION, "subject": {"reference": patient_ref}, "valueString": clinical}
        refs.append(_add(b, info))
    obx_n = 0
    current: Json | None = None
    for seg in group.members:
        if seg.name == "OBX":
            obx_n += 1
            current = _observation(b, f"OBX[{obx_n}]" if n == 1 else f"ORC[{n}] OBX[{obx_n}]", seg, placer, patient_ref)
            if current is not None:
                if encounter_ref:
                    current["encounter"] = {"reference": encounter_ref}
                refs.append(_add(b, current))
        elif seg.name == "NTE" and current is not None:
            note = annotation(b, seg)
            if note:
                current.setdefault("note", []).append(note)
        elif seg.name != "NTE":
            current = None
    return refs


def _observation(b: Builder, at: str, obx: Segment, placer: Json, patient_ref: str) -> Json | None:
    """One order OBX (IG ``OBX[Observation]``), or None for report lines and empty ones."""
    kind = obx.field(2).value
    if kind in REPORT_TYPES or obx.field(5).is_empty() or obx.field(3).component(1) == "113014":
        return None  # report text and DICOM references (113014 Study UID) are not order details
    code = codeable_concept(obx.field(3).first) or {"text": f"{at}-3 not sent"}
    obs: Json = {"resourceType": "Observation"}
    obs["identifier"] = [key("OBX", _id(placer), _concept_key(code), obx.field(4).value)]
    obs["status"] = OBSERVATION_STATUS.get(obx.field(11).value, "unknown")
    obs["code"] = code
    obs["subject"] = {"reference": patient_ref}
    effective = date_time(obx.field(14).component(1), b.config, f"{at}-14")
    if effective:
        obs["effectiveDateTime"] = effective
    obs |= _value(b, at, obx)
    interpretation = [c for r in obx.field(8).present() if (c := codeable_concept(r))]
    if interpretation:
        obs["interpretation"] = interpretation
    if obx.field(7).value:
        obs["referenceRange"] = [{"text": obx.field(7).value}]
    for element, field_no in (("method", 17), ("bodySite", 20)):
        concept = codeable_concept(obx.field(field_no).first)
        if concept:
            obs[element] = concept
    add_details(b, at, obx, obs)
    return obs


def _value(b: Builder, at: str, obx: Segment) -> Json:
    """OBX-5 by OBX-2, as the IG's OBX-5 rows (NM/ST-with-units quantity, coded, date/time, else text)."""
    kind, rep = obx.field(2).value, obx.field(5).first
    units = obx.field(6).first
    amount = quantity(rep.value, units)
    if kind == "NM" or (kind == "ST" and amount and not units.is_empty()):
        if amount is None:
            raise MappingError(DATA_TYPE_ERROR, f"{at}-5", f"{rep.value!r} is not a number (OBX-2 is NM)")
        return {"valueQuantity": amount}
    if kind in ("CE", "CWE", "CNE", "CF", "IS"):
        concept = codeable_concept(rep)
        return {"valueCodeableConcept": concept} if concept else {}
    if kind in ("DT", "DTM", "TS"):
        return {"valueDateTime": date_time(rep.component(1), b.config, f"{at}-5")}
    text = "\n".join(free_text(r, b.msg.encoding) for r in obx.field(5).present())
    return {"valueString": text}


def _add(b: Builder, resource: Json) -> str:
    """A conditional update on the resource's key: the same fact from a resend or a change is one resource."""
    ident = resource["identifier"][0]
    return b.add(f"{resource['resourceType']}/{ident['value']}", resource, ident, replace=True)


def _id(identifier: Json) -> str:
    return f"{identifier.get('system', '')}|{identifier.get('value', '')}"


def _concept_key(concept: Json) -> str:
    coding = (concept.get("coding") or [{}])[0]
    return f"{coding.get('system', '')}|{coding.get('code', '')}|{'' if coding else concept.get('text', '')}"
