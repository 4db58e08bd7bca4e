"""Real messages map as the sender meant them (issue 18): HL7 null, free text with unescaped delimiters,
formatting escapes, impossible dates. The golden files hold the whole Bundles; these tests name what
each case must show."""

import base64
import json
import re
from typing import Any

import pytest

from mappings.errors import DATA_TYPE_ERROR, MappingError
from mappings.orders import map_message
from mappings.v2 import MAX_FORMAT_COUNT, parse
from tests.hl7_golden import GOLDEN, outcome


def _resources(bundle: dict[str, Any], rtype: str) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_hl7_null_is_no_value_in_every_data_type():
    bundle = outcome(GOLDEN / "orm_hl7_null.hl7")
    text = json.dumps(bundle)
    assert '\\"\\"' not in text  # no literal "" anywhere
    (patient,) = _resources(bundle, "Patient")
    # CX repetition, XPN components, DTM birth date, IS sex, XAD: absent, not "" nor gender unknown.
    assert [i["value"] for i in patient["identifier"]] == ["P-50"]
    assert patient["name"] == [{"family": "Doe"}]
    assert not {"birthDate", "gender", "address"} & patient.keys()
    (order,) = _resources(bundle, "ServiceRequest")
    # EI filler and ST accession: no identifier; DTM ORC-9: MSH-7 instead, not an error.
    assert [i["type"]["coding"][0]["code"] for i in order["identifier"]] == ["PLAC"]
    assert order["authoredOn"] == "2025-03-03T09:00:00+00:00"
    # XCN with a null id: a named, contained requester, never a shared Practitioner with id "".
    assert _resources(bundle, "Practitioner") == []
    assert order["contained"][0]["name"] == [{"family": "Ward", "given": ["Anna"]}]
    assert not {"priority", "reasonCode", "note"} & order.keys()  # ID in ORC-7.6, CWE OBR-31, NTE-3
    (encounter,) = _resources(bundle, "Encounter")
    assert not {"participant", "identifier"} & encounter.keys()  # all-null PV1-8 XCN, PV1-19 CX
    (coverage,) = _resources(bundle, "Coverage")
    assert not {"identifier", "class"} & coverage.keys()  # IN1-36 ST, IN1-2 CWE


def test_free_text_keeps_unescaped_delimiters_and_renders_formatting():
    (order,) = _resources(outcome(GOLDEN / "orm_free_text_formatting.hl7"), "ServiceRequest")
    assert [n["text"] for n in order["note"]] == [
        "BP 120^80 at triage",
        "R&L knee compare",
        # .sp: the line ends and one is skipped; .in 4 / .sk 2: spaces; .sp 2: two skipped; .fi: nothing;
        # \Zxx\ (locally defined) has no meaning here and is kept as sent.
        "History:\n\n    fell from ladder  (2 m)\n\n\nAsk for \\Zoverread\\ views",
    ]


@pytest.mark.parametrize(
    ("escape", "text"),
    [
        ("\\.sp\\", "a\n\nb"),
        ("\\.sp 0\\", "a\nb"),
        ("\\.ce\\", "a\nb"),
        ("\\.nf\\", "ab"),
        ("\\.ti -2\\", "ab"),
        ("\\.in +3\\", "a   b"),
        ("\\.sp 999999\\", "a" + "\n" * (MAX_FORMAT_COUNT + 1) + "b"),
        ("\\.sp x\\", "a\\.sp x\\b"),
        ("\\Cxxyy\\", "a\\Cxxyy\\b"),
    ],
)
def test_formatting_escapes(escape: str, text: str):
    msg = parse(f"MSH|^~\\&|A|B|C|D|20250101||ORM^O01|1|P|2.5.1\rNTE|1||a{escape}b")
    assert msg.segments("NTE")[0].field(3).value == text


@pytest.mark.parametrize(
    ("segment", "location"),
    [
        ("PID|||P-1^^^H^MR||Doe^Jo||19800230", "PID-7"),  # day precision: once passed, failed at the store
        ("PID|||P-1^^^H^MR||Doe^Jo||198013", "PID-7"),
        ("PID|||P-1^^^H^MR||Doe^Jo||1980022812+2500", "PID-7"),
    ],
)
def test_impossible_dates_are_refused_at_mapping_with_their_location(segment: str, location: str):
    msg = parse(f"MSH|^~\\&|RIS|H|O|O|20250101||ORM^O01|1|P|2.5.1\r{segment}\rORC|NW|PL-1\rOBR|1|PL-1||X^X^L")
    with pytest.raises(MappingError) as caught:
        map_message(msg)
    assert (caught.value.code, caught.value.location) == (DATA_TYPE_ERROR, location)
    assert outcome(GOLDEN / "orm_impossible_order_date.hl7")["error"]["location"] == "ORC-9"


