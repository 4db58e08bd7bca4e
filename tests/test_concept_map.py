"""ConceptMap translation ($translate semantics of FHIR R4) and how it adds codings to a concept."""

import json
from typing import Any

import pytest
from fhir.resources.R4B.conceptmap import ConceptMap as FhirConceptMap

from mappings.concept_map import ConceptMapError, add_translations, parse_concept_map, translate
from tests.hl7_golden import GOLDEN

LOCAL = "urn:overread:coding-system:99RIS"
LOINC = "http://loinc.org"
RADLEX = "http://radlex.org"
DISC = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"
RADPEER = "https://overread.org/fhir/CodeSystem/radpeer"


def _map(*groups: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "ConceptMap", "url": "https://example.org/cm", "status": "active", "group": list(groups)}


def _target(code: str, equivalence: str, display: str = "") -> dict[str, str]:
    return {"code": code, "equivalence": equivalence, **({"display": display} if display else {})}


PROCEDURES = parse_concept_map(
    _map(
        {
            "source": LOCAL,
            "target": LOINC,
            "element": [
                {"code": "CTCH", "target": [_target("24627-2", "equivalent", "CT Chest")]},
                {"code": "CTAB", "target": [_target("24558-9", "wider"), _target("79103-8", "narrower")]},
                {"code": "XR", "target": [{"equivalence": "unmatched"}]},
                {"code": "MR", "target": [_target("18755-9", "disjoint")]},
            ],
        },
        {"source": LOCAL, "target": RADLEX, "element": [{"code": "CTCH", "target": [_target("RID50", "relatedto")]}]},
    )
)


def test_a_code_translates_in_every_group_of_its_system():
    assert translate(PROCEDURES, LOCAL, "CTCH") == [
        {"system": LOINC, "code": "24627-2", "display": "CT Chest"},
        {"system": RADLEX, "code": "RID50"},
    ]


@pytest.mark.parametrize("equivalence", ["relatedto", "equivalent", "equal", "wider", "subsumes", "narrower",
                                         "specializes", "inexact"])  # fmt: skip
def test_every_equivalence_but_unmatched_and_disjoint_is_a_translation(equivalence):
    cm = parse_concept_map(
        _map({"source": LOCAL, "target": LOINC, "element": [{"code": "A", "target": [_target("1-8", equivalence)]}]})
    )
    assert translate(cm, LOCAL, "A") == [{"system": LOINC, "code": "1-8"}]


def test_several_targets_of_one_element_all_count():
    assert [c["code"] for c in translate(PROCEDURES, LOCAL, "CTAB")] == ["24558-9", "79103-8"]


def test_unmatched_and_disjoint_mean_no_translation():
    assert translate(PROCEDURES, LOCAL, "XR") == []
    assert translate(PROCEDURES, LOCAL, "MR") == []


def test_no_match_of_code_or_system_is_no_translation():
    assert translate(PROCEDURES, LOCAL, "NOPE") == []
    assert translate(PROCEDURES, LOINC, "CTCH") == []  # the code, but from another system
    assert translate(PROCEDURES, None, "CTCH") == []  # a code sent without a system matches no sourced group
    assert translate(PROCEDURES, LOCAL, "ctch") == []  # FHIR codes are case-sensitive


def test_a_group_without_source_takes_codes_of_any_system():
    cm = parse_concept_map(
        _map({"target": LOINC, "element": [{"code": "CTCH", "target": [_target("24627-2", "equal")]}]})
    )
    assert translate(cm, None, "CTCH") == translate(cm, LOCAL, "CTCH") == [{"system": LOINC, "code": "24627-2"}]


def test_unmapped_provided_keeps_the_code_in_the_target_system():
    cm = parse_concept_map(
        _map({"source": LOCAL, "target": LOINC, "element": [{"code": "XR", "target": [{"equivalence": "unmatched"}]}],
              "unmapped": {"mode": "provided"}})
    )  # fmt: skip
    assert translate(cm, LOCAL, "30746-2") == [{"system": LOINC, "code": "30746-2"}]
    assert translate(cm, LOCAL, "XR") == []  # an element that says "no translation" wins over unmapped
    assert translate(cm, LOINC, "30746-2") == []  # only for the group's own source system


def test_unmapped_fixed_gives_the_fixed_code():
    cm = parse_concept_map(
        _map({"source": LOCAL, "target": DISC, "element": [],
              "unmapped": {"mode": "fixed", "code": "indeterminate", "display": "Indeterminate"}})
    )  # fmt: skip
    assert translate(cm, LOCAL, "anything") == [{"system": DISC, "code": "indeterminate", "display": "Indeterminate"}]


