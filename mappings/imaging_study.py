"""DICOM query results → FHIR R4 ImagingStudy (a pure mapping: datasets in, JSON out).

The input is what a Study Root query answers (PS3.4 C.6.2: study, series and
composite-instance levels), already de-duplicated and grouped by the caller
(``dicom_bridge``): one :class:`Study` with its :class:`Series` and their instances.
The output follows the DICOM mapping table of R4 ImagingStudy
(https://hl7.org/fhir/R4/imagingstudy.html#mappings); the attributes are those of PS3.3 C.7.2.1
(General Study), C.7.3.1 (General Series) and C.12.1 (SOP Common) as ``dicom_bridge.keys`` asks for them.

Text is decoded by pydicom from each answer's own SpecificCharacterSet (0008,0005) when a value is
read; the mapping never calls ``Dataset.decode()`` because that would change the caller's datasets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

Json = dict[str, Any]

DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
#: Coding Scheme Designators (PS3.16 Section 8) → FHIR system URIs (R4 terminologies page).
#: Any other designator becomes ``urn:dicom:coding-scheme:<designator>``: a stable local URI, because the
#: designator alone does not name a registered system and guessing an OID would be wrong.
SYSTEMS = {"DCM": DCM, "LN": "http://loinc.org", "SCT": SCT, "SRT": SCT, "RADLEX": "http://www.radlex.org"}
#: Body Part Examined defined terms → SNOMED CT, per PS3.16 Annex L (Table L-1 / CID 4031).
BODY_PARTS = {
    "ABDOMEN": ("818981001", "Abdomen"), "ABDOMENPELVIS": ("818982008", "Abdomen and Pelvis"),
    "ANKLE": ("344001", "Ankle"), "BRAIN": ("12738006", "Brain"), "BREAST": ("76752008", "Breast"),
    "CHEST": ("43799004", "Chest"), "CSPINE": ("122494005", "Cervical spine"), "ELBOW": ("16953009", "Elbow"),
    "FOOT": ("56459004", "Foot"), "HAND": ("85562004", "Hand"), "HEAD": ("69536005", "Head"),
    "HEART": ("80891009", "Heart"), "HIP": ("29836001", "Hip"), "KNEE": ("72696002", "Knee"),
    "LSPINE": ("122496007", "Lumbar spine"), "NECK": ("45048000", "Neck"), "PELVIS": ("816092008", "Pelvis"),
    "SHOULDER": ("16982005", "Shoulder"), "SKULL": ("89546000", "Skull"), "SPINE": ("421060004", "Spine"),
    "TSPINE": ("122495006", "Thoracic spine"), "WHOLEBODY": ("38266002", "Entire body"),
    "WRIST": ("74670003", "Wrist"),
}  # fmt: skip
#: Laterality (0020,0060) → SNOMED CT, the codes of the R4 example binding (bodysite-laterality).
LATERALITY = {"R": ("24028007", "Right"), "L": ("7771000", "Left"), "B": ("51440002", "Right and left")}
OFFSET = re.compile(r"^([+-])(\d\d)(\d\d)$")


@dataclass
class Series:
    """A series-level C-FIND / QIDO-RS answer and the instance-level answers under it."""

    dataset: Dataset
    instances: list[Dataset] = field(default_factory=list)


@dataclass
class Study:
    """A study-level answer and its series."""

    dataset: Dataset
    series: list[Series] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return str(self.dataset.StudyInstanceUID)


def imaging_study(
    study: Study, *, subject: str, based_on: Sequence[str], endpoints: Sequence[str] = (), tz: str | None = None
) -> Json:
    """The R4 ImagingStudy (without ``id``) of ``study``; empty elements are omitted, as FHIR requires.

    ``subject`` is a Patient reference, ``based_on`` ServiceRequest references and ``endpoints`` Endpoint
    references (order kept, duplicates dropped). Series are sorted by SeriesNumber then UID, instances by
    InstanceNumber then UID, so one study always maps to the same JSON.

    ``started`` (study and series): a FHIR dateTime with a time needs a UTC offset, and DICOM dates and
    times are local. The offset comes from TimezoneOffsetFromUTC (0008,0201) of the answer (series, then
    study), else from ``tz`` (an IANA zone name, e.g. ``"Europe/Berlin"``, applied with its DST rules);
    without either the date alone is given, never a made-up offset (an unknown ``tz`` raises
    ZoneInfoNotFoundError: it is a configuration error). A time without seconds is padded
    with zeros (FHIR has no minute precision); fractions of a second are kept.

    Counts come from NumberOfStudyRelatedSeries/-Instances and NumberOfSeriesRelatedInstances (PS3.4
    C.3.4) when present and well formed, else are counted from the tree (not when nothing was listed).
    Malformed numbers are dropped. Raises ValueError when a value the R4 ImagingStudy requires
    (StudyInstanceUID, series uid and modality, instance uid and SOP class) is missing.
    """
    ds = study.dataset
    uid = _text(ds, "StudyInstanceUID")
    if not uid:
        raise ValueError("the study-level answer has no StudyInstanceUID")
    identifiers: list[Json] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}]
    if accession := _text(ds, "AccessionNumber"):
        identifiers.append({"type": {"coding": [{"system": V2_0203, "code": "ACSN"}]}, "value": accession})
    series = sorted((_series(s, ds, tz) for s in study.series), key=_order)
    modalities = _strings(ds, "ModalitiesInStudy") or [s["modality"]["code"] for s in series]
    referrer = _name(ds, "ReferringPhysicianName")
    counted = [s.get("numberOfInstances") for s in series]
    counted_total = sum(n for n in counted if n is not None) if series and None not in counted else None
    return _compact(
        {
            "resourceType": "ImagingStudy",
            "identifier": identifiers,
            "status": "available",
            "modality": [{"system": DCM, "code": m} for m in dict.fromkeys(modalities)],
            "subject": {"reference": subject},
            "started": _started(ds, "StudyDate", "StudyTime", [ds], tz),
            "basedOn": [{"reference": r} for r in dict.fromkeys(based_on)],
            "referrer": {"display": referrer} if referrer else None,
            "endpoint": [{"reference": r} for r in dict.fromkeys(endpoints)],
            "numberOfSeries": _number(ds, "NumberOfStudyRelatedSeries", len(series) if series else None),
            "numberOfInstances": _number(ds, "NumberOfStudyRelatedInstances", counted_total),
            "procedureCode": [{"coding": [c]} for c in map(_coding, _value(ds, "ProcedureCodeSequence") or []) if c],
            "description": _text(ds, "StudyDescription"),
            "series": series,
        }
    )


def _series(series: Series, study: Dataset, tz: str | None) -> Json:
    """ImagingStudy.series from a series-level answer (PS3.3 C.7.3.1) and its instances (C.12.1)."""
    ds = series.dataset
    uid, modality = _text(ds, "SeriesInstanceUID"), _text(ds, "Modality")
    if not uid or not modality:
        raise ValueError(f"a series-level answer lacks SeriesInstanceUID or Modality (series {uid!r})")
    instances = sorted((_instance(i) for i in series.instances), key=_order)
    body_part = _text(ds, "BodyPartExamined")
    laterality = LATERALITY.get(_text(ds, "Laterality") or "")
    return _compact(
        {
            "uid": uid,
            "number": _number(ds, "SeriesNumber"),
            "modality": {"system": DCM, "code": modality},
            "description": _text(ds, "SeriesDescription"),
            "numberOfInstances": _number(ds, "NumberOfSeriesRelatedInstances", len(instances) if instances else None),
            "bodySite": _body_site(body_part) if body_part else None,
            "laterality": {"system": SCT, "code": laterality[0], "display": laterality[1]} if laterality else None,
            "started": _started(ds, "SeriesDate", "SeriesTime", [ds, study], tz),
            "instance": instances,
        }
    )


def _instance(ds: Dataset) -> Json:
    uid, sop_class = _text(ds, "SOPInstanceUID"), _text(ds, "SOPClassUID")
    if not uid or not sop_class:
        raise ValueError(f"an instance-level answer lacks SOPInstanceUID or SOPClassUID (instance {uid!r})")
    return _compact(
        {
            "uid": uid,
            # R4 binds sopClass to the DICOM UID registry, which FHIR names by RFC 3986 URIs.
            "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{sop_class}"},
            "number": _number(ds, "InstanceNumber"),
            "title": _text(ds, "ContentLabel"),
        }
    )


def _order(element: Json) -> tuple[bool, int, str]:
    number = element.get("number")
    return (number is None, number or 0, element["uid"])


def _body_site(term: str) -> Json:
    # Terms outside the table keep their text rather than being forced into a wrong SNOMED code.
    known = BODY_PARTS.get(term.upper())
    return {"system": SCT, "code": known[0], "display": known[1]} if known else {"display": term}


def _coding(item: Dataset) -> Json | None:
    """A Code Sequence item (PS3.3 8.8: CodeValue or LongCodeValue, CodingSchemeDesignator, CodeMeaning)."""
    code = _text(item, "CodeValue") or _text(item, "LongCodeValue")
    designator = _text(item, "CodingSchemeDesignator")
    if not code:
        return None
    system = SYSTEMS.get(designator.upper(), f"urn:dicom:coding-scheme:{designator}") if designator else None
    return _compact({"system": system, "code": code, "display": _text(item, "CodeMeaning")})


def _started(ds: Dataset, date_key: str, time_key: str, offset_from: list[Dataset], tz: str | None) -> str | None:
    """DA + TM (PS3.5 6.2, with the pre-1993 ``.``/``:`` separators tolerated) as a FHIR dateTime."""
    da = re.sub(r"[.\-]", "", _text(ds, date_key) or "")
    if not re.fullmatch(r"\d{8}", da):
        return None
    try:
        day = date(int(da[:4]), int(da[4:6]), int(da[6:]))
    except ValueError:
        return None
    tm = (_text(ds, time_key) or "").replace(":", "")
    match = re.fullmatch(r"(\d\d)(\d\d)?(\d\d)?(\.\d{1,6})?", tm)
    if not match or int(match[1]) > 23 or int(match[2] or 0) > 59 or int(match[3] or 0) > 60:
        return day.isoformat()
    hh, mm, ss = int(match[1]), int(match[2] or 0), int(match[3] or 0)
    offset = next((o for o in map(_offset, offset_from) if o), None)
    if offset is None and tz is not None:
        zone = datetime(day.year, day.month, day.day, hh, mm, min(ss, 59), tzinfo=ZoneInfo(tz)).strftime("%z")
        offset = f"{zone[:3]}:{zone[3:5]}"
    if offset is None:
        return day.isoformat()
    return f"{day.isoformat()}T{hh:02d}:{mm:02d}:{ss:02d}{match[4] or ''}{offset}"


def _offset(ds: Dataset) -> str | None:
    # The FHIR dateTime pattern allows offsets from -14:00 to +14:00 only.
    match = OFFSET.fullmatch(_text(ds, "TimezoneOffsetFromUTC") or "")
    return f"{match[1]}{match[2]}:{match[3]}" if match and match[2] + match[3] <= "1400" and match[3] < "60" else None


def _name(ds: Dataset, keyword: str) -> str | None:
    """A PN as "Prefix Given Middle Family Suffix" from its first non-empty component group (PS3.5 6.2.1)."""
    value = _value(ds, keyword)
    value = value[0] if isinstance(value, MultiValue) and value else value  # VM 1 is expected
    if not value:
        return None
    for group in value.components if isinstance(value, PersonName) else (str(value),):
        family, given, middle, prefix, suffix = (group.split("^") + [""] * 5)[:5]
        if text := " ".join(p.strip() for p in (prefix, given, middle, family, suffix) if p.strip()):
            return text
    return None


def _value(ds: Dataset, keyword: str) -> Any:
    # A malformed value from a PACS must not abort the whole mapping: pydicom may raise on conversion.
    try:
        return ds.get(keyword)
    except (ValueError, TypeError):
        return None


def _strings(ds: Dataset, keyword: str) -> list[str]:
    value = _value(ds, keyword)
    values: Iterable[Any] = [] if value is None else value if isinstance(value, MultiValue | list) else [value]
    return [text for v in values if (text := str(getattr(v, "original_string", v)).strip())]


def _text(ds: Dataset, keyword: str) -> str | None:
    # Joined with "\" because a stray backslash splits a single-valued string into a MultiValue.
    return "\\".join(_strings(ds, keyword)) or None


def _number(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    """An IS value (str, pydicom IS or int) as an int ≥ 0; malformed or negative values give ``default``."""
    text = _text(ds, keyword)
    try:
        decimal = float(text) if text is not None else None  # "2.0" is a valid IS in pydicom's eyes
    except ValueError:
        decimal = None
    number = int(decimal) if decimal is not None and decimal.is_integer() else None
    return number if number is not None and number >= 0 else default


def _compact(element: Json) -> Json:
    # FHIR forbids empty strings, arrays and objects; None marks "not known".
    return {k: v for k, v in element.items() if v not in (None, "", [], {})}
