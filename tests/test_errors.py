"""Errors are values: every failure is an OperationOutcome with the right status.

R4 http.html#2.21.0.4 ("Handling errors") and the status codes of each interaction.
``assert_outcome`` also checks the content type and that no stack trace leaked.
"""

from typing import Any
from urllib.parse import unquote

import pytest

from tests.builders import assert_outcome, patient, service_request, task


@pytest.fixture
def pid(client) -> str:
    r = client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1"})
    assert r.status_code == 201
    return "p-1"


# -- 400 Bad Request ----------------------------------------------------------------


# Several cases per test, in a loop: each test costs a fresh database on both kinds.


def test_a_body_that_is_not_json_is_400(client):
    for method, path in [("POST", "/fhir/Patient"), ("PUT", "/fhir/Patient/p-1"), ("POST", "/fhir")]:
        assert_outcome(client.request(method, path, content=b'{"resourceType": "Patient",'), 400)


def test_a_body_that_is_not_a_resource_is_400(client):
    for body in [[], "Patient", 7, None, {"identifier": []}]:
        assert_outcome(client.post("/fhir/Patient", json=body), 400)


def test_create_without_a_body_is_400(client):
    assert_outcome(client.post("/fhir/Patient"), 400)


def test_a_resource_type_other_than_the_urls_is_400(client, pid):
    sr = service_request("Patient/p-1")
    assert_outcome(client.post("/fhir/Patient", json=sr), 400)
    assert_outcome(client.put("/fhir/Patient/p-1", json={**sr, "id": "p-1"}), 400)
    assert client.get("/fhir/ServiceRequest").json()["total"] == 0


