"""A second-opinion DiagnosticReport → ORU^R01 (v2.5.1 by default, v2.3.1 when a destination asks).

Pure: the caller gathers the resources (``OruContext``; ``hl7_bridge.oru_context.load_context`` does it
from the store) and the message header values (``Envelope``); ``oru_r01`` returns ER7 text, segments
separated by CR. Every value is escaped with ``mappings.v2.escape`` (chapter 2.7: ``| ^ & ~ \\`` and line
breaks as ``\\.br\\``). The segment map and the choices are in ``docs/oru-r01.md``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote

from mappings.errors import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, TABLE_VALUE_NOT_FOUND, MappingError
from mappings.sender import AUTHORITY_PREFIX
from mappings.v2 import Encoding, escape

Json = dict[str, Any]

DISCREPANCY_SYSTEM = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"
RADPEER_SYSTEM = "https://overread.org/fhir/CodeSystem/radpeer"
DISCREPANCY_TYPE_SYSTEM = "https://overread.org/fhir/CodeSystem/discrepancy-type"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
#: R4 has no DiagnosticReport.note; the R5 element travels in its cross-version extension.
REPORT_NOTE_EXTENSION = "http://hl7.org/fhir/5.0/StructureDefinition/extension-DiagnosticReport.note"
SUPPORTED_VERSIONS = ("2.5.1", "2.3.1")

#: Local coding systems (HL7 table 0396 allows ``99zzz`` for local ones): OBX-3 codes are ``99OVR``,
#: the value codes of each Overread code system have their own name.
LOCAL_OBSERVATIONS = "99OVR"
LOCAL_SYSTEM_NAMES = {
    DISCREPANCY_SYSTEM: "99OVRD",
    RADPEER_SYSTEM: "99OVRRP",
    DISCREPANCY_TYPE_SYSTEM: "99OVRDT",
}
DISC_OBX3 = ("DISC", "Second opinion discrepancy", LOCAL_OBSERVATIONS)
RADPEER_OBX3 = ("RADPEER", "RADPEER score", LOCAL_OBSERVATIONS)
DISCREPANCY_TYPE_OBX3 = ("DTYPE", "Discrepancy type", LOCAL_OBSERVATIONS)
FINDING_OBX3 = ("FINDING", "Discrepancy finding", LOCAL_OBSERVATIONS)
IMPRESSION_OBX3 = ("19005-8", "Impression", "LN")
REPORT_OBX3 = ("18748-4", "Diagnostic imaging report", "LN")

#: Displays (as in conformance/CodeSystem-*.json) for codings sent without one; the coding's own display wins.
DISPLAYS = {
    DISCREPANCY_SYSTEM: {
        "agree": "Agree",
        "minor": "Minor discrepancy",
        "major": "Major discrepancy",
        "indeterminate": "Indeterminate",
    },
    RADPEER_SYSTEM: {
        "1": "Concur with interpretation",
        "2a": "Discrepancy in interpretation, not ordinarily expected to be made; unlikely clinically significant",
        "2b": "Discrepancy in interpretation, not ordinarily expected to be made; likely clinically significant",
        "3a": "Discrepancy in interpretation, should be made most of the time; unlikely clinically significant",
        "3b": "Discrepancy in interpretation, should be made most of the time; likely clinically significant",
    },
}

#: FHIR system → HL7 table 0396 name (the preferred name where the inbound map knows several).
SYSTEM_NAMES = {
    "http://loinc.org": "LN",
    "http://snomed.info/sct": "SCT",
    "http://hl7.org/fhir/sid/icd-10": "I10",
    "http://hl7.org/fhir/sid/icd-10-cm": "I10C",
    "http://hl7.org/fhir/sid/icd-9-cm": "I9CM",
    "http://www.ama-assn.org/go/cpt": "C4",
    "http://dicom.nema.org/resources/ontology/DCM": "DCM",
    "http://radlex.org": "RADLEX",
    "http://unitsofmeasure.org": "UCUM",
    **LOCAL_SYSTEM_NAMES,
}
_LOCAL_SYSTEM_PREFIX = "urn:overread:coding-system:"  # mappings.v2_datatypes.coding_system's local URNs
_V2_TABLE = re.compile(r"^http://terminology\.hl7\.org/CodeSystem/v2-(\d{4})$")

#: diagnostic-report-status → OBR-25 (table 0123), the reverse of the inbound ResultStatus map.
RESULT_STATUS = {
    "registered": "I",
    "partial": "A",
    "preliminary": "P",
    "final": "F",
    "amended": "C",
    "corrected": "C",
    "appended": "C",
    "cancelled": "X",
    "entered-in-error": "X",
}
#: diagnostic-report-status / observation-status → OBX-11 (table 0085).
OBSERVATION_STATUS = {
    "registered": "I",
    "partial": "P",
    "preliminary": "P",
    "final": "F",
    "amended": "C",
    "corrected": "C",
    "appended": "C",
    "cancelled": "X",
    "entered-in-error": "W",
}
GENDER = {"male": "M", "female": "F", "other": "O", "unknown": "U"}
NAME_USE = {"official": "L", "usual": "D", "maiden": "M", "nickname": "N", "anonymous": "A"}
# Encounter.class (v3 ActCode) → PV1-2 (table 0004), the reverse of encounter.ENCOUNTER_CLASS.
PATIENT_CLASS = {"EMER": "E", "IMP": "I", "AMB": "O", "PRENC": "P"}
# MIME top-level type → table 0191 type of referenced data.
DATA_TYPES = {"application": "AP", "text": "TEXT", "image": "IM", "audio": "AU", "video": "VIDEO"}

ENC = Encoding()
_FHIR_DATE_TIME = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


@dataclass(frozen=True)
class OruContext:
    """The resources one ORU^R01 is made of, as FHIR R4 JSON."""

    report: Json  # the DiagnosticReport being sent, at its current version
    order: Json  # the ServiceRequest it is basedOn
    patient: Json  # the Patient (subject)
    interpreter: Json | None = None  # Practitioner of resultsInterpreter[0], if resolvable
    findings: tuple[Json, ...] = ()  # Observations of report.result (discrepancy findings)
    encounter: Json | None = None  # for PV1, optional
    #: Practitioner of the order's requester, for ORC-12 / OBR-16 (EHRs route results by the ordering provider).
    requester: Json | None = None


@dataclass(frozen=True)
class Envelope:
    """What the message header says: who sends to whom, when, which message (MSH-10) in which version."""

    control_id: str  # MSH-10, fresh per message
    timestamp: datetime  # MSH-7 (aware)
    version: str = "2.5.1"  # or "2.3.1"
    sending_application: str = "OVERREAD"
    sending_facility: str = "OVERREAD"
    receiving_application: str = ""
    receiving_facility: str = ""
    # identifier system URI → assigning authority (the reverse of the inbound sender config); optional
    identifier_systems: Mapping[str, str] = field(default_factory=dict)


def oru_r01(context: OruContext, envelope: Envelope) -> str:
    """The ER7 text of the ORU^R01 for ``context`` (segments separated by CR, no trailing CR)."""
    if envelope.version not in SUPPORTED_VERSIONS:
        raise ValueError(f"HL7 version {envelope.version!r} is not one of {', '.join(SUPPORTED_VERSIONS)}")
    if not envelope.control_id:
        raise MappingError(REQUIRED_FIELD_MISSING, "MSH-10", "Message control id is missing")
    return "\r".join(_Writer(context, envelope).segments())


class _Writer:
    def __init__(self, context: OruContext, envelope: Envelope) -> None:
        self.ctx = context
        self.env = envelope
        self.v251 = envelope.version == "2.5.1"
        report_status = str(context.report.get("status", ""))
        if report_status not in RESULT_STATUS:
            raise MappingError(
                TABLE_VALUE_NOT_FOUND, "OBR-25", f"Report status {report_status!r} has no HL7 result status"
            )
        self.result_status = RESULT_STATUS[report_status]
        self.obx_status = OBSERVATION_STATUS[report_status]
        self.obx_count = 0
        self.sub_ids: dict[str, int] = {}

    def segments(self) -> Iterator[str]:
        yield self.msh()
        yield self.pid()
        if self.ctx.encounter:
            yield self.pv1(self.ctx.encounter)
        yield self.orc()
        yield self.obr()
        yield from _ntes(_report_notes(self.ctx.report))
        yield from self.coded(DISC_OBX3, DISCREPANCY_SYSTEM, required=True)
        yield from self.coded(RADPEER_OBX3, RADPEER_SYSTEM, required=False)
        conclusion = str(self.ctx.report.get("conclusion") or "")
        if conclusion.strip():
            code = _components(*map(_e, IMPRESSION_OBX3))
            yield from self.text(code, conclusion, self.next_sub_id(IMPRESSION_OBX3), self.obx_status)
        forms: list[Json] = self.ctx.report.get("presentedForm") or []
        for n, form in enumerate(forms, 1):
            yield from self.presented_form(form, f"presentedForm[{n - 1}]")
        for n, finding in enumerate(self.ctx.findings, 1):
            yield from self.finding(finding, str(n))

    # -- header, patient, order ---------------------------------------------------------

    def msh(self) -> str:
        env = self.env
        if env.timestamp.tzinfo is None or env.timestamp.utcoffset() is None:
            raise ValueError("Envelope.timestamp must be timezone-aware")
        message_type = _components("ORU", "R01", "ORU_R01" if self.v251 else "")
        fields = [
            "^~\\&",
            _e(env.sending_application),
            _e(env.sending_facility),
            _e(env.receiving_application),
            _e(env.receiving_facility),
            env.timestamp.strftime("%Y%m%d%H%M%S%z"),
            "",
            message_type,
            _e(env.control_id),
            "P",
            env.version,
            "",  # MSH-13 sequence number
            "",  # MSH-14 continuation pointer
            "",  # MSH-15/16 empty: original acknowledgment mode, the receiver answers with an ACK
            "",
            "",  # MSH-17 country
            "UNICODE UTF-8",
        ]
        return "MSH|" + _fields(fields)

    def pid(self) -> str:
        patient = self.ctx.patient
        identifiers = [self.cx(i) for i in patient.get("identifier") or [] if i.get("value")]
        if not identifiers:
            raise MappingError(REQUIRED_FIELD_MISSING, "PID-3", "The patient has no identifier")
        names = [_xpn(n) for n in patient.get("name") or []]
        fields = ["1", "", "~".join(identifiers), "", "~".join(n for n in names if n)]
        fields += ["", _dtm(patient.get("birthDate"), "PID-7"), GENDER.get(str(patient.get("gender", "")), "")]
        return _segment("PID", fields)

    def pv1(self, encounter: Json) -> str:
        klass = encounter.get("class") or {}
        code = str(klass.get("code", ""))
        patient_class = PATIENT_CLASS.get(code) or (code if "v2-0004" in str(klass.get("system", "")) else "U")
        visits = [self.cx(i) for i in encounter.get("identifier") or [] if i.get("value")]
        fields = ["1", patient_class] + [""] * 16 + [visits[0] if visits else ""]
        return _segment("PV1", fields)

    def order_numbers(self) -> tuple[str, str, str]:
        """(placer EI, filler EI, accession) from the order's identifiers typed PLAC, FILL, ACSN."""
        order = self.ctx.order
        identifiers: list[Json] = order.get("identifier") or []
        by_type: dict[str, Json] = {}
        for ident in identifiers:
            code = _type_code(ident)
            if code and ident.get("value"):
                by_type.setdefault(code, ident)
        placer = by_type.get("PLAC") or next(
            (i for i in identifiers if not i.get("type") and i.get("value") and i.get("system") != "urn:dicom:uid"),
            None,
        )
        filler = by_type.get("FILL")
        filler_ei = self.ei(filler) if filler else ""
        if not filler_ei and order.get("id"):
            # No filler number from the order: Overread fills it, its number is the ServiceRequest id.
            filler_ei = _components(_e(str(order["id"])), _e(self.env.sending_facility))
        accession = by_type.get("ACSN")
        return self.ei(placer) if placer else "", filler_ei, _e(str(accession["value"])) if accession else ""

    def orc(self) -> str:
        placer, filler, _ = self.order_numbers()
        fields = ["RE", placer, filler] + [""] * 9
        fields[11] = self.ordering_provider()  # ORC-12
        return _segment("ORC", fields)

    def ordering_provider(self) -> str:
        """ORC-12 / OBR-16 (XCN): id ^ family ^ given ^ further given ^ suffix ^ prefix ^^^ assigning authority."""
        practitioner = self.ctx.requester
        if practitioner is None:
            return ""
        ident, parts = _person(practitioner)
        authority = _join("&", [_e(p) for p in self.authority(str(ident.get("system", "")))]) if ident else ""
        return _components(*[_e(p) for p in parts], "", "", authority)

    def obr(self) -> str:
        report, order = self.ctx.report, self.ctx.order
        placer, filler, accession = self.order_numbers()
        if not placer and not filler:
            raise MappingError(REQUIRED_FIELD_MISSING, "OBR-3", "The order has no placer or filler number")
        code = order.get("code") or report.get("code")
        service = _cwe(code, self.v251) if code else ""
        if not service:
            raise MappingError(REQUIRED_FIELD_MISSING, "OBR-4", "The order has no code")
        period: Json = report.get("effectivePeriod") or {}
        start = _dtm(report.get("effectiveDateTime") or period.get("start"), "OBR-7")
        end = _dtm(period.get("end"), "OBR-8")
        fields = [""] * 32
        fields[0], fields[1], fields[2], fields[3] = "1", placer, filler, service
        fields[6], fields[7] = start, end
        fields[15] = self.ordering_provider()  # OBR-16
        fields[17] = accession  # OBR-18: where IHE SWF and the inbound order mapping keep the accession
        fields[21] = _dtm(report.get("issued"), "OBR-22")
        fields[23] = _e(_section(report))
        fields[24] = self.result_status
        fields[31] = self.interpreter()
        return _segment("OBR", fields)

    def interpreter(self) -> str:
        """OBR-32: CNN (2.5.1 NDL) or CN (2.3.1 CM) as subcomponents of the first component."""
        practitioner = self.ctx.interpreter
        if practitioner is None:
            refs: list[Json] = self.ctx.report.get("resultsInterpreter") or []
            display = str(refs[0].get("display", "")) if refs else ""
            return "&" + _e(display) if display else ""  # a name without an id: the family name subcomponent
        ident, parts = _person(practitioner)
        parts += ["", ""]
        namespace, universal, kind = self.authority(str(ident.get("system", ""))) if ident else ("", "", "")
        parts += [namespace, universal, kind] if self.v251 else [namespace or universal]
        return _join("&", [_e(p) for p in parts])

    # -- identifiers ----------------------------------------------------------------------

    def authority(self, system: str) -> tuple[str, str, str]:
        """An identifier system as an assigning authority (HD: namespace, universal id, its type).

        The reverse of ``SenderConfig.system_for``: the configured name for the system, else the OID
        of a ``urn:oid:`` system (ISO), else the namespace of ``urn:overread:assigning-authority:<ns>``;
        any other system is left out.
        """
        if system in self.env.identifier_systems:
            return self.env.identifier_systems[system], "", ""
        if system.startswith("urn:oid:"):
            return "", system.removeprefix("urn:oid:"), "ISO"
        if system.startswith(AUTHORITY_PREFIX):
            return unquote(system.removeprefix(AUTHORITY_PREFIX)), "", ""
        return "", "", ""

    def cx(self, identifier: Json) -> str:
        """Identifier → CX: value ^^^ assigning authority (HD in subcomponents) ^ type (table 0203)."""
        hd = _join("&", [_e(p) for p in self.authority(str(identifier.get("system", "")))])
        type_code = _type_code(identifier)
        return _components(_e(str(identifier["value"])), "", "", hd, _e(type_code))

    def ei(self, identifier: Json) -> str:
        """Identifier → EI: value ^ namespace ^ universal id ^ its type."""
        namespace, universal, kind = self.authority(str(identifier.get("system", "")))
        return _components(_e(str(identifier["value"])), _e(namespace), _e(universal), _e(kind))

    # -- observations -----------------------------------------------------------------------

    def next_sub_id(self, obx3: tuple[str, str, str]) -> str:
        self.sub_ids[obx3[0]] = self.sub_ids.get(obx3[0], 0) + 1
        return str(self.sub_ids[obx3[0]])

    def obx(self, value_type: str, obx3: str, sub_id: str, value: str, status: str) -> str:
        self.obx_count += 1
        fields = [str(self.obx_count), value_type, obx3, sub_id, value, "", "", "", "", "", status]
        return _segment("OBX", fields)

    @property
    def coded_type(self) -> str:
        return "CWE" if self.v251 else "CE"  # v2.3.1 has no CWE; CE-1..3 are CWE-1..3

    def coded(self, obx3: tuple[str, str, str], system: str, required: bool) -> Iterator[str]:
        """The report's conclusionCode of ``system`` as a coded OBX (DISC, RADPEER)."""
        coding = _coding_of(self.ctx.report.get("conclusionCode") or [], system)
        if coding is None:
            if required:
                raise MappingError(
                    REQUIRED_FIELD_MISSING, "OBX-5", f"The report has no conclusionCode of {system} (discrepancy)"
                )
            return
        yield self.obx(self.coded_type, _components(*map(_e, obx3)), "", _coding_cwe(coding), self.obx_status)

    def text(self, code: str, text: str, sub_id: str, status: str) -> Iterator[str]:
        """Narrative under OBX-3 ``code``: v2.5.1 one FT OBX (line breaks as \\.br\\); v2.3.1 one TX OBX per
        line (same sub-ID)."""
        lines = text.replace("\r\n", "\n").replace("\r", "\n").strip("\n")
        if self.v251:
            yield self.obx("FT", code, sub_id, _e(lines), status)
            return
        for line in lines.split("\n"):
            yield self.obx("TX", code, sub_id, _e(line), status)

    def presented_form(self, form: Json, at: str) -> Iterator[str]:
        content_type = str(form.get("contentType") or "application/octet-stream")
        mime, _, params = content_type.partition(";")
        mime = mime.strip().lower()
        data = re.sub(r"\s+", "", str(form.get("data") or ""))
        if data and mime == "text/plain":
            charset = _charset(params)
            try:
                text = base64.b64decode(data, validate=True).decode(charset, errors="replace")
            except (binascii.Error, ValueError, LookupError) as exc:
                raise MappingError(DATA_TYPE_ERROR, at, f"presentedForm data is not Base64 text: {exc}") from exc
            if text.strip():
                code = _components(*map(_e, REPORT_OBX3))
                yield from self.text(code, text, self.next_sub_id(REPORT_OBX3), self.obx_status)
            return
        top, _, subtype = mime.partition("/")
        kind, sub = DATA_TYPES.get(top, "AP"), (subtype or "octet-stream").upper()
        code = _components(*map(_e, REPORT_OBX3))
        if data:
            value = _components("", kind, _e(sub), "Base64", _e(data))
            yield self.obx("ED", code, self.next_sub_id(REPORT_OBX3), value, self.obx_status)
        elif form.get("url"):
            pointer = _components(_e(str(form["url"])), _e(self.env.sending_application), kind, _e(sub))
            yield self.obx("RP", code, self.next_sub_id(REPORT_OBX3), pointer, self.obx_status)

    def finding(self, observation: Json, sub_id: str) -> Iterator[str]:
        """One discrepancy finding (an Observation): its OBX lines share ``sub_id``; its notes follow as NTE."""
        status = OBSERVATION_STATUS.get(str(observation.get("status", "")), self.obx_status)
        dtype = _discrepancy_type(observation)
        code: Json | None = observation.get("code")
        code_is_type = code is not None and _coding_of([code], DISCREPANCY_TYPE_SYSTEM) is not None
        obx3 = _cwe(code, self.v251) if code and not code_is_type else ""
        obx3 = obx3 or _components(*map(_e, FINDING_OBX3))
        if dtype is not None:
            type_code = _components(*map(_e, DISCREPANCY_TYPE_OBX3))
            yield self.obx(self.coded_type, type_code, sub_id, _coding_cwe(dtype), status)
        value: Json | None = observation.get("valueCodeableConcept")
        if value and _coding_of([value], DISCREPANCY_TYPE_SYSTEM) is None:
            yield self.obx(self.coded_type, obx3, sub_id, _cwe(value, self.v251), status)
        text = observation.get("valueString")
        if isinstance(text, str) and text.strip():
            yield from self.text(obx3, text, sub_id, status)
        yield from _ntes([str(n.get("text", "")) for n in observation.get("note") or []])