def _order(orc: str, obr: str, tq1: str = "") -> dict[str, Any]:
    segments = ["MSH|^~\\&|RIS|H|O|O|20250101||ORM^O01|1|P|2.5.1", "PID|||P-1^^^H^MR||Doe^Jo", orc]
    segments += [tq1] if tq1 else []
    (order,) = _resources(map_message(parse("\r".join([*segments, obr]))), "ServiceRequest")
    return order


@pytest.mark.parametrize(
    ("orc", "tq1", "obr", "priority"),
    [
        ("ORC|NW|PL-1", "", "OBR|1|PL-1||X^X^L|||||||||||||||||||||||^^^^^S", "stat"),  # OBR-27.6
        ("ORC|NW|PL-1", "", "OBR|1|PL-1||X^X^L|A", "asap"),  # OBR-5
        ("ORC|NW|PL-1|||||^^^^^PRN", "", "OBR|1|PL-1||X^X^L|S", "stat"),  # PRN has no peer: OBR-5 still counts
        ("ORC|NW|PL-1|||||^^^^^R", "TQ1|1||||||||S", "OBR|1|PL-1||X^X^L", "stat"),  # TQ1-9 first
        ("ORC|NW|PL-1|||||^^^^^A", "", "OBR|1|PL-1||X^X^L|R|||||||||||||||||||||||^^^^^S", "asap"),  # ORC-7 first
    ],
)
def test_priority_from_every_place_the_standard_carries_it(orc: str, tq1: str, obr: str, priority: str):
    assert _order(orc, obr, tq1)["priority"] == priority


def test_occurrence_from_tq1_orc7_obr27_else_obr6():
    obr6 = "OBR|1|PL-1||X^X^L||20250102"
    assert _order("ORC|NW|PL-1", obr6)["occurrenceDateTime"] == "2025-01-02"
    orc7 = _order("ORC|NW|PL-1|||||^^^20250103^20250104", obr6)
    assert orc7["occurrencePeriod"] == {"start": "2025-01-03", "end": "2025-01-04"}
    tq1 = _order("ORC|NW|PL-1|||||^^^20250103", obr6, "TQ1|1||||||20250105|20250106")
    assert tq1["occurrencePeriod"] == {"start": "2025-01-05", "end": "2025-01-06"}


def test_order_context_reaches_the_second_reader():
    bundle = outcome(GOLDEN / "orm_order_context.hl7")
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    (order,) = _resources(bundle, "ServiceRequest")
    reasons = [by_url[r["reference"]] for r in order["reasonReference"]]
    # DG1 at visit level and in the order; the indication the order carries only in DG1 arrives.
    assert [c["code"]["coding"][0]["code"] for c in reasons] == ["R52", "S82.6"]
    assert {c["category"][0]["coding"][0]["code"] for c in reasons} == {"encounter-diagnosis"}
    (encounter,) = _resources(bundle, "Encounter")
    assert [d["condition"] for d in encounter["diagnosis"]] == order["reasonReference"]
    info = [by_url[r["reference"]] for r in order["supportingInfo"]]
    assert info[0]["valueString"] == "Fall from stairs, swelling lateral malleolus"  # OBR-13
    assert info[1]["valueQuantity"] == {
        "value": 62.5,
        "unit": "kilogram",
        "system": "http://unitsofmeasure.org",
        "code": "kg",
    }
    assert info[2]["valueCodeableConcept"]["coding"][0]["display"] == "Pregnant"
    assert info[2]["note"] == [{"text": "Week 12^confirmed by LMP"}]  # the NTE after that OBX, whole
    assert "note" not in order  # an NTE after an OBX annotates the observation, not the order
    contrast = _resources(bundle, "AllergyIntolerance")[0]
    assert (contrast["category"], contrast["criticality"]) == (["medication"], "high")
    assert contrast["reaction"] == [{"manifestation": [{"text": "Hives"}, {"text": "Dyspnoea"}], "severity": "severe"}]


