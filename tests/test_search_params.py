"""The search parameter registry: plain paths are walked, and give what fhirpathpy gives."""

import json
from decimal import Decimal
from importlib.resources import files
from typing import Any

import pytest

from fhir_server.search_params import _fhirpath, _json_steps, _simple, registry, split_union
from tests.search_data import radiology

DEMO = json.loads(files("overread").joinpath("samples/second-opinion-order.json").read_text())
PATIENT = {"reference": "Patient/p1"}
# Values for the choice elements, casts and where() filters the samples above lack.
CHOICES: list[dict[str, Any]] = [
    {"resourceType": "Patient", "id": "c1", "deceasedDateTime": "2026-03-01T10:00:00Z",
     "telecom": [{"system": "phone", "value": "+41 44 000"}, {"system": "email", "value": "a@b.ch"},
                 {"system": "email"}, {"value": "no system"}]},
    {"resourceType": "Patient", "id": "c2", "deceasedBoolean": True},
    {"resourceType": "Patient", "id": "c2b", "deceasedBoolean": False},
    {"resourceType": "Practitioner", "id": "c3", "telecom": [{"system": "email", "value": "dr@b.ch"}]},
    {"resourceType": "ServiceRequest", "id": "c4", "status": "active", "intent": "order", "subject": PATIENT,
     "occurrenceDateTime": "2026-03-01"},
    {"resourceType": "ServiceRequest", "id": "c5", "status": "active", "intent": "order",
     "subject": {"reference": "Group/g1"}, "occurrencePeriod": {"start": "2026-03-01", "end": "2026-03-02"}},
    {"resourceType": "Observation", "id": "c6", "status": "final", "code": {"text": "x"}, "subject": PATIENT,
     "effectivePeriod": {"start": "2026-03-01"}, "valueQuantity": {"value": 3, "unit": "mm"},
     "component": [{"code": {"text": "y"}, "valueCodeableConcept": {"text": "seen", "coding": [{"code": "s"}]}},
                   {"code": {"text": "z"}, "valueQuantity": {"value": 1}}]},
    {"resourceType": "Observation", "id": "c7", "status": "final", "code": {"text": "x"},
     "valueCodeableConcept": {"text": "agree"}, "effectiveDateTime": "2026-03-01"},
    {"resourceType": "Observation", "id": "c8", "status": "final", "code": {"text": "x"}, "valueString": "free text"},
    {"resourceType": "Provenance", "id": "c9", "target": [PATIENT, {"reference": "Task/t1"}],
     "occurredDateTime": "2026-03-01T10:00:00Z", "recorded": "2026-03-01T10:00:00Z",
     "agent": [{"who": {"reference": "Practitioner/d1"}}]},
    {"resourceType": "Encounter", "id": "c10", "status": "finished", "class": {"code": "AMB"}, "subject": PATIENT,
     "participant": [{"individual": {"reference": "Practitioner/d1"}},
                     {"individual": {"reference": "RelatedPerson/r"}}]},
]  # fmt: skip
RESOURCES = radiology() + [e["resource"] for e in DEMO["entry"]] + CHOICES


def _walked(expression: str) -> bool:
    return all(_simple(part) is not None for part in split_union(expression))


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: f"{r['resourceType']}/{r.get('id', '')}")
def test_walked_paths_give_what_fhirpath_gives(resource):
    params = [p for p in registry()[resource["resourceType"]].values() if p.expression and _walked(p.expression)]
    assert params, "every type has walked parameters"
    for param in params + [p for p in registry()[resource["resourceType"]].values() if p.code == "deceased"]:
        try:
            expected = _decimals_as_floats(_fhirpath(param.expression)(resource))
        except ValueError as e:  # fhirpathpy: "Expected singleton on left side of 'as'" (two components)
            assert "singleton" in str(e) and len(resource.get("component", [])) > 1
            continue
        assert param.evaluate(resource) == expected, param.code


def _decimals_as_floats(value: Any) -> Any:
    """fhirpathpy casts a Quantity's value to Decimal; the index stores float(value) either way."""
    if isinstance(value, list):
        return [_decimals_as_floats(v) for v in value]
    if isinstance(value, dict):
        return {k: _decimals_as_floats(v) for k, v in value.items()}
    return float(value) if isinstance(value, Decimal) else value


@pytest.mark.parametrize(
    ("resource_type", "code", "resource_id", "expected"),
    [
        ("Patient", "phone", "c1", [{"system": "phone", "value": "+41 44 000"}]),
        ("Patient", "death-date", "c1", ["2026-03-01T10:00:00Z"]),
        ("ServiceRequest", "occurrence", "c5", [{"start": "2026-03-01", "end": "2026-03-02"}]),
        ("ServiceRequest", "patient", "c5", []),
        ("Observation", "value-string", "c7", ["agree"]),
        ("Encounter", "practitioner", "c10", [{"reference": "Practitioner/d1"}]),
        # fhirpathpy refuses "as" on two components; each component's value of that type is meant
        ("Observation", "component-value-quantity", "c6", [{"value": 1}]),
    ],
)
def test_the_walks_find_the_values(resource_type, code, resource_id, expected):
    # The comparison above cannot fail on two empty results: these have values.
    (resource,) = [r for r in CHOICES if r["id"] == resource_id]
    assert registry()[resource_type][code].evaluate(resource) == expected


def test_only_boolean_logic_is_written_by_hand():
    left = [
        f"{t}.{c}"
        for t, params in registry().items()
        for c, p in params.items()
        if p.expression and not _walked(p.expression)
    ]
    assert left == ["Patient.deceased"]  # boolean logic: written by hand (search_params._deceased)
    assert registry()["Patient"]["deceased"].evaluate({}) == [False]


def test_paths_are_checked_against_the_model_and_give_json_names():
    assert _json_steps("Patient.name.family") == [("name",), ("family",)]
    assert _json_steps("Task.for") == [("for",)]
    assert _json_steps("Patient.nosuchelement") is None
    [effective] = _json_steps("Observation.effective") or [()]
    assert sorted(effective) == ["effectiveDateTime", "effectiveInstant", "effectivePeriod", "effectiveTiming"]
    assert _json_steps("(Patient.deceased as dateTime)") == [("deceasedDateTime",)]
    assert _json_steps("(Patient.deceased as Quantity)") is None  # not one of deceased[x]'s types
    assert _json_steps("Observation.effective.start") is None  # after an uncast choice: which type?
    assert _simple("Patient.telecom.where(system='phone')") is not None
    assert _simple("Patient.telecom.where(system!='phone')") is None
