"""Conformance artifacts (conformance/*.json), profile validation of writes, and $validate.

Golden files: each ``tests/golden/validation/<case>.json`` is a resource, ``<case>.outcome.json``
the OperationOutcome ``$validate`` answers for it. Regenerate after an intended change with
``OVERREAD_UPDATE_GOLDEN=1 pytest tests/test_profiles.py``.
"""

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fhir_server import profiles
from fhir_server.conformance_seed import publish
from fhir_server.errors import FhirError
from fhir_server.executor import for_database
from fhir_server.validation import model, validate
from mappings.concept_map import parse_concept_map, translate
from tests.builders import service_request, task

Json = dict[str, Any]
GOLDEN = Path(__file__).parent / "golden" / "validation"
UPDATE = os.environ.get("OVERREAD_UPDATE_GOLDEN") == "1"
CASES = sorted(p for p in GOLDEN.glob("*.json") if not p.name.endswith(".outcome.json"))
BASE = "https://overread.org/fhir"
DISCREPANCY = f"{BASE}/CodeSystem/second-opinion-discrepancy"
REPORT_PROFILE = f"{BASE}/StructureDefinition/second-opinion-report"


def _publish(client: TestClient) -> int:
    return publish(for_database(client.app.state.db))  # type: ignore[attr-defined]


def _load(name: str) -> Json:
    data: Json = json.loads((GOLDEN / f"{name}.json").read_text(encoding="utf-8"))
    return data


def _open_case(client: TestClient, order_id: str = "sr-1") -> None:
    """The order the golden reports are based on, as a case of this server (its Task)."""
    order = {**service_request("Patient/pat-1"), "id": order_id}
    assert client.put(f"/fhir/ServiceRequest/{order_id}", json=order).status_code == 201
    assert client.post("/fhir/Task", json=task(f"ServiceRequest/{order_id}", "Patient/pat-1")).status_code == 201


def _issues(outcome: Json) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(i["severity"], i["code"], tuple(i.get("expression", ()))) for i in outcome["issue"]]


# -- the artifacts ----------------------------------------------------------------------


@pytest.mark.parametrize("artifact", profiles.artifacts(), ids=lambda a: f"{a['resourceType']}-{a['id']}")
def test_every_artifact_is_a_valid_r4_resource(artifact: Json) -> None:
    assert validate(artifact) is artifact
    assert artifact["url"] == f"{BASE}/{artifact['resourceType']}/{artifact['id']}"


def test_the_artifacts_of_the_discrepancy_section() -> None:
    by_url = profiles.by_url()
    scale = [c["code"] for c in by_url[DISCREPANCY]["concept"]]
    assert scale == ["agree", "minor", "major", "indeterminate"]
    radpeer = {c["code"]: c["definition"] for c in by_url[f"{BASE}/CodeSystem/radpeer"]["concept"]}
    assert list(radpeer) == ["1", "2a", "2b", "3a", "3b"] and "likely to be clinically significant" in radpeer["3b"]
    types = {c["code"] for c in by_url[f"{BASE}/CodeSystem/discrepancy-type"]["concept"]}
    assert {"perceptual-miss", "interpretive", "overcall", "staging-change", "additional-finding"} <= types
    statuses = {c["code"] for c in by_url[f"{BASE}/CodeSystem/case-status"]["concept"]}
    assert {"images-pending", "images-available", "images-not-found", "images-unavailable"} <= statuses
    assert {c["code"] for c in by_url[f"{BASE}/CodeSystem/report-role"]["concept"]} == {"original", "second-opinion"}
    assert profiles.expand(f"{BASE}/ValueSet/second-opinion-discrepancy") == frozenset((DISCREPANCY, c) for c in scale)
    for sd in ("compared-report", "second-opinion-request", "second-opinion-case", "second-opinion-report"):
        assert f"{BASE}/StructureDefinition/{sd}" in profiles.profiles()


@pytest.mark.parametrize("url", sorted(profiles.profiles()), ids=lambda u: u.rsplit("/", 1)[-1])
def test_differential_elements_follow_the_order_of_the_base_type(url: str) -> None:
    """R4 profiling: a differential lists its elements in the order of the type they constrain."""
    sd = profiles.by_url()[url]
    base = model(sd["type"]).elements_sequence()  # type: ignore[attr-defined]  # fhir.resources adds it
    positions = []
    for element in sd["differential"]["element"]:
        name = element["path"].split(".")[1:2]
        if name:  # value[x] stands where valueQuantity, valueCodeableConcept … stand
            choice = name[0].removesuffix("[x]") if name[0].endswith("[x]") else None
            positions.append(next(i for i, b in enumerate(base) if b == name[0] or (choice and b.startswith(choice))))
    assert positions == sorted(positions), [e["id"] for e in sd["differential"]["element"]]