# -- helpers ----------------------------------------------------------------------------------


def _person(practitioner: Json) -> tuple[Json, list[str]]:
    """A Practitioner's first identifier and the XCN/CNN person components: id, family, given, further
    given, suffix, prefix (the official name, else the first)."""
    idents: list[Json] = [i for i in practitioner.get("identifier") or [] if i.get("value")]
    ident = idents[0] if idents else {}
    names: list[Json] = practitioner.get("name") or []
    name = next((n for n in names if n.get("use") == "official"), names[0] if names else {})
    given: list[str] = name.get("given") or []
    parts = [
        str(ident.get("value", "")),
        str(name.get("family", "")),
        given[0] if given else "",
        " ".join(given[1:]),
        " ".join(name.get("suffix") or []),
        " ".join(name.get("prefix") or []),
    ]
    return ident, parts


def _e(text: str) -> str:
    return escape(text, ENC)


def _join(sep: str, parts: Sequence[str]) -> str:
    """Join already-encoded parts, leaving out trailing empty ones."""
    items = list(parts)
    while items and items[-1] == "":
        items.pop()
    return sep.join(items)


def _components(*parts: str) -> str:
    return _join("^", parts)


def _fields(fields: Sequence[str]) -> str:
    return _join("|", fields)


def _segment(name: str, fields: Sequence[str]) -> str:
    return _join("|", [name, *fields])


