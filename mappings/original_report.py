"""The original report (the one a second opinion is compared with) → DiagnosticReport.

Two ways in:

- an **ORU^R01** (v2.3 to v2.8) from the source RIS: ``map_oru_r01`` makes a transaction Bundle of
  Organization (MSH-4), Patient (PID, conditional create on the first PID-3, exactly as an order),
  one DiagnosticReport per OBR and a Provenance (IG message map ``ORU_R01``, segment maps
  ``OBR[DiagnosticReport]``; the OBX/NTE lines become the report's ``presentedForm``);
- OBX lines carrying report text (TX, FT) or the report itself (ED, RP) inside an **order**
  (ORM^O01/OMI^O23), when they say they are a report (OBR-25, a report OBX-3 code, ``_is_report``):
  ``from_order`` adds the same kind of DiagnosticReport to the order's Bundle, ``basedOn`` the order's
  ServiceRequest entry; other such lines are a DocumentReference in the order's ``supportingInfo``.
  Other OBX value types in an order (ST, NM, CE ... e.g. body weight) are order details
  (``mappings.order_details``).

Rules (see also ``docs/hl7-parsing.md``):

- The report is marked as the original by ``meta.tag`` ``https://overread.org/fhir/CodeSystem/report-role|original``
  (``fhir_server.cases.ORIGINAL_REPORT`` is the same tag on the store's side), category RAD (v2-0074,
  or OBR-24 when sent), identifiers PLAC/FILL/ACSN as in the order mapping (ORC-2/OBR-2, ORC-3/OBR-3,
  OBR-18), status from OBR-25 (IG ConceptMap ``ResultStatus[Non-Queries]``; A → partial per its note;
  unmapped codes are errors 103; without OBR-25, the first OBX-11, else unknown), effective OBR-7
  (OBR-8), issued OBR-22, resultsInterpreter OBR-32 (a Practitioner; contained when it has no id).
- Text OBX (TX, FT, ST) and coded/numeric ones (CE/CWE/CNE, NM with units) and their NTEs become one
  ``text/plain; charset=utf-8`` presentedForm, a heading per OBX-3 when the report has several; ST
  OBX that carry DICOM UIDs (OBX-3 ``113014`` DICOM Study or a name ending in "UID", the IHE/dcm4che
  convention) are references, not text, and are left out. ``conclusion`` is the impression (OBX-3
  LOINC 19005-8, an ``IMP`` suffix as in IHE SINR, or a name with "impression"), else the whole text
  when it is short.
- ED OBX → a presentedForm with the MIME type from ED-2/ED-3 and the data base64 (ED-4 Base64 taken as
  is, Hex and ASCII/A encoded); RP OBX → a presentedForm ``url``. No DocumentReference: the attachment
  already sits in the DiagnosticReport the second reader compares with, and a second resource would
  only duplicate a possibly large document.
- The order is *not* referenced from an ORU's Bundle: a conditional reference to a ServiceRequest that
  does not exist yet fails the whole transaction, and the RIS often reports before the second-opinion
  order comes. The store links the report to the order for the same accession (else placer) number
  once both exist, whichever came first (``fhir_server.cases``).
- Every report carries an identifier ``urn:overread:original-report|<uuid5>`` made of its filler (else
  placer, else accession) identifier and OBR-4: it is the conditional-update key, so a resent or
  corrected ORU (new MSH-10) updates the same report and never matches a second reader's report.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
from urllib.parse import quote

from mappings.bundle_builder import Builder, author, provenance
from mappings.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, MappingError
from mappings.order_group import OrderGroup, study_uid_from_zds
from mappings.patient import patient
from mappings.sender import SenderConfig
from mappings.v2 import Encoding, Message, Repetition, Segment
from mappings.v2_datatypes import (
    Json,
    codeable_concept,
    date_time,
    ei_identifier,
    free_text,
    identifier_type,
    instant,
)
from mappings.vocabulary import NAMESPACE, REPORT_TYPES, STUDY_UID_SYSTEM

REPORT_ROLE = "https://overread.org/fhir/CodeSystem/report-role"
ORIGINAL_TAG = {"system": REPORT_ROLE, "code": "original", "display": "Original report"}
KEY_SYSTEM = "urn:overread:original-report"
DOCUMENT_KEY_SYSTEM = "urn:overread:order-document"
REPORT_TITLE = "Original report"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
# IG ConceptMap ResultStatus[Non-Queries] (table 0123 → diagnostic-report-status); A per its comment.
RESULT_STATUS = {
    "O": "registered",
    "I": "registered",
    "S": "registered",
    "A": "partial",
    "P": "preliminary",
    "C": "corrected",
    "R": "partial",
    "F": "final",
    "X": "cancelled",
}
# OBX-11 (table 0085) of report lines sent with an order: how final the report the sender had is.
OBSERVATION_STATUS = {"F": "final", "P": "preliminary", "C": "corrected", "R": "partial"}
TEXT_TYPES = {"TX", "FT", "ST"}
CODED_TYPES = {"CE", "CWE", "CNE"}
#: OBX-3 codes of a radiology report or its parts (LOINC; IHE SINR section suffixes of OBX-3.1).
REPORT_CODES = {"18782-3", "18748-4", "19005-8", "18834-2", "11525-3", "GDT", "IMP", "ADT", "REC"}
#: Table 0191 (type of referenced data) to MIME top-level types.
MIME_TYPES = {
    "AP": "application",
    "APPLICATION": "application",
    "TEXT": "text",
    "TX": "text",
    "IM": "image",
    "IMAGE": "image",
    "AU": "audio",
    "AUDIO": "audio",
    "VIDEO": "video",
    "MULTIPART": "multipart",
}
SHORT_CONCLUSION = 500
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def map_oru_r01(msg: Message, config: SenderConfig) -> Json:
    """ORU^R01 → transaction Bundle: Organization, Patient, a DiagnosticReport per OBR, Provenance."""
    b = Builder(msg, config)
    sender = author(b)
    pid = msg.segment("PID")
    if pid is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "PID", "The report has no PID segment")
    patient_ref = patient(b, pid, msg.segment("PD1"))
    groups = _observation_groups(msg)
    if not groups:
        raise MappingError(REQUIRED_FIELD_MISSING, "OBR", "The report has no OBR segment")
    for n, (orc, obr, members) in enumerate(groups, 1):
        _oru_report(b, n, orc, obr, members, patient_ref)
    provenance(b, sender)
    return {"resourceType": "Bundle", "type": "transaction", "entry": b.entries}


def from_order(b: Builder, n: int, group: OrderGroup, sr_ref: str, patient_ref: str) -> str | None:
    """What an order's TX/FT/ED/RP OBX lines are: the original report, basedOn the order's entry, when
    they say they are one (``_is_report``); else an attached document (DocumentReference, no conclusion),
    whose entry is returned for the order's ``supportingInfo``."""
    at_obr = next((i for i, s in enumerate(group.members) if s.name == "OBR"), None)
    obr = group.members[at_obr] if at_obr is not None else None
    members = group.members[at_obr + 1 :] if at_obr is not None else group.members
    if not any(s.name == "OBX" and s.field(2).value in REPORT_TYPES for s in members):
        return None
    report_lines = _report_lines(members)
    order = b.resource(sr_ref)
    identifiers = [i for i in order["identifier"] if _type_code(i) in ("PLAC", "FILL", "ACSN")]
    first = next(s for s in report_lines if s.name == "OBX")
    if not _is_report(obr, report_lines):
        return _document(b, n, report_lines, first, identifiers, order, sr_ref, patient_ref)
    report: Json = {
        "resourceType": "DiagnosticReport",
        "meta": {"tag": [ORIGINAL_TAG]},
        "identifier": [_key(identifiers, order["code"]), *identifiers],
        "basedOn": [{"reference": sr_ref}],
        "status": OBSERVATION_STATUS.get(first.field(11).value, "unknown"),
        "category": [_category("")],
        "code": order["code"],
        "subject": {"reference": patient_ref},
    }
    _add_content(b, report, report_lines)
    _add(b, f"DiagnosticReport/original/{n}", report)
    return None