@pytest.mark.parametrize(("score", "expected"), [("1", "agree"), ("2a", "minor"), ("2b", "major"), ("3a", "minor")])
def test_the_radpeer_concept_map_translates_to_the_scale(score: str, expected: str) -> None:
    concept_map = parse_concept_map(profiles.by_url()[f"{BASE}/ConceptMap/radpeer-to-discrepancy"])
    assert [c["code"] for c in translate(concept_map, f"{BASE}/CodeSystem/radpeer", score)] == [expected]
    assert translate(concept_map, f"{BASE}/CodeSystem/radpeer", "2b")[0]["system"] == DISCREPANCY


def test_the_server_serves_the_artifacts(client: TestClient) -> None:
    assert _publish(client) == len(profiles.artifacts())
    found = client.get("/fhir/CodeSystem", params={"url": DISCREPANCY}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == ["second-opinion-discrepancy"]
    assert client.get("/fhir/StructureDefinition/second-opinion-report").json()["url"] == REPORT_PROFILE
    assert client.get("/fhir/ConceptMap/radpeer-to-discrepancy").status_code == 200
    everything = client.get("/fhir/StructureDefinition", params={"url:below": BASE}).json()
    assert everything["total"] >= 5


def test_publishing_again_writes_nothing(client: TestClient) -> None:
    _publish(client)
    before = client.get("/fhir/_history").json()["total"]
    assert before == len(profiles.artifacts())
    assert _publish(client) == 0
    assert client.get("/fhir/_history").json()["total"] == before


# -- writes: accepted, refused with every issue ---------------------------------------


def test_a_valid_second_opinion_report_is_accepted(client: TestClient) -> None:
    report = _load("report-valid")
    created = client.post("/fhir/DiagnosticReport", json=report)
    assert created.status_code == 201, created.text
    unclaimed = {k: v for k, v in report.items() if k != "meta"}  # required, not claimed: still conforms
    assert client.post("/fhir/DiagnosticReport", json=unclaimed).status_code == 201


def test_an_invalid_second_opinion_report_gets_one_outcome_with_every_issue(client: TestClient) -> None:
    response = client.post("/fhir/DiagnosticReport", json=_load("report-invalid"))
    assert response.status_code == 422
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    issues = _issues(outcome)
    assert ("error", "invariant", ("DiagnosticReport",)) in issues  # two discrepancy codes (sor-1), no text (sor-2)
    assert ("error", "required", ("DiagnosticReport.resultsInterpreter",)) in issues
    assert ("error", "structure", ("DiagnosticReport.conclusionCode[1]",)) in issues  # a second discrepancy code
    diagnostics = " ".join(i["diagnostics"] for i in outcome["issue"])
    assert "sor-1" in diagnostics and "sor-2" in diagnostics
    assert client.get("/fhir/DiagnosticReport").json()["total"] == 0


def test_a_code_of_another_system_is_not_a_discrepancy_code(client: TestClient) -> None:
    _open_case(client)  # a report on a case here is a second opinion, claimed or not
    response = client.post("/fhir/DiagnosticReport", json=_load("report-other-system"))
    assert response.status_code == 422
    assert ("error", "required", ("DiagnosticReport.conclusionCode",)) in _issues(response.json())


def test_original_reports_and_unrelated_reports_are_not_held_to_the_profile(client: TestClient) -> None:
    original = {
        "resourceType": "DiagnosticReport",
        "meta": {"tag": [{"system": f"{BASE}/CodeSystem/report-role", "code": "original"}]},
        "status": "final",
        "code": {"text": "CT chest"},
        "basedOn": [{"reference": "ServiceRequest/sr-1"}],
    }
    assert client.post("/fhir/DiagnosticReport", json=original).status_code == 201
    lab = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "Full blood count"}}
    assert client.post("/fhir/DiagnosticReport", json=lab).status_code == 201


def test_a_profile_this_server_does_not_know_is_refused(client: TestClient) -> None:
    patient = {"resourceType": "Patient", "meta": {"profile": [f"{BASE}/StructureDefinition/nope"]}}
    response = client.post("/fhir/Patient", json=patient)
    assert response.status_code == 422 and response.json()["issue"][0]["code"] == "not-supported"
    elsewhere = {"resourceType": "Patient", "meta": {"profile": ["http://example.org/StructureDefinition/p"]}}
    assert client.post("/fhir/Patient", json=elsewhere).status_code == 201


def test_every_door_gets_the_check() -> None:
    """validation.validate is what the repository calls on every write (HTTP, HL7, workers)."""
    with pytest.raises(FhirError) as caught:
        validate(_load("report-invalid"))
    assert caught.value.status == 422 and len(caught.value.issues) >= 3