def _ntes(texts: Sequence[str]) -> Iterator[str]:
    """NTE-1 set id, NTE-2 source L (ancillary / filler), NTE-3 the comment (FT: line breaks as \\.br\\)."""
    for n, text in enumerate((t for t in texts if t.strip()), 1):
        yield _segment("NTE", [str(n), "L", _e(text.replace("\r\n", "\n").strip("\n"))])


def _report_notes(report: Json) -> list[str]:
    extensions: list[Json] = report.get("extension") or []
    notes = [e.get("valueAnnotation") or {} for e in extensions if e.get("url") == REPORT_NOTE_EXTENSION]
    return [str(n.get("text", "")) for n in notes]


def _type_code(identifier: Json) -> str:
    codings: list[Json] = (identifier.get("type") or {}).get("coding") or []
    for coding in codings:
        if coding.get("system") in (V2_0203, None) and coding.get("code"):
            return str(coding["code"])
    return ""


def _system_name(system: str) -> str:
    """A FHIR code system URI as an HL7 table 0396 name (the inbound ``coding_system`` reversed), else L."""
    if system in SYSTEM_NAMES:
        return SYSTEM_NAMES[system]
    if system.startswith(_LOCAL_SYSTEM_PREFIX):
        return system.removeprefix(_LOCAL_SYSTEM_PREFIX)
    table = _V2_TABLE.match(system)
    if table:
        return f"HL7{table.group(1)}"
    return "L"