def _is_report(obr: Segment | None, lines: tuple[Segment, ...]) -> bool:
    """Whether an order's text/document OBX are a report: OBR-25 carries a result status, or an OBX-3
    names a report or a section of one (``REPORT_CODES``, an IHE SINR section suffix, an impression).

    An order may carry other documents (a referral letter, a prior's PDF); taking those for the report
    would fabricate the original a second opinion is compared with.
    """
    if obr is not None and obr.field(25).value in RESULT_STATUS:
        return True
    for seg in lines:
        if seg.name != "OBX" or seg.field(2).value not in REPORT_TYPES:
            continue
        obx3 = seg.field(3).first
        subs = {sub.upper() for comp in obx3.components for sub in comp}
        if subs & REPORT_CODES or _is_impression(obx3):
            return True
    return False


def _document(
    b: Builder,
    n: int,
    lines: tuple[Segment, ...],
    first: Segment,
    identifiers: list[Json],
    order: Json,
    sr_ref: str,
    patient_ref: str,
) -> str:
    """OBX lines that are no report → DocumentReference (IG ``OBX[DocumentReference]``), content only."""
    holder: Json = {}
    _add_content(b, holder, lines)
    code = codeable_concept(first.field(3).first)
    title = first.field(3).component(2) or "Document sent with the order"
    forms = [{**f, "title": title} if f.get("title") == REPORT_TITLE else f for f in holder.get("presentedForm", [])]
    key = {**_key(identifiers, code or order["code"]), "system": DOCUMENT_KEY_SYSTEM}
    document: Json = {"resourceType": "DocumentReference", "identifier": [key], "status": "current"}
    if code:
        document["type"] = code
    document["subject"] = {"reference": patient_ref}
    document["content"] = [{"attachment": form} for form in forms]
    document["context"] = {"related": [{"reference": sr_ref}]}
    ident = document["identifier"][0]
    return b.add(f"DocumentReference/{n}", document, ident, replace=True)


