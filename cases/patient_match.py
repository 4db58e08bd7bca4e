"""Patient identity reconciliation: is a study's (or a report's) patient the order's patient?

An accession number or a Study Instance UID finds a study; it does not say whose it is
(accession numbers are reused across sites and years). Every linking path asks this module
before it links: the linking worker for a PACS answer or a pushed study
(``dicom_bridge.linking``), and the case rules for an original report (``cases.task``).
docs/image-linking.md ("Patient match") is the rule in prose.

The rule, by mode (``pacs[].patient_match`` in OVERREAD_CONFIG, ``strict`` by default):

``strict``
    1. Identifier: a DICOM Patient ID (0010,0020) with its Issuer of Patient ID (0010,0021), or an
       item of the Other Patient IDs Sequence (0010,1002), whose issuer the PACS's ``issuers``
       mapping names as a FHIR identifier system, equal to an identifier (system and value) of the
       order's Patient: a match. Two identities with an identifier of the same system and no
       common value: no match, whatever the demographics say.
    2. Else demographics: name, birth date and sex all known on both sides and equal (see
       :func:`name_key`; birth date exact to the day; sex M/F/O against gender male/female/other).
    3. Else (missing data on either side included): no match.
``identifier``
    Step 1 only: no identifier in common, no match.
``patient-id``
    Step 1, where the DICOM Patient ID also counts whatever its issuer (absent or unmapped): for a
    PACS that serves one identifier domain and sends no issuer. Then steps 2 and 3 as ``strict``.

Pure functions over FHIR JSON and pydicom Datasets; no database, no network.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from pydicom import Dataset

Mode = Literal["strict", "identifier", "patient-id"]
MODES: tuple[str, ...] = get_args(Mode)
#: DICOM Patient's Sex (0010,0040, PS3.3 C.7.1.1) → FHIR AdministrativeGender.
SEX = {"M": "male", "F": "female", "O": "other"}
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class MatchRule:
    """How one source's patients are reconciled: the mode and its DICOM issuer → FHIR system mapping."""

    mode: Mode = "strict"
    issuers: Mapping[str, str] = field(default_factory=dict)


#: The default: strict, no issuer mapped (identifiers then never match; demographics decide).
STRICT = MatchRule()


@dataclass(frozen=True)
class Identity:
    """A patient as one side knows it; ``shown`` is what a reason prints (attribute name, value)."""

    #: (FHIR identifier system, value); the system is None for a DICOM issuer absent or not mapped.
    identifiers: frozenset[tuple[str | None, str]] = frozenset()
    names: frozenset[tuple[str, ...]] = frozenset()  # each as :func:`name_key` makes it
    birth_date: str = ""  # YYYY-MM-DD, only when complete
    sex: str = ""  # a FHIR gender code
    shown: tuple[tuple[str, str], ...] = ()


def matches(order: Identity, other: Identity, mode: Mode = "strict") -> bool:
    """Whether ``other`` (a study's or a report's patient) is the order's patient under ``mode``."""
    ours = {(s, v) for s, v in order.identifiers if s}
    theirs = {(s, v) for s, v in other.identifiers if s}
    if ours & theirs:
        return True
    if mode == "patient-id" and {v for _, v in order.identifiers} & {v for s, v in other.identifiers if not s}:
        return True
    if {s for s, _ in ours} & {s for s, _ in theirs}:
        return False  # one identifier domain, different patients
    if mode == "identifier":
        return False
    return bool(
        order.birth_date
        and order.sex
        and order.birth_date == other.birth_date
        and order.sex == other.sex
        and order.names & other.names
    )


def of_patient(patient: Mapping[str, Any] | None, reference: str = "") -> Identity:
    """The identity of a FHIR R4 Patient (identifier, name, birthDate, gender)."""
    patient = patient or {}
    identifiers = [(i.get("system"), str(i["value"])) for i in patient.get("identifier", []) if i.get("value")]
    names = [n for n in patient.get("name", []) if isinstance(n, Mapping)]
    keys = {key for n in names if (key := name_key(_pn_components(n)))}
    birth = str(patient.get("birthDate", ""))
    gender = str(patient.get("gender", ""))
    shown = [("Patient", reference)] if reference else []
    shown += [("identifier", f"{s}|{v}" if s else v) for s, v in identifiers]
    shown += [("name", "^".join(_pn_components(names[0])).rstrip("^"))] if names else []
    shown += [("birthDate", birth), ("gender", gender)]
    return Identity(
        frozenset((s or None, v) for s, v in identifiers),
        frozenset(keys),
        birth if _FULL_DATE.fullmatch(birth) else "",
        gender if gender in SEX.values() else "",
        tuple((k, v) for k, v in shown if v),
    )


def of_dicom(ds: Dataset, issuers: Mapping[str, str]) -> Identity:
    """The identity of a DICOM Patient module (PS3.3 C.7.1.1), issuers mapped to FHIR systems."""
    patient_id, issuer = _text(ds, "PatientID"), _text(ds, "IssuerOfPatientID")
    identifiers = [(patient_id, issuer)] if patient_id else []
    for item in _items(ds, "OtherPatientIDsSequence"):
        if other := _text(item, "PatientID"):
            identifiers.append((other, _text(item, "IssuerOfPatientID")))
    name = str(_get(ds, "PatientName") or "").split("=")[0]  # the alphabetic component group (PS3.5 6.2.1)
    da = _text(ds, "PatientBirthDate").replace(".", "")  # ACR-NEMA dates had dots
    birth = f"{da[:4]}-{da[4:6]}-{da[6:]}" if re.fullmatch(r"\d{8}", da) else ""
    sex = _text(ds, "PatientSex").upper()
    shown = [("PatientID", patient_id), ("IssuerOfPatientID", issuer)]
    shown += [("OtherPatientID", f"{v} ({i})" if i else v) for v, i in identifiers[1:]]
    shown += [("PatientName", name), ("PatientBirthDate", da), ("PatientSex", sex)]
    key = name_key(name.split("^"))
    return Identity(
        frozenset((issuers.get(i) if i else None, v) for v, i in identifiers),
        frozenset([key] if key else []),
        birth,
        SEX.get(sex, ""),
        tuple((k, v) for k, v in shown if v),
    )


def name_key(components: Iterable[str]) -> tuple[str, ...]:
    """A person name as compared: family, given, middle (PS3.5 6.2.1 PN component order).

    Each component is Unicode NFC, case-folded, with runs of whitespace as one space and none at
    either end; trailing empty components are dropped, so ``DOE^JOHN^`` is ``Doe^John``. Prefix
    and suffix (components 4 and 5) are left out: titles are recorded too unevenly to tell
    patients apart, and what is left must still agree with the birth date and the sex.
    """
    parts = [_SPACES.sub(" ", unicodedata.normalize("NFC", c)).strip().casefold() for c in components][:3]
    while parts and not parts[-1]:
        parts.pop()
    return tuple(parts)


def _pn_components(name: Mapping[str, Any]) -> list[str]:
    """A FHIR HumanName as PN components: family, first given name, the other given names."""
    given = [str(g) for g in name.get("given", [])]
    return [str(name.get("family", "")), given[0] if given else "", " ".join(given[1:])]


_FULL_DATE = re.compile(r"\d{4}-\d\d-\d\d")


def _get(ds: Dataset, keyword: str) -> Any:
    try:  # a malformed value from a PACS is an unknown value, not a crash
        return ds.get(keyword)
    except (ValueError, TypeError):
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = _get(ds, keyword)
    return str(value).strip() if value is not None else ""


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = _get(ds, keyword)
    return [item for item in value if isinstance(item, Dataset)] if value else []