def test_update_whose_body_id_differs_from_the_url_is_400(client, pid):
    assert_outcome(client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-2"}), 400)
    assert client.get("/fhir/Patient/p-2").status_code == 404


def test_update_without_a_body_id_is_400(client, pid):
    assert_outcome(client.put("/fhir/Patient/p-1", json=patient()), 400)


def test_update_with_an_invalid_id_is_400(client):
    for bad in ["has_underscore", "a" * 65, "sp%20ace", "caf%C3%A9"]:
        assert_outcome(client.put(f"/fhir/Patient/{bad}", json={**patient(), "id": unquote(bad)}), 400)
    assert client.get("/fhir/_history").json()["total"] == 0


def test_a_non_string_body_id_is_400(client):
    assert_outcome(client.put("/fhir/Patient/p-1", json={**patient(), "id": 1}), 400)


def test_conditional_interactions_without_criteria_are_400(client, pid):
    assert_outcome(client.put("/fhir/Patient", json=patient()), 400)
    assert_outcome(client.delete("/fhir/Patient"), 400)
    # An empty If-None-Exist is no condition at all: a plain create.
    assert client.post("/fhir/Patient", json=patient(), headers={"If-None-Exist": ""}).status_code == 201


def test_conditional_criteria_with_an_unknown_parameter_are_400(client, pid):
    r = client.post("/fhir/Patient", json=patient(), headers={"If-None-Exist": "shoe-size=42"})
    assert_outcome(r, 400)
    assert client.get("/fhir/Patient").json()["total"] == 1


def test_a_bad_search_parameter_value_is_400(client):
    assert_outcome(client.get("/fhir/Patient?_count=many"), 400)


def test_an_unknown_search_parameter_is_400_with_strict_handling(client):
    r = client.get("/fhir/Patient?shoe-size=42", headers={"Prefer": "handling=strict"})
    assert_outcome(r, 400)
    assert client.get("/fhir/Patient?shoe-size=42", headers={"Prefer": "handling=lenient"}).status_code == 200


# -- 404 Not Found ---------------------------------------------------------------------


def test_unknown_ids_and_versions_are_404(client, pid):
    assert_outcome(client.get("/fhir/Patient/p-2"), 404)
    assert_outcome(client.get("/fhir/Patient/p-1/_history/2"), 404)
    assert_outcome(client.get("/fhir/Patient/p-1/_history/first"), 404)
    assert_outcome(client.get("/fhir/Patient/p-2/_history"), 404)
    assert_outcome(client.delete("/fhir/Patient/p-2"), 404)


def test_unsupported_resource_types_are_404(client, pid):
    for method, path in [
        ("GET", "/fhir/Spaceship"),
        ("GET", "/fhir/Spaceship/1"),
        ("POST", "/fhir/Spaceship"),
        ("PUT", "/fhir/Spaceship/1"),
        ("DELETE", "/fhir/Spaceship/1"),
        ("GET", "/fhir/Spaceship/_history"),
        ("GET", "/fhir/Spaceship/1/_history/1"),
        ("POST", "/fhir/Spaceship/_search"),
        ("GET", "/fhir/patient/p-1"),  # resource types are case-sensitive
        ("GET", "/fhir/MedicationRequest/1"),  # a real R4 type, but not one this server serves
    ]:
        body = {"resourceType": path.split("/")[2], "id": "1"} if method in ("POST", "PUT") else None
        assert_outcome(client.request(method, path, json=body), 404)


def test_creating_an_unsupported_type_is_404_and_stores_nothing(client):
    assert_outcome(client.post("/fhir/MedicationRequest", json={"resourceType": "MedicationRequest"}), 404)
    assert client.get("/fhir/_history").json()["total"] == 0


# -- 405 Method Not Allowed ---------------------------------------------------------------


def test_unsupported_interactions_are_405(client, pid):
    for method, path in [
        ("POST", "/fhir/Patient/p-1"),
        ("PUT", "/fhir/Patient/p-1/_history/1"),
        ("DELETE", "/fhir/Patient/p-1/_history/1"),
        ("POST", "/fhir/Patient/p-1/_history"),
        ("DELETE", "/fhir/_history"),
        ("PUT", "/fhir/metadata"),
        ("PATCH", "/fhir/Patient/p-1/_history/1"),
        ("PATCH", "/fhir"),
    ]:
        patch = [{"op": "replace", "path": "/active", "value": True}]
        body = patch if method == "PATCH" else {**patient(), "id": "p-1"}
        assert_outcome(client.request(method, path, json=body), 405)
    assert client.get("/fhir/Patient/p-1").headers["etag"] == 'W/"1"'


# -- 409, 410, 412 -------------------------------------------------------------------------


def test_reading_a_deleted_resource_is_410(client, pid):
    client.delete("/fhir/Patient/p-1")
    outcome = assert_outcome(client.get("/fhir/Patient/p-1"), 410)
    assert outcome["issue"][0]["code"] == "deleted"


def test_a_stale_if_match_is_412(client, pid):
    r = client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1"}, headers={"If-Match": 'W/"2"'})
    assert_outcome(r, 412)


def test_a_conditional_create_matching_several_is_412(client):
    for rid in ("a", "b"):
        client.put(f"/fhir/Patient/{rid}", json={**patient(), "id": rid})
    r = client.post("/fhir/Patient", json=patient(), headers={"If-None-Exist": "family=Haugen"})
    assert_outcome(r, 412)


# -- 415 Unsupported Media Type --------------------------------------------------------------


def test_a_body_that_is_not_fhir_json_is_415(client):
    for content_type in ["text/plain", "application/xml", "application/fhir+xml"]:
        r = client.post("/fhir/Patient", content=b"Patient Haugen", headers={"Content-Type": content_type})
        assert_outcome(r, 415)
    assert client.get("/fhir/Patient").json()["total"] == 0


def test_json_with_charset_and_plain_json_are_accepted(client):
    for content_type in ("application/fhir+json; charset=utf-8", "application/json"):
        r = client.post("/fhir/Patient", json=patient(), headers={"Content-Type": content_type})
        assert r.status_code == 201, r.text


# -- 422 Unprocessable Entity --------------------------------------------------------------


def test_an_invalid_patient_is_422_naming_the_element(client):
    cases: list[tuple[dict[str, Any], str]] = [
        ({"favouriteColour": "teal"}, "Patient.favouriteColour"),  # an element R4 does not define
        ({"birthDate": "17 April 1961"}, "Patient.birthDate"),  # wrong format
        ({"active": "yes"}, "Patient.active"),  # a JSON boolean expected, even if it reads as one
        ({"multipleBirthInteger": "2"}, "Patient.multipleBirthInteger"),  # a JSON number expected
        ({"gender": 1}, "Patient.gender"),  # code: a string expected
        ({"gender": "F"}, "Patient.gender"),  # not a code of the required AdministrativeGender
        ({"name": {"family": "Haugen"}}, "Patient.name"),  # an array expected
        ({"identifier": [{"value": ["MRN-1"]}]}, "Patient.identifier[0].value"),  # a string expected
        ({"contained": [{"resourceType": "Organization", "active": "no"}]}, "Patient.contained[0].active"),
    ]
    for broken, where in cases:
        outcome = assert_outcome(client.post("/fhir/Patient", json={**patient(), **broken}), 422)
        assert any(e.startswith(where) for i in outcome["issue"] for e in i.get("expression", [])), outcome
    assert client.get("/fhir/Patient").json()["total"] == 0


def test_an_invalid_update_is_422_and_keeps_the_current_version(client, pid):
    assert_outcome(client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1", "active": "yes"}), 422)
    assert client.get("/fhir/Patient/p-1").headers["etag"] == 'W/"1"'


def test_a_task_without_its_required_elements_is_422(client):
    broken = task("ServiceRequest/sr-1", "Patient/p-1")
    del broken["intent"], broken["status"]
    assert_outcome(client.post("/fhir/Task", json=broken), 422)


def test_a_service_request_with_an_unknown_intent_is_422(client):
    for intent in (7, "orders"):
        r = client.post("/fhir/ServiceRequest", json=service_request("Patient/p", intent=intent))
        outcome = assert_outcome(r, 422)
        assert outcome["issue"][0]["expression"] == ["ServiceRequest.intent"]


# -- the error body --------------------------------------------------------------------------


def test_errors_are_operation_outcomes_even_with_prefer_minimal(client):
    r = client.post("/fhir/Patient", json={**patient(), "active": "yes"}, headers={"Prefer": "return=minimal"})
    assert_outcome(r, 422)