def _observation_groups(msg: Message) -> list[tuple[Segment | None, Segment, tuple[Segment, ...]]]:
    """ORU order observations: (ORC if any, OBR, the segments after the OBR up to the next ORC/OBR)."""
    groups: list[tuple[Segment | None, Segment, list[Segment]]] = []
    orc: Segment | None = None
    for seg in msg.segments():
        if seg.name == "ORC":
            orc = seg
        elif seg.name == "OBR":
            groups.append((orc, seg, []))
            orc = None
        elif seg.name in ("OBX", "NTE") and groups:
            groups[-1][2].append(seg)  # appended in place: linear in the segments
    return [(o, r, tuple(members)) for o, r, members in groups]


def _oru_report(
    b: Builder, n: int, orc: Segment | None, obr: Segment, members: tuple[Segment, ...], patient_ref: str
) -> None:
    at = f"OBR[{n}]" if n > 1 else "OBR"
    identifiers: list[Json] = []
    for type_code, orc_field, obr_field in (("PLAC", 2, 2), ("FILL", 3, 3)):
        ident = (ei_identifier(orc.field(orc_field).first, b.config, b.fallback, type_code) if orc else None) or (
            ei_identifier(obr.field(obr_field).first, b.config, b.fallback, type_code)
        )
        if ident:
            identifiers.append(ident)
    near = (*([orc] if orc else []), obr, *members)
    override = b.config.fields.accession
    # IHE SWF: OBR-18, as the order mappings read it (mappings.orm_o01), unless the sender puts it elsewhere.
    accession = override.value(near, b.msg) if override else obr.field(18).value
    if accession:
        identifiers.append({"type": identifier_type("ACSN"), "system": b.fallback, "value": accession})
    if not identifiers:
        raise MappingError(REQUIRED_FIELD_MISSING, f"{at}-3", "Filler, placer and accession numbers are all missing")
    code = codeable_concept(obr.field(4).first)
    if code is None:
        raise MappingError(REQUIRED_FIELD_MISSING, f"{at}-4", "Universal service identifier is missing")
    result_status = obr.field(25).value
    if result_status and result_status not in RESULT_STATUS:
        raise MappingError(TABLE_VALUE_NOT_FOUND, f"{at}-25", f"Result status {result_status!r} has no FHIR status")
    report: Json = {
        "resourceType": "DiagnosticReport",
        "meta": {"tag": [ORIGINAL_TAG]},
        "identifier": [_key(identifiers, code), *identifiers],
        "status": RESULT_STATUS[result_status] if result_status else _status_of_lines(members),
        "category": [_category(obr.field(24).value)],
        "code": code,
        "subject": {"reference": patient_ref},
    }
    start = date_time(obr.field(7).component(1), b.config, f"{at}-7")
    end = date_time(obr.field(8).component(1), b.config, f"{at}-8")
    if start and end:
        report["effectivePeriod"] = {"start": start, "end": end}
    elif start:
        report["effectiveDateTime"] = start
    issued = instant(obr.field(22).component(1), b.config, f"{at}-22")
    if issued:
        report["issued"] = issued
    interpreter, contained = _interpreter(b, obr.field(32).first)
    if contained:
        report["contained"] = [contained]
    if interpreter:
        report["resultsInterpreter"] = [interpreter]
    study_uid = _study_uid(b, near, members)
    if study_uid:
        study = {"system": STUDY_UID_SYSTEM, "value": f"urn:oid:{study_uid}"}
        report["imagingStudy"] = [{"type": "ImagingStudy", "identifier": study}]
    _add_content(b, report, members)
    _add(b, f"DiagnosticReport/{n}", report)


