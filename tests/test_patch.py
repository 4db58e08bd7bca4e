"""The patch interaction with JSON Patch (R4 http.html#patch, RFC 6902), on SQLite and PostgreSQL."""

import base64
import json
from typing import Any

from tests.builders import MRN_SYSTEM, Json, assert_outcome, patient

PATCH = {"content-type": "application/json-patch+json"}


def created(client: Any, resource: Json) -> Json:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    body: Json = r.json()
    return body


def send(client: Any, url: str, operations: Any, **headers: str) -> Any:
    return client.patch(url, content=json.dumps(operations), headers={**PATCH, **headers})


def test_a_patch_makes_the_next_version(client):
    p = created(client, patient(mrn="P-1", family="Haugen"))
    ops = [
        {"op": "replace", "path": "/name/0/family", "value": "Berg"},
        {"op": "add", "path": "/active", "value": True},
    ]
    r = send(client, f"/fhir/Patient/{p['id']}", ops)
    assert r.status_code == 200, r.text
    assert r.headers["etag"] == 'W/"2"'
    body = r.json()
    assert body["name"][0]["family"] == "Berg" and body["active"] is True and body["meta"]["versionId"] == "2"
    assert client.get(f"/fhir/Patient/{p['id']}").json()["name"][0]["family"] == "Berg"
    assert client.get(f"/fhir/Patient/{p['id']}/_history/1").json()["name"][0]["family"] == "Haugen"
    found = client.get("/fhir/Patient?family=berg").json()  # the index follows the new version
    assert [e["resource"]["id"] for e in found.get("entry", [])] == [p["id"]]


def test_if_match_guards_a_patch(client):
    p = created(client, patient(mrn="P-2"))
    ops = [{"op": "add", "path": "/active", "value": False}]
    assert_outcome(send(client, f"/fhir/Patient/{p['id']}", ops, **{"if-match": 'W/"7"'}), 412)
    assert send(client, f"/fhir/Patient/{p['id']}", ops, **{"if-match": 'W/"1"'}).status_code == 200


def test_a_failed_test_operation_is_409_and_changes_nothing(client):
    p = created(client, patient(mrn="P-3", family="Haugen"))
    ops = [{"op": "test", "path": "/name/0/family", "value": "Berg"}, {"op": "remove", "path": "/name"}]
    assert_outcome(send(client, f"/fhir/Patient/{p['id']}", ops), 409)
    assert client.get(f"/fhir/Patient/{p['id']}").json()["meta"]["versionId"] == "1"


def test_bad_patches_get_clear_errors(client):
    p = created(client, patient(mrn="P-4"))
    url = f"/fhir/Patient/{p['id']}"
    assert_outcome(send(client, url, 42), 400)  # neither an array (JSON Patch) nor an object (merge patch)
    assert_outcome(send(client, url, {"op": "add"}), 422)  # a merge patch adding an element Patient has not
    assert_outcome(send(client, url, [{"op": "remove", "path": "/nothing/here"}]), 422)
    assert_outcome(send(client, url, [{"op": "replace", "path": "/gender", "value": "yes"}]), 422)  # invalid FHIR
    assert_outcome(send(client, url, [{"op": "replace", "path": "/id", "value": "other"}]), 422)
    assert_outcome(send(client, url, {"resourceType": "Parameters", "parameter": []}), 415)  # FHIRPath Patch
    assert_outcome(send(client, "/fhir/Patient/nobody", [{"op": "add", "path": "/active", "value": True}]), 404)
    assert client.get(url).json()["meta"]["versionId"] == "1"


def test_a_conditional_patch_patches_the_one_match(client):
    created(client, patient(mrn="P-5"))
    ops = [{"op": "add", "path": "/active", "value": False}]
    r = send(client, f"/fhir/Patient?identifier={MRN_SYSTEM}|P-5", ops)
    assert r.status_code == 200 and r.json()["active"] is False
    assert_outcome(send(client, f"/fhir/Patient?identifier={MRN_SYSTEM}|nobody", ops), 404)
    created(client, patient(mrn="P-6", family="Twin"))
    created(client, patient(mrn="P-7", family="Twin"))
    assert_outcome(send(client, "/fhir/Patient?family=Twin", ops), 412)


def test_a_transaction_patches_with_a_binary(client):
    p = created(client, patient(mrn="P-8"))
    ops = json.dumps([{"op": "add", "path": "/active", "value": True}]).encode()
    binary = {"resourceType": "Binary", "contentType": "application/json-patch+json",
              "data": base64.b64encode(ops).decode()}  # fmt: skip
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": binary, "request": {"method": "PATCH", "url": f"Patient/{p['id']}"}}]}  # fmt: skip
    r = client.post("/fhir", json=bundle)
    assert r.status_code == 200, r.text
    assert r.json()["entry"][0]["response"]["status"].startswith("200")
    assert client.get(f"/fhir/Patient/{p['id']}").json()["active"] is True


def test_the_capability_statement_says_patch(client):
    rest = client.get("/fhir/metadata").json()["rest"][0]
    patient_entry = next(r for r in rest["resource"] if r["type"] == "Patient")
    assert {"code": "patch"} in patient_entry["interaction"]


def test_a_json_object_is_a_merge_patch(client):
    p = created(client, patient(mrn="P-9", family="Haugen"))
    merge = {"active": True, "telecom": None, "name": [{"family": "Berg"}]}
    r = client.patch(
        f"/fhir/Patient/{p['id']}", content=json.dumps(merge), headers={"content-type": "application/merge-patch+json"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["active"] is True and "telecom" not in body and body["name"] == [{"family": "Berg"}]
    assert body["identifier"] == p["identifier"]  # members the patch does not name stay
