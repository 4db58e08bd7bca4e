"""The part of ORM^O01 and OMI^O23 intake the two share: one order message → one transaction Bundle.

Follows the V2-to-FHIR IG message maps ``ORM_O01`` / ``OMI_O23`` (chapter 4.4 / 4.4.5 of v2.5.1) and
the segment maps ``ORC[ServiceRequest]``, ``OBR[ServiceRequest]``, ``TQ1[ServiceRequest]``,
``NTE[ServiceRequest]`` here; the other segments have a module each (``patient``, ``encounter``,
``coverage``, ``requester``, ``imaging_procedure``, ``order_details``, ``original_report``) and the
parts every inbound message shares are in ``bundle_builder``. Every resource that could already exist
is a conditional create (``ifNoneExist`` on an identifier) or update on a key, so that a resent
message changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from mappings import order_details, original_report
from mappings.bundle_builder import Builder, annotation, author, person, provenance
from mappings.concept_map import add_translations
from mappings.coverage import coverage
from mappings.encounter import encounter
from mappings.errors import REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, MappingError
from mappings.imaging_procedure import add_procedure
from mappings.order_group import OrderGroup, order_groups
from mappings.patient import patient
from mappings.requester import requester
from mappings.sender import FieldPath, SenderConfig
from mappings.v2 import Message, Segment
from mappings.v2_datatypes import (
    Json,
    codeable_concept,
    cq_quantity,
    cx_identifier,
    date_time,
    ei_identifier,
    free_text,
    identifier_type,
)
from mappings.vocabulary import ORDER_STATUS, PRIORITY, PROVENANCE_PARTICIPANT, STUDY_UID_SYSTEM

BUSINESS_EVENT = "http://hl7.org/fhir/StructureDefinition/businessEvent"
STATUS_REASON = "http://hl7.org/fhir/StructureDefinition/request-statusReason"

# Per-message-type choices: the accession number and the Study Instance UID of one order.
Picker = Callable[[OrderGroup, Message], str]


def build(msg: Message, config: SenderConfig, accession: Picker, study_uid: Picker) -> Json:
    """Map an order message (already known to be ORM^O01 or OMI^O23) to a transaction Bundle."""
    b = Builder(msg, config)
    accession, study_uid = _override(config.fields.accession, accession), _override(config.fields.study_uid, study_uid)
    sender = author(b)
    pid = msg.segment("PID")
    if pid is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "PID", "The order has no PID segment")
    patient_ref = patient(b, pid, msg.segment("PD1"))
    pv1 = msg.segment("PV1")
    encounter_ref = encounter(b, pv1, msg.segment("PV2"), patient_ref) if pv1 else None
    coverage_refs = [coverage(b, n, in1, patient_ref) for n, in1 in enumerate(msg.segments("IN1"), 1)]
    groups = order_groups(msg)
    if not groups:
        raise MappingError(REQUIRED_FIELD_MISSING, "ORC", "The order has no ORC segment")
    patient_key = b.resource(patient_ref)["identifier"][0]
    order_details.allergies(b, msg.segments("AL1"), patient_key, patient_ref)
    # DG1 before the first ORC (patient/visit level) are reasons of every order of the message.
    visit_dg1 = [s for s in msg.all_segments[: msg.all_segments.index(groups[0].orc)] if s.name == "DG1"]
    visit_reasons = order_details.conditions(b, visit_dg1, patient_key, patient_ref, encounter_ref)
    for n, group in enumerate(groups, 1):
        sr_ref, placer = _service_request(
            b, n, group, patient_ref, encounter_ref, coverage_refs, accession(group, msg), study_uid(group, msg)
        )
        reasons = visit_reasons + order_details.conditions(b, group.all("DG1"), patient_key, patient_ref, encounter_ref)
        supporting = order_details.observations(b, n, group, placer, patient_ref, encounter_ref)
        document = original_report.from_order(b, n, group, sr_ref, patient_ref)  # report / document OBX
        _link_details(b, sr_ref, encounter_ref, reasons, [*supporting, *([document] if document else [])])
        _task(b, n, group, sr_ref, patient_ref, placer)
    provenance(b, sender, [a for group in groups for a in _agents(b, group.orc)])
    return {"resourceType": "Bundle", "type": "transaction", "entry": b.entries}


def _agents(b: Builder, orc: Segment) -> list[Json]:
    """ORC-10 entered by, ORC-11 verified by → Provenance agents (IG ``ORC[Provenance]``)."""
    agents: list[Json] = []
    for field_no, role in ((10, "enterer"), (11, "verifier")):
        who = person(b, orc.field(field_no).first)
        if who:
            agents.append({"type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": role}]}, "who": who})
    return agents


def _link_details(
    b: Builder, sr_ref: str, encounter_ref: str | None, reasons: list[str], supporting: list[str]
) -> None:
    """DG1 Conditions as the order's ``reasonReference`` and the Encounter's ``diagnosis``; OBX/OBR-13
    Observations as its ``supportingInfo`` (IG message maps ORM_O01 / OMI_O23)."""
    order = b.resource(sr_ref)
    if reasons:
        order["reasonReference"] = [{"reference": r} for r in reasons]
    if supporting:
        order["supportingInfo"] = [{"reference": r} for r in supporting]
    if reasons and encounter_ref:
        diagnosis = b.resource(encounter_ref).setdefault("diagnosis", [])
        known = {d["condition"]["reference"] for d in diagnosis}
        diagnosis.extend({"condition": {"reference": r}} for r in reasons if r not in known)


def _override(path: FieldPath | None, standard: Picker) -> Picker:
    """A sender's own place for a value (``SenderConfig.fields``) instead of the message type's."""
    return standard if path is None else lambda group, msg: path.value((group.orc, *group.members), msg)


def _service_request(
    b: Builder,
    n: int,
    group: OrderGroup,
    patient_ref: str,
    encounter_ref: str | None,
    coverage_refs: list[str],
    accession: str,
    study_uid: str,
) -> tuple[str, Json]:
    """ORC + OBR (+ TQ1, NTE) → ServiceRequest (IG ``ORC[ServiceRequest]``, ``OBR[ServiceRequest]``)."""
    orc, obr = group.orc, group.first("OBR")
    at = f"ORC[{n}]" if n > 1 else "ORC"
    control = orc.field(1).value
    if control not in ("NW", "XO"):
        # NW opens a case and XO replaces its order here; CA/DC/SC/HD/RL change a case (hl7_bridge).
        raise MappingError(TABLE_VALUE_NOT_FOUND, f"{at}-1", f"Order control {control!r} is not NW or XO")
    if obr is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "OBR", "The order has no OBR segment")
    placer = ei_identifier(orc.field(2).first, b.config, b.fallback, "PLAC") or ei_identifier(
        obr.field(2).first, b.config, b.fallback, "PLAC"
    )
    if placer is None:
        raise MappingError(REQUIRED_FIELD_MISSING, f"{at}-2", "Placer order number (ORC-2 or OBR-2) is missing")
    identifiers = [placer]
    filler = ei_identifier(orc.field(3).first, b.config, b.fallback, "FILL") or ei_identifier(
        obr.field(3).first, b.config, b.fallback, "FILL"
    )
    if filler:
        identifiers.append(filler)
    if accession:
        identifiers.append({"type": identifier_type("ACSN"), "system": b.fallback, "value": accession})
    if study_uid:
        identifiers.append({"system": STUDY_UID_SYSTEM, "value": f"urn:oid:{study_uid}"})
    sr: Json = {"resourceType": "ServiceRequest", "identifier": identifiers, "status": "active", "intent": "order"}
    code_at = b.config.fields.procedure_code or FieldPath("OBR", 4)
    code = codeable_concept(code_at.locate((orc, *group.members), b.msg).first)
    if code is None:
        raise MappingError(REQUIRED_FIELD_MISSING, str(code_at), "Universal service identifier is missing")
    tq1 = group.first("TQ1")
    priority = _priority(b, group, tq1)
    if priority:
        sr["priority"] = priority
    sr["code"] = add_translations(code, b.config.concept_maps)
    sr["subject"] = {"reference": patient_ref}
    if encounter_ref:
        sr["encounter"] = {"reference": encounter_ref}
    sr |= _occurrence(b, at, group, tq1)
    amount = cq_quantity(tq1.field(2).first) if tq1 else None
    if amount:
        sr["quantityQuantity"] = amount  # IG TQ1-2
    authored = date_time(orc.field(9).component(1), b.config, f"{at}-9") or date_time(
        b.msg.msh.field(7).component(1), b.config, "MSH-7"
    )
    if authored:
        sr["authoredOn"] = authored
    requester(b, group, obr, sr)
    reasons = [c for rep in obr.field(31).present() if (c := codeable_concept(rep))]
    if reasons:
        sr["reasonCode"] = [add_translations(c, b.config.concept_maps) for c in reasons]
    _more_order(b, sr, orc, obr)
    add_procedure(b, group, sr)
    if coverage_refs:
        sr["insurance"] = [{"reference": r} for r in coverage_refs]
    notes = _notes(b, group, tq1)
    if notes:
        sr["note"] = notes
    # Re-ordering the same placer number is the same order: match on it. A change order (XO)
    # replaces what the order says (conditional update); the case (Task) stays as it is.
    return b.add(f"ServiceRequest/{n}", sr, placer, replace=control == "XO"), placer


def _more_order(b: Builder, sr: Json, orc: Segment, obr: Segment) -> None:
    """The rest of IG ``ORC``/``OBR[ServiceRequest]``: ORC-4 placer group → requisition, OBR-53 (else
    ORC-33) alternate placer number → identifier, OBR-29 parent order → basedOn (logical), ORC-29 order
    type → locationCode, OBR-46/47 placer/filler supplemental service information → orderDetail."""
    group_number = ei_identifier(orc.field(4).first, b.config, b.fallback, "PGN")
    if group_number:
        sr["requisition"] = group_number
    alternate = obr.field(53).first if not obr.field(53).is_empty() else orc.field(33).first
    alternate_id = cx_identifier(alternate, b.config, b.fallback)
    if alternate_id:
        sr["identifier"].append({**alternate_id, "type": identifier_type("PLAC")})
    parent = [
        {"type": "ServiceRequest", "identifier": {"type": identifier_type(kind), "system": system, "value": value}}
        for n, kind in ((1, "PLAC"), (2, "FILL"))
        if (value := obr.field(29).subcomponent(n, 1))
        and (system := b.config.system_for(*(obr.field(29).subcomponent(n, m) for m in (2, 3, 4))) or b.fallback)
    ]
    if parent:
        sr["basedOn"] = parent
    location = [c for rep in orc.field(29).present() if (c := codeable_concept(rep))]
    if location:
        sr["locationCode"] = location
    details = [c for n in (46, 47) for rep in obr.field(n).present() if (c := codeable_concept(rep))]
    if details:
        sr["orderDetail"] = details
    filler_group = ei_identifier(orc.field(38).first, b.config, b.fallback, "FGN")
    if filler_group:
        sr["identifier"].append(filler_group)
    if obr.field(11).value == "G":  # IG OBR-11: a reflex test (G) is a reflex order; A, add-on, stays an order
        sr["intent"] = "reflex-order"
    confidentiality = codeable_concept(orc.field(28).first, "0177")
    if confidentiality and "coding" in confidentiality:
        sr["meta"] = {"security": confidentiality["coding"]}
    _order_extensions(b, sr, orc)


def _order_extensions(b: Builder, sr: Json, orc: Segment) -> None:
    """IG ORC-1 (with ORC-9) → the ``businessEvent`` extension; ORC-16 → ``request-statusReason``."""
    extensions: list[Json] = []
    event: list[Json] = [{"url": "value", "valueCodeableConcept": codeable_concept(orc.field(1).first, "0119")}]
    if "authoredOn" in sr:
        event.append({"url": "date", "valueDateTime": sr["authoredOn"]})
    extensions.append({"url": BUSINESS_EVENT, "extension": event})
    reason = codeable_concept(orc.field(16).first)
    if reason:
        extensions.append({"url": STATUS_REASON, "valueCodeableConcept": reason})
    sr["extension"] = [*sr.get("extension", []), *extensions]


def _priority(b: Builder, group: OrderGroup, tq1: Segment | None) -> str | None:
    """The order's priority (table 0027 / 0485, IG ``ExtendedPriorityCodes``) from every place v2 carries it.

    The first code with a FHIR peer in: TQ1-9 (the place since v2.5), ORC-7.6 (TQ-6), OBR-27.6 (the IG
    reads OBR-27 only where ORC-7 is empty), OBR-5 (kept for backward compatibility only); or the
    sender's own field instead of all of them; else the sender's default priority. A code without a
    peer (PRN, C) does not hide a STAT sent in another place.
    """
    at = b.config.fields.priority
    if at is not None:
        sent = [at.value((group.orc, *group.members), b.msg)]
    else:
        obr = group.first("OBR")
        sent = [tq1.field(9).component(1) if tq1 else "", group.orc.field(7).component(6)]
        sent += [obr.field(27).component(6), obr.field(5).value] if obr else []
    code = next((PRIORITY[c] for c in sent if c in PRIORITY), None)
    return code or b.config.default_priority


def _occurrence(b: Builder, at: str, group: OrderGroup, tq1: Segment | None) -> Json:
    """When the order is to be done: TQ1-7/8, else ORC-7.4/7.5 (TQ), else OBR-27.4/27.5 → ``occurrencePeriod``;
    else OBR-6 requested date/time → ``occurrenceDateTime`` (IG ``TQ1``, ``TQ``, ``OBR[ServiceRequest]``).

    A Period rather than the IG's ``occurrenceTiming.repeat.boundsPeriod``: a radiology order is done once.
    """
    obr = group.first("OBR")
    places: list[tuple[str, str, str]] = []
    if tq1:
        places.append((tq1.field(7).component(1), tq1.field(8).component(1), "TQ1"))
    orc7, obr27 = group.orc.field(7), obr.field(27) if obr else group.orc.field(0)
    places.append((orc7.subcomponent(4, 1), orc7.subcomponent(5, 1), f"{at}-7"))
    places.append((obr27.subcomponent(4, 1), obr27.subcomponent(5, 1), "OBR-27"))
    for start, end, where in places:
        if start or end:
            period: Json = {}
            if start:
                period["start"] = date_time(start, b.config, f"{where}-7" if where == "TQ1" else f"{where}.4")
            if end:
                period["end"] = date_time(end, b.config, f"{where}-8" if where == "TQ1" else f"{where}.5")
            return {"occurrencePeriod": period}
    requested = date_time(obr.field(6).component(1), b.config, "OBR-6") if obr else None
    return {"occurrenceDateTime": requested} if requested else {}


def _notes(b: Builder, group: OrderGroup, tq1: Segment | None) -> list[Json]:
    """NTE after the OBR → Annotation (IG ``NTE[ServiceRequest]``); TQ1-11 text instruction, a note too."""
    notes: list[Json] = []
    seen_obr = False
    for seg in group.members:
        if seg.name == "OBR":
            seen_obr = True
        elif seg.name == "OBX":
            seen_obr = False  # NTEs after an OBX annotate that observation, not the order
        elif seg.name == "NTE" and seen_obr and (note := annotation(b, seg)):
            notes.append(note)
    instruction = "\n".join(free_text(r, b.msg.encoding) for r in tq1.field(11).present()) if tq1 else ""
    if instruction:
        notes.append({"text": instruction})
    return notes


def _task(b: Builder, n: int, group: OrderGroup, sr_ref: str, patient_ref: str, placer: Json) -> None:
    """The case tracker: a Task (requested, order) whose focus is the ServiceRequest."""
    task: Json = {
        "resourceType": "Task",
        "identifier": [placer],
        "status": "requested",
        "intent": "order",
        "focus": {"reference": sr_ref},
        "for": {"reference": patient_ref},
    }
    status = group.orc.field(5).value
    if status:  # IG ORC-5; here the case's, as order control sets it (the workflow owns ServiceRequest.status)
        task["businessStatus"] = {"coding": [{"system": ORDER_STATUS, "code": status}]}
    authored = date_time(b.msg.msh.field(7).component(1), b.config, "MSH-7")
    if authored:
        task["authoredOn"] = authored
    b.add(f"Task/{n}", task, placer)