def _status_of_lines(members: tuple[Segment, ...]) -> str:
    """A report sent without OBR-25: as final as its first OBX says (OBX-11, table 0085), else unknown."""
    first = next((s for s in members if s.name == "OBX"), None)
    return OBSERVATION_STATUS.get(first.field(11).value, "unknown") if first else "unknown"


def _study_uid(b: Builder, near: tuple[Segment, ...], members: tuple[Segment, ...]) -> str:
    """The Study Instance UID a report is of: the sender's field (``fields.study_uid``), else an OBX with
    OBX-3 ``113014`` (DICOM "Study", as DICOM SR / IHE SINR send it), else ZDS-1.1 (dcm4che)."""
    override = b.config.fields.study_uid
    if override:
        return override.value(near, b.msg)
    in_obx = next((s.field(5).value for s in members if s.name == "OBX" and s.field(3).component(1) == "113014"), "")
    return in_obx or study_uid_from_zds(b.msg)


def _add(b: Builder, role: str, report: Json) -> None:
    """A conditional update on the report's key: a resend or a correction replaces the same report."""
    key = report["identifier"][0]
    url = b.full_url(role)
    criteria = "identifier=" + quote(f"{key['system']}|{key['value']}", safe=":/|")
    b.append({"fullUrl": url, "resource": report, "request": {"method": "PUT", "url": f"DiagnosticReport?{criteria}"}})


def _key(identifiers: list[Json], code: Json) -> Json:
    """The report's own key: its first of filler, placer, accession identifier, and its code."""
    by_type = {_type_code(i): i for i in reversed(identifiers)}
    basis = by_type.get("FILL") or by_type.get("PLAC") or by_type["ACSN"]
    coding = (code.get("coding") or [{}])[0]
    name = f"{basis['system']}|{basis['value']}|{coding.get('system', '')}|{coding.get('code', code.get('text', ''))}"
    return {"system": KEY_SYSTEM, "value": str(uuid.uuid5(NAMESPACE, name))}


