"""The search parameter registry: plain paths are walked, and give what fhirpathpy gives."""

import json
from importlib.resources import files

import pytest

from fhir_server.search_params import _fhirpath, _plain_steps, registry, split_union
from tests.search_data import radiology

DEMO = json.loads(files("overread").joinpath("samples/second-opinion-order.json").read_text())
RESOURCES = radiology() + [e["resource"] for e in DEMO["entry"]]


def _plain(expression: str) -> bool:
    return all(_plain_steps(part) is not None for part in split_union(expression))


@pytest.mark.parametrize("resource", RESOURCES, ids=lambda r: f"{r['resourceType']}/{r.get('id', '')}")
def test_walked_paths_give_what_fhirpath_gives(resource):
    params = [p for p in registry()[resource["resourceType"]].values() if p.expression and _plain(p.expression)]
    assert params, "every type has plain-path parameters"
    for param in params:
        assert param.evaluate(resource) == _fhirpath(param.expression)(resource), param.code


def test_choice_elements_and_functions_are_left_to_fhirpath():
    assert _plain_steps("Observation.effective") is None  # effectiveDateTime, effectivePeriod ...
    assert _plain_steps("Patient.telecom.where(system='phone')") is None
    assert _plain_steps("Patient.nosuchelement") is None
    assert _plain_steps("Patient.name.family") == ("name", "family")
    assert _plain_steps("Task.for") == ("for",)


def test_most_parameters_are_plain_paths():
    expressions = [p.expression for params in registry().values() for p in params.values() if p.expression]
    assert sum(map(_plain, expressions)) / len(expressions) > 0.8
