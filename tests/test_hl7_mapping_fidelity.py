"""Real messages map as the sender meant them (issue 18): HL7 null, free text with unescaped delimiters,
formatting escapes, impossible dates. The golden files hold the whole Bundles; these tests name what
each case must show."""

import json
from typing import Any

import pytest

from mappings.errors import DATA_TYPE_ERROR, MappingError
from mappings.orders import map_order
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
        map_order(msg)
    assert (caught.value.code, caught.value.location) == (DATA_TYPE_ERROR, location)
    assert outcome(GOLDEN / "orm_impossible_order_date.hl7")["error"]["location"] == "ORC-9"