def _type_code(identifier: Json) -> str:
    codings = identifier.get("type", {}).get("coding", [{}])
    return str(codings[0].get("code", "")) if codings else ""


def _category(section: str) -> Json:
    """OBR-24 diagnostic service section (table 0074); radiology (RAD) when not sent."""
    return {"coding": [{"system": V2_0074, "code": section or "RAD"}]}


def _interpreter(b: Builder, ndl: Repetition) -> tuple[Json | None, Json | None]:
    """OBR-32 (NDL; its CNN in subcomponents) → Practitioner, shared when identified, else contained."""
    cnn = ndl.components[0] if ndl.components else ()
    parts = [*cnn, *[""] * 11][:11]
    # CNN-1..8 are XCN-1..8; CNN-9..11 are the assigning authority that XCN-9 holds as an HD.
    xcn = Repetition((*((p,) for p in parts[:8]), tuple(parts[8:11])))
    return b.practitioner(xcn, "interpreter")


def _add_content(b: Builder, report: Json, members: tuple[Segment, ...]) -> None:
    """OBX/NTE → presentedForm (text, ED data, RP url) and conclusion."""
    text, impression = _text(members, b.msg.encoding)
    forms: list[Json] = []
    if text:
        forms.append(
            {
                "contentType": "text/plain; charset=utf-8",
                "data": base64.b64encode(text.encode("utf-8")).decode("ascii"),
                "title": REPORT_TITLE,
            }
        )
    for n, seg in enumerate((s for s in members if s.name == "OBX"), 1):
        kind = seg.field(2).value
        if kind == "ED" and not seg.field(5).is_empty():
            forms.append(_attachment(seg, f"OBX[{n}]-5", b.msg))
        elif kind == "RP" and seg.field(5).component(1):
            forms.append(_pointer(seg))
    conclusion = impression or (text if len(text) <= SHORT_CONCLUSION else "")
    if conclusion:
        report["conclusion"] = conclusion
    if forms:
        report["presentedForm"] = forms


def _report_lines(members: tuple[Segment, ...]) -> tuple[Segment, ...]:
    """An order's report lines: from the first TX/FT/ED/RP OBX on (earlier OBX are order details)."""
    for i, seg in enumerate(members):
        if seg.name == "OBX" and seg.field(2).value in REPORT_TYPES:
            return tuple(s for s in members[i:] if s.name in ("OBX", "NTE"))
    return ()


def _text(members: tuple[Segment, ...], enc: Encoding) -> tuple[str, str]:
    """The report's text lines (with OBX-3 headings when there are several) and its impression."""
    chunks: list[tuple[str, str, bool]] = []  # (heading, text, is impression)
    heading = ""
    is_impression = False
    for seg in members:
        if seg.name == "OBX":
            lines = _obx_text(seg, enc)
            heading = seg.field(3).component(2) or seg.field(3).component(1)
            is_impression = _is_impression(seg.field(3).first)
            if lines is None:
                heading = ""  # NTEs after a non-text OBX (ED, RP, a UID) stay under no heading
                continue
            chunks.append((heading, lines, is_impression))
        elif seg.name == "NTE":
            note = "\n".join(free_text(r, enc) for r in seg.field(3).present())
            if note:
                chunks.append((heading, note, is_impression))
    headings = {h for h, _, _ in chunks}
    out: list[str] = []
    last: str | None = None
    for h, lines, _ in chunks:
        if len(headings) > 1 and h != last and h:
            out.append(f"{h}:")
        last = h
        out.append(lines)
    impression = "\n".join(lines for _, lines, imp in chunks if imp)
    return "\n".join(out).strip("\n"), impression