def _coding_parts(coding: Json) -> list[str]:
    """A Coding as the three escaped CWE components: code, display (else a known one), system name."""
    system = str(coding.get("system", ""))
    code = str(coding.get("code", ""))
    display = str(coding.get("display") or DISPLAYS.get(system, {}).get(code, ""))
    return [_e(code), _e(display), _e(_system_name(system)) if system else ""]


def _coding_cwe(coding: Json) -> str:
    return _components(*_coding_parts(coding))


def _cwe(concept: Json, v251: bool) -> str:
    """CodeableConcept → CWE (2.5.1) / CE (2.3.1): the first two codings, CWE-9 the text (2.5.1)."""
    codings: list[Json] = [c for c in concept.get("coding") or [] if c.get("code")]
    text = str(concept.get("text") or "")
    if not codings:
        return _components("", _e(text)) if text else ""
    parts = _coding_parts(codings[0])
    if len(codings) > 1:
        parts += _coding_parts(codings[1])
    if v251 and text and text != codings[0].get("display"):
        parts += [""] * (8 - len(parts)) + [_e(text)]
    return _components(*parts)


def _coding_of(concepts: Sequence[Json], system: str) -> Json | None:
    for concept in concepts:
        for coding in concept.get("coding") or []:
            if coding.get("system") == system and coding.get("code"):
                return dict(coding)
    return None