def test_a_document_in_an_order_is_no_original_report():
    bundle = outcome(GOLDEN / "orm_document_not_report.hl7")
    assert _resources(bundle, "DiagnosticReport") == []  # no report fabricated from a referral letter
    (document,) = _resources(bundle, "DocumentReference")
    (order,) = _resources(bundle, "ServiceRequest")
    url = next(e["fullUrl"] for e in bundle["entry"] if e["resource"] is document)
    assert order["supportingInfo"] == [{"reference": url}]
    assert "conclusion" not in document
    assert document["type"]["coding"][0]["code"] == "57133-1"
    (content,) = document["content"]
    text = base64.b64decode(content["attachment"]["data"]).decode()
    assert text == "Knee pain for 3 months^ please compare R&L\nPatient prefers afternoon slots"
    # The same lines named as a report (OBX-3 a report code) or with a result status are the original.
    reports = _resources(outcome(GOLDEN / "orm_original_report.hl7"), "DiagnosticReport")
    assert [r["meta"]["tag"][0]["code"] for r in reports] == ["original"]


def test_an_oru_honours_the_senders_accession_field_and_keeps_the_study_uid_from_obx():
    (report,) = _resources(outcome(GOLDEN / "oru_accession_obr20_override.hl7"), "DiagnosticReport")
    acsn = [i["value"] for i in report["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
    assert acsn == ["ACC-400"]  # OBR-20, as the sender's entry says; OBR-18 is empty
    study = {"system": "urn:dicom:uid", "value": "urn:oid:1.2.826.0.1.3680043.2.1125.400"}
    assert report["imagingStudy"] == [{"type": "ImagingStudy", "identifier": study}]


def _is_uri(system: str) -> bool:
    """RFC 3986 scheme, and for urn:oid an OID (FHIR's oid type), for urn:uuid a UUID."""
    if system.startswith("urn:oid:"):
        return re.fullmatch(r"urn:oid:[0-2](\.(0|[1-9]\d*))+", system) is not None
    if system.startswith("urn:uuid:"):
        return re.fullmatch(r"urn:uuid:[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", system) is not None
    return re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*:\S+", system) is not None


CONTACT_POINT_SYSTEMS = {"phone", "fax", "email", "pager", "url", "sms", "other"}  # codes, not URIs


def _systems(node: Any) -> list[str]:
    if isinstance(node, dict):
        system = node.get("system")
        own = [system] if isinstance(system, str) and system not in CONTACT_POINT_SYSTEMS else []
        return own + [s for v in node.values() for s in _systems(v)]
    return [s for v in node for s in _systems(v)] if isinstance(node, list) else []


def test_identifier_systems_are_uris_with_an_oid_default_system_and_a_clia_facility():
    bundle = outcome(GOLDEN / "orm_identifier_uris.hl7")
    bad = [s for s in _systems(bundle) if not _is_uri(s)]
    assert bad == []
    (coverage,) = _resources(bundle, "Coverage")  # IN1-36 was urn:oid:<oid>:policy, no OID
    assert coverage["identifier"][0]["system"] == "urn:overread:policy:urn:oid:2.16.840.1.113883.3.72.5.9.1"
    facility, payor = _resources(bundle, "Organization")  # MSH-4 ^1234^CLIA had an empty id and name
    assert (facility["identifier"], facility["name"]) == (
        [{"system": "urn:overread:sending-facility:CLIA", "value": "1234"}],
        "1234",
    )
    assert payor["identifier"][0]["system"] == "urn:overread:assigning-authority:CLIA:5678"


def test_an_oru_without_result_status_takes_its_observations_status():
    lines = [
        "MSH|^~\\&|RIS|H|O|O|20250101||ORU^R01|1|P|2.5.1",
        "PID|||P-1^^^H^MR||Doe^Jo",
        "OBR|1|PL-1|FI-1|X^X^L",
        "OBX|1|TX|18782-3^Findings^LN||Normal.||||||P",
    ]
    (report,) = _resources(map_message(parse("\r".join(lines))), "DiagnosticReport")
    assert report["status"] == "preliminary"  # once 101 at OBR-25
    (unknown,) = _resources(
        map_message(parse("\r".join([*lines[:3], "OBX|1|TX|18782-3^F^LN||Normal."]))), "DiagnosticReport"
    )
    assert unknown["status"] == "unknown"