def _obx_text(obx: Segment, enc: Encoding) -> str | None:
    """One OBX's value as text lines, or None when it is no text (ED, RP, a DICOM UID, empty)."""
    kind = obx.field(2).value
    if kind in TEXT_TYPES:
        if _is_dicom_reference(obx.field(3).first):
            return None
        # TX/FT/ST: each repetition a line; the parser already turned \.br\ into newlines.
        lines = [free_text(r, enc) for r in obx.field(5).present()]
    elif kind in CODED_TYPES:
        lines = [r.component(2) or r.component(9) or r.component(1) for r in obx.field(5).present()]
    elif kind == "NM":
        unit = obx.field(6).component(2) or obx.field(6).component(1)
        lines = [f"{r.value} {unit}".strip() for r in obx.field(5).present()]
    else:
        return None
    text = "\n".join(line for line in lines if line)
    return text or None


def _is_dicom_reference(obx3: Repetition) -> bool:
    return obx3.component(1) == "113014" or obx3.component(2).upper().endswith("UID")


def _is_impression(obx3: Repetition) -> bool:
    subs = {s.upper() for c in obx3.components for s in c}
    return "19005-8" in subs or "IMP" in subs or "IMPRESSION" in obx3.component(2).upper()


def _attachment(obx: Segment, at: str, msg: Message) -> Json:
    """ED (OBX-5: 1 source, 2 type of data, 3 subtype, 4 encoding, 5 data) → Attachment with data."""
    rep = obx.field(5).first
    enc = msg.encoding
    # Data sent without escaping its ^, & and ~ (CDA XML does: &lt;) was split by the parser: rejoin it.
    data = enc.repetition.join(
        [
            enc.component.join(enc.subcomponent.join(sub) for sub in rep.components[4:]),
            *(free_text(r, enc) for r in obx.field(5).repetitions[1:]),
        ]
    )
    encoding = rep.component(4).upper()
    if encoding in ("BASE64", "B64"):
        cleaned = re.sub(r"\s+", "", data)
        try:
            base64.b64decode(cleaned, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MappingError(DATA_TYPE_ERROR, at, f"ED data is not valid Base64: {exc}") from exc
        encoded = cleaned
    elif encoding == "HEX":
        try:
            encoded = base64.b64encode(bytes.fromhex(data)).decode("ascii")
        except ValueError as exc:
            raise MappingError(DATA_TYPE_ERROR, at, f"ED data is not valid Hex: {exc}") from exc
    elif encoding in ("A", "ASCII", ""):
        encoded = base64.b64encode(data.encode("utf-8")).decode("ascii")
    else:
        raise MappingError(
            TABLE_VALUE_NOT_FOUND, f"{at}.4", f"ED encoding {rep.component(4)!r} is not A, Hex or Base64"
        )
    if not encoded:
        raise MappingError(REQUIRED_FIELD_MISSING, f"{at}.5", "ED data is missing")
    attachment: Json = {"contentType": _mime(rep.component(2), rep.component(3)), "data": encoded}
    title = obx.field(3).component(2)
    if title:
        attachment["title"] = title
    return attachment


def _pointer(obx: Segment) -> Json:
    """RP (OBX-5: 1 pointer, 2 application id, 3 type of data, 4 subtype) → Attachment with url."""
    rep = obx.field(5).first
    pointer, base = rep.component(1), rep.subcomponent(2, 2)
    url = pointer if _URI.match(pointer) or not _URI.match(base) else f"{base.rstrip('/')}/{pointer.lstrip('/')}"
    attachment: Json = {"contentType": _mime(rep.component(3), rep.component(4)), "url": url}
    title = obx.field(3).component(2)
    if title:
        attachment["title"] = title
    return attachment


def _mime(kind: str, subtype: str) -> str:
    """A MIME type from ED-2/RP-3 (table 0191) and ED-3/RP-4 (table 0291; often a MIME type already)."""
    if "/" in subtype:
        return subtype.lower()
    if not subtype:
        return "application/octet-stream"
    return f"{MIME_TYPES.get(kind.upper(), 'application')}/{subtype.lower()}"