def _discrepancy_type(observation: Json) -> Json | None:
    """The finding's discrepancy-type coding, wherever the reader put it (component, value, code, category)."""
    places: list[Json] = []
    for component in observation.get("component") or []:
        places += [component.get("valueCodeableConcept") or {}, component.get("code") or {}]
    places += [observation.get("valueCodeableConcept") or {}, observation.get("code") or {}]
    places += list(observation.get("category") or []) + list(observation.get("interpretation") or [])
    return _coding_of(places, DISCREPANCY_TYPE_SYSTEM)


def _section(report: Json) -> str:
    """OBR-24 diagnostic service section (table 0074) from the report's category; RAD by default."""
    for category in report.get("category") or []:
        for coding in category.get("coding") or []:
            if coding.get("system") == V2_0074 and coding.get("code"):
                return str(coding["code"])
    return "RAD"


def _xpn(name: Json) -> str:
    """HumanName → XPN: family ^ given ^ further given ^ suffix ^ prefix ^^ name type (table 0200)."""
    given: list[str] = name.get("given") or []
    parts = [
        str(name.get("family", "")),
        given[0] if given else "",
        " ".join(given[1:]),
        " ".join(name.get("suffix") or []),
        " ".join(name.get("prefix") or []),
        "",
        NAME_USE.get(str(name.get("use", "")), ""),
    ]
    if not any(parts) and name.get("text"):
        parts[0] = str(name["text"])
    return _components(*map(_e, parts))


def _charset(params: str) -> str:
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "utf-8"


def _dtm(value: object, location: str) -> str:
    """FHIR date / dateTime / instant → DTM, keeping the precision (fraction to 4 digits, offset +HHMM)."""
    if not value:
        return ""
    m = _FHIR_DATE_TIME.match(str(value))
    if not m:
        raise MappingError(DATA_TYPE_ERROR, location, f"{value!r} is not a FHIR date/time")
    digits = "".join(g for g in m.groups()[:6] if g)
    fraction = (m.group(7) or "")[:5]
    zone = m.group(8) or ""
    offset = "+0000" if zone == "Z" else zone.replace(":", "")
    return digits + fraction + offset