def test_unmapped_other_map_is_ignored():
    cm = parse_concept_map(
        _map({"source": LOCAL, "target": LOINC, "unmapped": {"mode": "other-map", "url": "https://example.org/other"}})
    )
    assert translate(cm, LOCAL, "CTCH") == []


def test_the_radpeer_map_of_the_architecture_brief():
    cm = parse_concept_map(
        _map({"source": RADPEER, "target": DISC, "element": [
            {"code": "1", "target": [_target("agree", "equivalent")]},
            *({"code": c, "target": [_target("minor", "wider")]} for c in ("2a", "3a")),
            *({"code": c, "target": [_target("major", "wider")]} for c in ("2b", "3b")),
        ]})
    )  # fmt: skip
    assert [translate(cm, RADPEER, c)[0]["code"] for c in ("1", "2a", "2b", "3a", "3b")] == [
        "agree", "minor", "major", "minor", "major"
    ]  # fmt: skip


def test_a_coding_without_a_code_is_not_translated_by_unmapped():
    provided = parse_concept_map(_map({"target": LOINC, "element": [], "unmapped": {"mode": "provided"}}))
    fixed = parse_concept_map(_map({"target": DISC, "element": [], "unmapped": {"mode": "fixed", "code": "x"}}))
    assert translate(provided, None, "") == [] and translate(fixed, LOCAL, "") == []  # never {"code": ""}
    concept = {"coding": [{"system": LOCAL, "display": "CT chest"}], "text": "CT chest"}
    assert add_translations(concept, [provided, fixed]) == concept


def test_a_translation_already_present_is_not_repeated():
    cm = parse_concept_map(
        _map(
            {"source": LOCAL, "target": LOINC, "element": [{"code": "CTCH", "target": [_target("24627-2", "equal")]}]},
            {"target": LOINC, "element": [{"code": "CTCH", "target": [_target("24627-2", "equal")]}]},
        )
    )
    assert translate(cm, LOCAL, "CTCH") == [{"system": LOINC, "code": "24627-2"}]


def test_translations_are_added_after_the_senders_codings():
    concept = {
        "coding": [{"system": LOCAL, "code": "CTCH", "display": "CT chest", "userSelected": True}, {"code": "CTAB"}],
        "text": "CT chest",
    }
    result = add_translations(concept, [PROCEDURES])
    assert result["coding"][:2] == concept["coding"]  # the sender's own codings first, untouched
    assert result["coding"][2:] == [
        {"system": LOINC, "code": "24627-2", "display": "CT Chest"},
        {"system": RADLEX, "code": "RID50"},
    ]
    assert result["text"] == "CT chest"
    assert len(concept["coding"]) == 2  # the input is not changed
    assert add_translations(concept, []) is concept
    already = {"coding": [{"system": LOCAL, "code": "CTCH"}, {"system": LOINC, "code": "24627-2"}]}
    assert [c["code"] for c in add_translations(already, [PROCEDURES])["coding"]] == ["CTCH", "24627-2", "RID50"]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "not a ConceptMap"),
        ({"resourceType": "ValueSet"}, "not a ConceptMap"),
        (_map(), "without groups"),
        ({"resourceType": "ConceptMap", "group": {"target": LOINC}}, "group: must be a list"),
        (_map({"source": LOCAL, "element": []}), r"group\[0\].target: the target system is required"),
        (_map({"target": LOINC, "element": [{"target": []}]}), r"element\[0\].code: is required"),
        (_map({"target": LOINC, "element": [{"code": "A", "target": [{"code": "B"}]}]}), "equivalence"),
        (_map({"target": LOINC, "element": [{"code": "A", "target": [_target("B", "same")]}]}), "'same'"),
        (
            _map({"target": LOINC, "element": [{"code": "A", "target": [{"equivalence": "equal"}]}]}),
            "code: is required",
        ),
        (_map({"target": LOINC, "unmapped": {"mode": "fixed"}}), "cmd-2"),
        (_map({"target": LOINC, "unmapped": {"mode": "guess"}}), "'guess'"),
        (_map({"target": LOINC, "element": [{"code": 7}]}), "code: must be a string"),
    ],
)
def test_a_broken_concept_map_is_refused_saying_where(data, message):
    with pytest.raises(ConceptMapError, match=message):
        parse_concept_map(data)


def test_the_golden_concept_map_is_valid_r4():
    data = json.loads((GOLDEN / "maps" / "ris2-codes.json").read_text(encoding="utf-8"))
    FhirConceptMap.model_validate(data)  # the FHIR models agree it is a ConceptMap
    cm = parse_concept_map(data)
    assert translate(cm, "urn:overread:coding-system:99RIS2", "CTCHEST")[0]["code"] == "24627-2"
