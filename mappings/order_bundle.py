"""The part of ORM^O01 and OMI^O23 intake the two share: one order message → one transaction Bundle.

Follows the V2-to-FHIR IG segment maps ``PID[Patient]``, ``PV1[Encounter]``, ``IN1[Coverage]``,
``ORC[ServiceRequest]``, ``OBR[ServiceRequest]``, ``TQ1[ServiceRequest]`` and ``NTE[ServiceRequest]``,
and the message maps ``ORM_O01`` / ``OMI_O23`` (chapter 4.4 / 4.4.5 of v2.5.1). Every resource that
could already exist is a conditional create (``ifNoneExist`` on an identifier) so that a resent
message changes nothing; ``fullUrl``s are uuid5 of the message's sender, MSH-10 and the resource's
role, so the same message always yields the same Bundle.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import quote

from mappings.concept_map import add_translations
from mappings.errors import REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, MappingError
from mappings.sender import FieldPath, SenderConfig
from mappings.v2 import Encoding, Field, Message, Segment
from mappings.v2_datatypes import (
    Json,
    address,
    codeable_concept,
    cx_identifier,
    date,
    date_time,
    ei_identifier,
    free_text,
    human_name,
    identifier_type,
    instant,
    practitioner,
    telecom,
    yes_no,
)

NAMESPACE = uuid.UUID("5b0f3c1e-8f4e-4d7a-9a51-0c6a2f4b7e10")
GENDER = {"F": "female", "M": "male", "O": "other", "U": "unknown", "A": "other", "N": "other"}
# PatientClass[EncounterClass] concept map.
ENCOUNTER_CLASS = {
    "E": ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "EMER", "emergency"),
    "I": ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "IMP", "inpatient encounter"),
    "O": ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "AMB", "ambulatory"),
    "P": ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "PRENC", "pre-admission"),
}
# Table 0027 priority (TQ-6, TQ1-9, OBR-5) to request-priority (IG ExtendedPriorityCodes for S, A, R);
# P (pre-op) and T (timing critical) as urgent; codes without a FHIR peer (C, PRN) are left out.
PRIORITY = {"S": "stat", "A": "asap", "R": "routine", "P": "urgent", "T": "urgent"}
STUDY_UID_SYSTEM = "urn:dicom:uid"
PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
PROVENANCE_PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"


@dataclass(frozen=True)
class OrderGroup:
    """One ORC and the segments up to the next ORC (TQ1, OBR, NTE, OBX, IPC, Z-segments)."""

    orc: Segment
    members: tuple[Segment, ...]

    def first(self, name: str) -> Segment | None:
        return next((s for s in self.members if s.name == name), None)

    def all(self, name: str) -> tuple[Segment, ...]:
        return tuple(s for s in self.members if s.name == name)


# Per-message-type choices: the accession number and the Study Instance UID of one order.
Picker = Callable[[OrderGroup, Message], str]


def fallback_system(msg: Message, config: SenderConfig) -> str:
    """The identifier system of ids without an assigning authority: configured, else the sending facility's.

    A message without MSH-4 takes its sending application (MSH-3) as the authority, so ids from two
    such senders never fall into one system.
    """
    hd = _sender_hd(msg)
    sender_system = config.system_for(hd.component(1), hd.component(2), hd.component(3))
    return config.default_system or sender_system or "urn:overread:assigning-authority:unknown"


def _sender_hd(msg: Message) -> Field:
    """MSH-4 (sending facility), else MSH-3 (sending application) when MSH-4 is empty."""
    msh4 = msg.msh.field(4)
    return msh4 if msh4.component(1) or msh4.component(2) else msg.msh.field(3)


class _Builder:
    def __init__(self, msg: Message, config: SenderConfig) -> None:
        self.msg = msg
        self.config = config
        msh = msg.msh
        self.app, self.facility = msh.field(3).component(1), msh.field(4).component(1)
        self.control_id = msh.field(10).value
        if not self.control_id:
            raise MappingError(REQUIRED_FIELD_MISSING, "MSH-10", "Message control id is missing")
        self.fallback = fallback_system(msg, config)
        self.entries: list[Json] = []
        self._by_url: dict[str, Json] = {}

    def full_url(self, role: str) -> str:
        key = f"{self.app}|{self.facility}|{self.control_id}|{role}"
        return f"urn:uuid:{uuid.uuid5(NAMESPACE, key)}"

    def add(self, role: str, resource: Json, match: Json | None = None, replace: bool = False) -> str:
        """Add a conditional create on ``match``, or with ``replace`` a conditional update (PUT)."""
        url = self.full_url(role)
        if url in self._by_url:
            return url  # one person in two roles (PV1-8 referrer, ORC-12 orderer): one entry
        request: Json = {"method": "POST", "url": resource["resourceType"]}
        if match:
            criteria = "identifier=" + quote(f"{match['system']}|{match['value']}", safe=":/|")
            if replace:
                request = {"method": "PUT", "url": f"{resource['resourceType']}?{criteria}"}
            else:
                request["ifNoneExist"] = criteria
        self.append({"fullUrl": url, "resource": resource, "request": request})
        return url

    def append(self, entry: Json) -> None:
        """Add a Bundle entry as it is, indexed by its fullUrl (a check per entry stays O(1))."""
        self._by_url[entry["fullUrl"]] = entry
        self.entries.append(entry)

    def resource(self, url: str) -> Json:
        """The resource of the entry at ``url`` (already added)."""
        resource: Json = self._by_url[url]["resource"]
        return resource


def build(msg: Message, config: SenderConfig, accession: Picker, study_uid: Picker) -> Json:
    """Map an order message (already known to be ORM^O01 or OMI^O23) to a transaction Bundle."""
    from mappings import order_details, original_report  # not at the top: they build on this module

    b = _Builder(msg, config)
    accession, study_uid = _override(config.fields.accession, accession), _override(config.fields.study_uid, study_uid)
    author = _author(b)
    pid = msg.segment("PID")
    if pid is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "PID", "The order has no PID segment")
    patient_ref = _patient(b, pid)
    pv1 = msg.segment("PV1")
    encounter_ref = _encounter(b, pv1, patient_ref) if pv1 else None
    coverage_refs = [_coverage(b, n, in1, patient_ref) for n, in1 in enumerate(msg.segments("IN1"), 1)]
    groups = _groups(msg)
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
    _provenance(b, author)
    return {"resourceType": "Bundle", "type": "transaction", "entry": b.entries}


def _link_details(
    b: _Builder, sr_ref: str, encounter_ref: str | None, reasons: list[str], supporting: list[str]
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


def _groups(msg: Message) -> list[OrderGroup]:
    """Split the message at each ORC; one pass, each segment appended once (linear in the segments)."""
    starts = [i for i, seg in enumerate(msg.all_segments) if seg.name == "ORC"]
    ends = [*starts[1:], len(msg.all_segments)]
    return [OrderGroup(msg.all_segments[i], msg.all_segments[i + 1 : end]) for i, end in zip(starts, ends, strict=True)]


def _author(b: _Builder) -> Json:
    """The message's author, as the reference its Provenance names.

    MSH-4 sending facility (HD) → Organization (IG ``HD[Organization]``). A sender that leaves MSH-4
    empty is its sending application, MSH-3: a logical reference to it (type Device, the HD as its
    identifier, as IG ``HD[Device]`` would make it), unless its sender entry says MSH-4 identifies it
    (``identified_by: msh3+msh4``).
    """
    msh = b.msg.msh
    msh4 = msh.field(4)
    if msh4.component(1) or msh4.component(2):
        ident = _hd_identifier(msh4, "urn:overread:sending-facility")
        org: Json = {"resourceType": "Organization", "identifier": [ident], "name": msh4.component(1) or ident["value"]}
        return {"reference": b.add("Organization/sending-facility", org, ident)}
    msh3 = msh.field(3)
    if b.config.identified_by == "msh3+msh4" or not (msh3.component(1) or msh3.component(2)):
        raise MappingError(REQUIRED_FIELD_MISSING, "MSH-4", "Sending facility is missing")
    ident = _hd_identifier(msh3, "urn:overread:sending-application")
    return {"type": "Device", "identifier": ident, "display": msh3.component(1) or ident["value"]}


def _hd_identifier(hd: Field, local_system: str) -> Json:
    """An HD as an Identifier: its ISO OID as ``urn:oid:``, else its namespace id in ``local_system``,
    else its universal id of another type (``^1234^CLIA``) in ``<local_system>:<type>``."""
    if hd.component(2) and hd.component(3).upper() == "ISO":
        return {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{hd.component(2)}"}
    if hd.component(1) or not hd.component(2):
        return {"system": local_system, "value": hd.component(1)}
    return {"system": f"{local_system}:{quote(hd.component(3).upper() or 'HD', safe='')}", "value": hd.component(2)}


def policy_system(fallback: str) -> str:
    """The system of IN1-36 policy numbers: the sender's fallback system with ``:policy``, unless that
    would not be a URI of its kind (``urn:oid:1.2:policy`` is no OID): then ``urn:overread:policy:<system>``."""
    if fallback.startswith(("urn:oid:", "urn:uuid:")):
        return f"urn:overread:policy:{fallback}"
    return f"{fallback}:policy"


def _patient(b: _Builder, pid: Segment) -> str:
    """PID → Patient (IG ``PID[Patient]``): PID-3 identifiers, PID-5 name, PID-7, PID-8, PID-11."""
    identifiers = [i for rep in pid.field(3).present() if (i := cx_identifier(rep, b.config, b.fallback))]
    if not identifiers:
        raise MappingError(REQUIRED_FIELD_MISSING, "PID-3", "Patient identifier list is missing")
    patient: Json = {"resourceType": "Patient", "identifier": identifiers}
    names = [n for rep in pid.field(5).present() if (n := human_name(rep))]
    if names:
        patient["name"] = names
    sex = pid.field(8).value
    if sex:
        patient["gender"] = GENDER.get(sex, "unknown")
    birth = date(pid.field(7).value, "PID-7")
    if birth:
        patient["birthDate"] = birth
    addresses = [a for rep in pid.field(11).present() if (a := address(rep))]
    if addresses:
        patient["address"] = addresses
    _more_demographics(b, pid, patient)
    # The first PID-3 repetition is the sender's primary id: the one a patient is matched on.
    return b.add("Patient", patient, identifiers[0])


SSN = "http://hl7.org/fhir/sid/us-ssn"
MOTHERS_MAIDEN_NAME = "http://hl7.org/fhir/StructureDefinition/patient-mothersMaidenName"


def _more_demographics(b: _Builder, pid: Segment, patient: Json) -> None:
    """The rest of IG ``PID[Patient]``: PID-2/4/19 identifiers (after PID-3, whose first is the match
    key), PID-6 mother's maiden name, PID-13/14 telecom, PID-15 language, PID-16 marital status,
    PID-24/25 multiple birth, PID-29/30 deceased."""
    more = [i for n in (2, 4) for rep in pid.field(n).present() if (i := cx_identifier(rep, b.config, b.fallback))]
    ssn = pid.field(19).value
    if ssn:
        more.append({"type": identifier_type("SS"), "system": SSN, "value": ssn})
    patient["identifier"] = patient["identifier"] + more
    maiden = human_name(pid.field(6).first)
    if maiden:
        patient["extension"] = [{"url": MOTHERS_MAIDEN_NAME, "valueString": maiden.get("family", "")}]
    points = [p for n, use in ((13, "home"), (14, "work")) for r in pid.field(n).present() if (p := telecom(r, use))]
    if points:
        patient["telecom"] = points
    language = codeable_concept(pid.field(15).first)
    if language:
        patient["communication"] = [{"language": language}]
    marital = codeable_concept(pid.field(16).first)
    if marital:
        patient["maritalStatus"] = marital
    order, multiple = pid.field(25).value, yes_no(pid.field(24).value)
    if order.isdigit():
        patient["multipleBirthInteger"] = int(order)
    elif multiple is not None:
        patient["multipleBirthBoolean"] = multiple
    died, deceased = date_time(pid.field(29).component(1), b.config, "PID-29"), yes_no(pid.field(30).value)
    if died:
        patient["deceasedDateTime"] = died
    elif deceased is not None:
        patient["deceasedBoolean"] = deceased


def _contained_practitioner(seg: Segment, field_no: int, b: _Builder, local_id: str) -> tuple[Json | None, Json | None]:
    """An XCN as (entry reference, contained resource): a shared Practitioner only when it has an id.

    A name without an identifier cannot be matched, so it stays inside the resource that names it
    (contained) instead of becoming a new Practitioner on every resend.
    """
    rep = seg.field(field_no).first
    resource = practitioner(rep, b.config, b.fallback)
    if resource is None:
        return None, None
    if "identifier" in resource:
        url = b.add(f"Practitioner/{resource['identifier'][0]['value']}", resource, resource["identifier"][0])
        return {"reference": url}, None
    return {"reference": f"#{local_id}"}, {"id": local_id, **resource}


def _encounter(b: _Builder, pv1: Segment, patient_ref: str) -> str:
    """PV1 → Encounter (IG ``PV1[Encounter]``): class from PV1-2, PV1-19 visit number, PV1-8 referrer."""
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
        enc["identifier"] = [visit]
    enc["subject"] = {"reference": patient_ref}
    for field_no, code, local_id in (
        (7, "ATND", "attender"),
        (8, "REF", "referrer"),
        (9, "CON", "consultant"),
        (17, "ADM", "admitter"),
    ):
        ref, contained = _contained_practitioner(pv1, field_no, b, local_id)
        if contained:
            enc.setdefault("contained", []).append(contained)
        if ref:
            part_type = {"coding": [{"system": PARTICIPATION_TYPE, "code": code}]}
            enc.setdefault("participant", []).append({"type": [part_type], "individual": ref})
    service = codeable_concept(pv1.field(10).first)
    if service:
        enc["serviceType"] = service
    admitted = date_time(pv1.field(44).component(1), b.config, "PV1-44")
    discharged = date_time(pv1.field(45).component(1), b.config, "PV1-45")
    if admitted or discharged:
        enc["period"] = {k: v for k, v in (("start", admitted), ("end", discharged)) if v}
    if discharged:
        enc["status"] = "finished"  # IG: PV1-45 valued
    source = codeable_concept(pv1.field(14).first)
    if source:
        enc["hospitalization"] = {"admitSource": source}
    return b.add("Encounter", enc, visit)


def _coverage(b: _Builder, n: int, in1: Segment, patient_ref: str) -> str:
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
    coverage: Json = {"resourceType": "Coverage", "status": "active"}
    policy = in1.field(36).value
    policy_id = {"system": policy_system(b.fallback), "value": policy} if policy else None
    if policy_id:
        coverage["identifier"] = [policy_id]
    plan = codeable_concept(in1.field(2).first)
    if plan:
        plan_type = {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/coverage-class", "code": "plan"}]}
        coverage["class"] = [{"type": plan_type, "value": in1.field(2).component(1) or plan.get("text", "")}]
    insurance_type = codeable_concept(in1.field(15).first)
    if insurance_type:
        coverage["type"] = insurance_type
    effective = date_time(in1.field(12).component(1), b.config, f"IN1[{n}]-12")
    expires = date_time(in1.field(13).component(1), b.config, f"IN1[{n}]-13")
    if effective or expires:
        coverage["period"] = {k: v for k, v in (("start", effective), ("end", expires)) if v}
    subscriber = in1.field(49).component(1)
    if subscriber:
        coverage["subscriberId"] = subscriber
    coverage["beneficiary"] = {"reference": patient_ref}
    if payor_id:
        coverage["payor"] = [{"reference": b.add(f"Organization/payor/{n}", payor, payor_id)}]
    else:
        coverage["contained"] = [{"id": "payor", **payor}]
        coverage["payor"] = [{"reference": "#payor"}]
    return b.add(f"Coverage/{n}", coverage, policy_id)


def _service_request(
    b: _Builder,
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
    authored = date_time(orc.field(9).component(1), b.config, f"{at}-9") or date_time(
        b.msg.msh.field(7).component(1), b.config, "MSH-7"
    )
    if authored:
        sr["authoredOn"] = authored
    requester_seg, requester_field = (orc, 12) if not orc.field(12).is_empty() else (obr, 16)
    ref, contained = _contained_practitioner(requester_seg, requester_field, b, "requester")
    if contained:
        sr["contained"] = [contained]
    if ref:
        sr["requester"] = ref
    reasons = [c for rep in obr.field(31).present() if (c := codeable_concept(rep))]
    if reasons:
        sr["reasonCode"] = [add_translations(c, b.config.concept_maps) for c in reasons]
    _more_order(b, sr, orc, obr)
    if coverage_refs:
        sr["insurance"] = [{"reference": r} for r in coverage_refs]
    notes = _notes(group, b.msg.encoding)
    if notes:
        sr["note"] = notes
    # Re-ordering the same placer number is the same order: match on it. A change order (XO)
    # replaces what the order says (conditional update); the case (Task) stays as it is.
    return b.add(f"ServiceRequest/{n}", sr, placer, replace=control == "XO"), placer


def _more_order(b: _Builder, sr: Json, orc: Segment, obr: Segment) -> None:
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


def _priority(b: _Builder, group: OrderGroup, tq1: Segment | None) -> str | None:
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


def _occurrence(b: _Builder, at: str, group: OrderGroup, tq1: Segment | None) -> Json:
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


def _notes(group: OrderGroup, enc: Encoding) -> list[Json]:
    """NTE after the OBR → Annotation (IG ``NTE[ServiceRequest]``): NTE-3 lines (whole) joined by newlines."""
    notes: list[Json] = []
    seen_obr = False
    for seg in group.members:
        if seg.name == "OBR":
            seen_obr = True
        elif seg.name == "OBX":
            seen_obr = False  # NTEs after an OBX annotate that observation, not the order
        elif seg.name == "NTE" and seen_obr:
            text = "\n".join(free_text(r, enc) for r in seg.field(3).present())
            if text:
                notes.append({"text": text})
    return notes


def _task(b: _Builder, n: int, group: OrderGroup, sr_ref: str, patient_ref: str, placer: Json) -> None:
    """The case tracker: a Task (requested, order) whose focus is the ServiceRequest."""
    task: Json = {
        "resourceType": "Task",
        "identifier": [placer],
        "status": "requested",
        "intent": "order",
        "focus": {"reference": sr_ref},
        "for": {"reference": patient_ref},
    }
    authored = date_time(b.msg.msh.field(7).component(1), b.config, "MSH-7")
    if authored:
        task["authoredOn"] = authored
    b.add(f"Task/{n}", task, placer)


def _provenance(b: _Builder, author: Json) -> None:
    """A Provenance (IG ``MSH[Provenance-Source]``) tying every resource to the message (MSH-10)."""
    recorded = instant(b.msg.msh.field(7).component(1), b.config, "MSH-7")
    if recorded is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "MSH-7", "Date/time of message is missing")
    system = f"urn:overread:message:{quote(b.app, safe='')}:{quote(b.facility, safe='')}"
    provenance: Json = {
        "resourceType": "Provenance",
        "target": [{"reference": e["fullUrl"]} for e in b.entries],
        "recorded": recorded,
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": [
            {
                "type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "author"}]},
                "who": author,
            }
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": system, "value": b.control_id},
                    "display": b.msg.msh.field(9).first.component(1) + "^" + b.msg.msh.field(9).component(2),
                },
            }
        ],
    }
    b.add("Provenance", provenance)


def study_uid_from_zds(msg: Message) -> str:
    """ZDS-1.1: the Study Instance UID in the dcm4che / IHE SWF convention."""
    zds = msg.segment("ZDS")
    return zds.field(1).component(1) if zds else ""