# -- golden outcomes and $validate ------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_validation_outcome_matches_its_golden_file(client: TestClient, case: Path) -> None:
    resource = json.loads(case.read_text(encoding="utf-8"))
    _open_case(client)
    response = client.post(f"/fhir/{resource['resourceType']}/$validate", json=resource)
    assert response.status_code == 200, response.text
    outcome = response.json()
    expected_path = case.with_suffix(".outcome.json")
    if UPDATE:
        expected_path.write_text(json.dumps(outcome, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert outcome == json.loads(expected_path.read_text(encoding="utf-8"))
    valid = outcome["issue"][0]["severity"] == "information"
    assert valid == case.stem.endswith("-valid")
    written = client.post(f"/fhir/{resource['resourceType']}", json=resource)  # the same answer as a write
    if valid:
        assert written.status_code == 201, written.text
    else:
        assert written.status_code == 422 and written.json() == outcome


def test_validate_takes_parameters_and_a_profile_and_writes_nothing(client: TestClient) -> None:
    report = {k: v for k, v in _load("report-invalid").items()}
    report["basedOn"] = []  # no longer required to conform …
    del report["basedOn"]
    report["conclusionCode"] = [{"coding": [{"system": "http://snomed.info/sct", "code": "17621005"}]}]
    before = client.get("/fhir/_history").json()["total"]
    plain = client.post("/fhir/DiagnosticReport/$validate", json=report).json()
    assert plain["issue"][0]["severity"] == "information"
    asked = client.post(f"/fhir/DiagnosticReport/$validate?profile={REPORT_PROFILE}", json=report).json()
    assert ("error", "required", ("DiagnosticReport.basedOn",)) in _issues(asked)  # … unless asked for
    parameters = {
        "resourceType": "Parameters",
        "parameter": [{"name": "resource", "resource": report}, {"name": "profile", "valueUri": REPORT_PROFILE}],
    }
    assert client.post("/fhir/DiagnosticReport/$validate", json=parameters).json() == asked
    assert client.get("/fhir/_history").json()["total"] == before
    wrong_type = client.post("/fhir/Patient/$validate", json=report)
    assert wrong_type.status_code == 400


def test_validate_with_a_profile_reports_a_malformed_resource_instead_of_failing(client: TestClient) -> None:
    malformed = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT"}, "meta": {"tag": "x"}}
    response = client.post(f"/fhir/DiagnosticReport/$validate?profile={REPORT_PROFILE}", json=malformed)
    assert response.status_code == 200, response.text
    assert ("error", "invalid", ("DiagnosticReport.meta.tag",)) in _issues(response.json())
    odd_extension = {**_load("report-valid"), "extension": [{"url": ["not", "a", "uri"]}]}
    assert client.post("/fhir/DiagnosticReport/$validate", json=odd_extension).status_code == 200


def test_validate_an_instance(client: TestClient) -> None:
    created = client.post("/fhir/DiagnosticReport", json=_load("report-valid")).json()
    rid = created["id"]
    stored = client.post(f"/fhir/DiagnosticReport/{rid}/$validate")
    assert stored.status_code == 200 and stored.json()["issue"][0]["diagnostics"] == "valid"
    assert client.get(f"/fhir/DiagnosticReport/{rid}/$validate").json()["issue"][0]["severity"] == "information"
    changed = {**created, "resultsInterpreter": []}
    del changed["resultsInterpreter"]
    outcome = client.post(f"/fhir/DiagnosticReport/{rid}/$validate", json=changed).json()
    assert ("error", "required", ("DiagnosticReport.resultsInterpreter",)) in _issues(outcome)
    assert client.get(f"/fhir/DiagnosticReport/{rid}").json()["meta"]["versionId"] == "1"
    assert client.post("/fhir/DiagnosticReport/nope/$validate").status_code == 404


def test_validate_in_delete_mode_ignores_the_content_and_other_methods_are_405(client: TestClient) -> None:
    rid = client.post("/fhir/DiagnosticReport", json=_load("report-valid")).json()["id"]
    invalid = {**_load("report-invalid"), "id": rid}
    deleting = client.post(f"/fhir/DiagnosticReport/{rid}/$validate?mode=delete", json=invalid).json()
    assert deleting["issue"][0]["severity"] == "information"
    assert client.delete(f"/fhir/DiagnosticReport/{rid}/$validate").status_code == 405
    assert client.delete("/fhir/DiagnosticReport/$validate").status_code == 405


def test_the_capability_statement_lists_profiles_and_validate(client: TestClient) -> None:
    statement = client.get("/fhir/metadata").json()
    resources = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert resources["DiagnosticReport"]["supportedProfile"] == [REPORT_PROFILE]
    assert f"{BASE}/StructureDefinition/second-opinion-case" in resources["Task"]["supportedProfile"]
    assert f"{BASE}/StructureDefinition/second-opinion-request" in resources["ServiceRequest"]["supportedProfile"]
    assert f"{BASE}/StructureDefinition/discrepancy-finding" in resources["Observation"]["supportedProfile"]
    for resource in resources.values():
        assert {"name": "validate", "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate"} in (
            resource["operation"]
        )
