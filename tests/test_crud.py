"""Read, vread, create, update, delete and their headers (R4 http.html#read … #delete).

Conditional create/update/delete (http.html#ccreate, #cond-update, #cdelete) are here too.
Every test runs on SQLite and on PostgreSQL through the ``client`` fixture.
"""

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.builders import (
    MRN_SYSTEM,
    Json,
    assert_outcome,
    http_date,
    location_id,
    mrn_query,
    patient,
    service_request,
)

BASE = "http://testserver/fhir"


def create(client: Any, resource: Json, **headers: str) -> Any:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=headers)
    assert r.status_code == 201, r.text
    return r


def lookup(client: Any, rtype: str, query: str) -> list[Json]:
    r = client.get(f"/fhir/{rtype}?{query}")
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json().get("entry", []) if e["search"]["mode"] == "match"]


# -- create and read -------------------------------------------------------------------


def test_create_assigns_a_server_id_and_ignores_the_body_id(client):
    r = create(client, {**patient(), "id": "chosen-by-client"})
    body = r.json()
    assert body["id"] != "chosen-by-client"
    rtype, rid, vid = location_id(r.headers["location"])
    assert (rtype, rid, vid) == ("Patient", body["id"], "1")
    assert r.headers["location"] == f"{BASE}/Patient/{body['id']}/_history/1"
    assert r.headers["etag"] == 'W/"1"'
    assert body["meta"]["versionId"] == "1"
    assert body["identifier"][0]["value"] == "MRN-100234"
    assert client.get("/fhir/Patient/chosen-by-client").status_code == 404


def test_meta_last_updated_and_last_modified_agree_with_the_clock(client):
    before = datetime.now(UTC).replace(microsecond=0)
    body = create(client, patient()).json()
    after = datetime.now(UTC) + timedelta(seconds=1)
    r = client.get(f"/fhir/Patient/{body['id']}")
    last_updated = datetime.fromisoformat(body["meta"]["lastUpdated"])
    assert last_updated.tzinfo is not None and before <= last_updated <= after
    # Last-Modified is the same instant at HTTP-date (second) precision.
    assert http_date(r.headers["last-modified"]) == last_updated.replace(microsecond=0)


def test_read_serves_the_stored_resource_with_version_headers(client):
    created = create(client, patient()).json()
    r = client.get(f"/fhir/Patient/{created['id']}")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert r.headers["etag"] == 'W/"1"'
    assert r.json() == created


def test_read_of_an_unknown_id_is_404(client):
    assert_outcome(client.get("/fhir/Patient/no-such-patient"), 404)


def test_if_none_match_on_the_current_version_is_304_not_modified(client):
    rid = create(client, patient()).json()["id"]
    r = client.get(f"/fhir/Patient/{rid}", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 304 and r.content == b""
    assert r.headers["etag"] == 'W/"1"'
    client.put(f"/fhir/Patient/{rid}", json={**patient(family="Berg"), "id": rid})
    r = client.get(f"/fhir/Patient/{rid}", headers={"If-None-Match": 'W/"1"'})
    assert r.status_code == 200 and r.json()["name"][0]["family"] == "Berg"


@pytest.mark.parametrize("prefer", ["", "return=representation"])
def test_prefer_representation_returns_the_resource(client, prefer):
    r = client.post("/fhir/Patient", json=patient(), headers={"Prefer": prefer} if prefer else {})
    assert r.status_code == 201 and r.json()["resourceType"] == "Patient"


def test_prefer_minimal_returns_no_body_but_all_headers(client):
    r = client.post("/fhir/Patient", json=patient(), headers={"Prefer": "return=minimal"})
    assert r.status_code == 201 and r.content == b""
    assert r.headers["etag"] == 'W/"1"' and "last-modified" in r.headers
    _, rid, _ = location_id(r.headers["location"])
    r = client.put(f"/fhir/Patient/{rid}", json={**patient(), "id": rid}, headers={"Prefer": "return=minimal"})
    assert r.status_code == 200 and r.content == b"" and r.headers["etag"] == 'W/"2"'


def test_prefer_operation_outcome_returns_an_informational_outcome(client):
    r = client.post("/fhir/Patient", json=patient(), headers={"Prefer": "return=OperationOutcome"})
    assert r.status_code == 201
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["severity"] == "information"
    assert "location" in r.headers


# -- update ------------------------------------------------------------------------


def test_update_makes_a_new_version_and_vread_keeps_the_old_one(client):
    rid = create(client, patient()).json()["id"]
    r = client.put(f"/fhir/Patient/{rid}", json={**patient(family="Haugen-Berg"), "id": rid})
    assert r.status_code == 200
    assert r.headers["etag"] == 'W/"2"'
    assert r.headers["location"] == f"{BASE}/Patient/{rid}/_history/2"
    assert r.json()["meta"]["versionId"] == "2"

    v1 = client.get(f"/fhir/Patient/{rid}/_history/1")
    v2 = client.get(f"/fhir/Patient/{rid}/_history/2")
    assert v1.status_code == v2.status_code == 200
    assert v1.json()["name"][0]["family"] == "Haugen" and v1.headers["etag"] == 'W/"1"'
    assert v2.json()["name"][0]["family"] == "Haugen-Berg"
    assert client.get(f"/fhir/Patient/{rid}").json() == v2.json()
    assert v2.json()["meta"]["lastUpdated"] >= v1.json()["meta"]["lastUpdated"]
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history/3"), 404)


def test_update_as_create_with_a_client_id(client):
    r = client.put("/fhir/Patient/mrn-100234", json={**patient(), "id": "mrn-100234"})
    assert r.status_code == 201
    assert r.headers["location"] == f"{BASE}/Patient/mrn-100234/_history/1"
    assert r.json()["id"] == "mrn-100234" and r.json()["meta"]["versionId"] == "1"
    assert client.get("/fhir/Patient/mrn-100234").status_code == 200


def test_update_replaces_the_whole_resource(client):
    rid = create(client, patient(deceasedBoolean=False)).json()["id"]
    body = {"resourceType": "Patient", "id": rid, "active": True}
    client.put(f"/fhir/Patient/{rid}", json=body)
    stored = client.get(f"/fhir/Patient/{rid}").json()
    assert "deceasedBoolean" not in stored and "identifier" not in stored and stored["active"] is True


def test_if_match_on_the_current_version_updates(client):
    rid = create(client, patient()).json()["id"]
    r = client.put(f"/fhir/Patient/{rid}", json={**patient(), "id": rid}, headers={"If-Match": 'W/"1"'})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'


def test_if_match_on_a_stale_version_is_412_and_changes_nothing(client):
    rid = create(client, patient()).json()["id"]
    client.put(f"/fhir/Patient/{rid}", json={**patient(family="Berg"), "id": rid})
    r = client.put(f"/fhir/Patient/{rid}", json={**patient(family="Stale"), "id": rid}, headers={"If-Match": 'W/"1"'})
    assert_outcome(r, 412)
    current = client.get(f"/fhir/Patient/{rid}")
    assert current.headers["etag"] == 'W/"2"' and current.json()["name"][0]["family"] == "Berg"


def test_if_match_on_a_resource_that_does_not_exist_is_412(client):
    r = client.put("/fhir/Patient/p-new", json={**patient(), "id": "p-new"}, headers={"If-Match": 'W/"1"'})
    assert_outcome(r, 412)
    assert client.get("/fhir/Patient/p-new").status_code == 404


def test_if_match_guards_a_delete(client):
    rid = create(client, patient()).json()["id"]
    client.put(f"/fhir/Patient/{rid}", json={**patient(family="Second"), "id": rid})
    assert_outcome(client.delete(f"/fhir/Patient/{rid}", headers={"If-Match": 'W/"1"'}), 412)
    assert client.get(f"/fhir/Patient/{rid}").status_code == 200
    r = client.delete(f"/fhir/Patient/{rid}", headers={"If-Match": 'W/"2"'})
    assert r.status_code == 200 and r.headers["etag"] == 'W/"3"'
    assert client.get(f"/fhir/Patient/{rid}").status_code == 410


# -- delete --------------------------------------------------------------------------


def test_delete_is_a_versioned_tombstone(client):
    rid = create(client, patient()).json()["id"]
    client.put(f"/fhir/Patient/{rid}", json={**patient(family="Berg"), "id": rid})
    r = client.delete(f"/fhir/Patient/{rid}")
    assert r.status_code in (200, 204)
    assert r.headers["etag"] == 'W/"3"'

    body = assert_outcome(client.get(f"/fhir/Patient/{rid}"), 410)
    assert body["issue"][0]["code"] == "deleted"
    assert client.get(f"/fhir/Patient/{rid}/_history/1").json()["name"][0]["family"] == "Haugen"
    assert client.get(f"/fhir/Patient/{rid}/_history/2").json()["name"][0]["family"] == "Berg"
    assert_outcome(client.get(f"/fhir/Patient/{rid}/_history/3"), 410)
    assert lookup(client, "Patient", mrn_query()) == []


def test_deleting_a_deleted_resource_changes_nothing(client):
    rid = create(client, patient()).json()["id"]
    client.delete(f"/fhir/Patient/{rid}")
    assert client.delete(f"/fhir/Patient/{rid}").status_code in (200, 204)
    history = client.get(f"/fhir/Patient/{rid}/_history").json()
    assert history["total"] == 2


def test_update_after_delete_recreates_the_resource_as_a_new_version(client):
    rid = create(client, patient()).json()["id"]
    client.delete(f"/fhir/Patient/{rid}")
    r = client.put(f"/fhir/Patient/{rid}", json={**patient(family="Again"), "id": rid})
    # The resource did not exist before this request (it read as 410 Gone), so it is created.
    assert r.status_code == 201, r.text
    assert r.headers["etag"] == 'W/"3"' and r.json()["meta"]["versionId"] == "3"
    assert client.get(f"/fhir/Patient/{rid}").json()["name"][0]["family"] == "Again"
    assert [p["id"] for p in lookup(client, "Patient", mrn_query())] == [rid]


def test_create_after_delete_makes_a_new_resource(client):
    first = create(client, patient()).json()["id"]
    client.delete(f"/fhir/Patient/{first}")
    second = create(client, patient()).json()["id"]
    assert second != first
    assert [p["id"] for p in lookup(client, "Patient", mrn_query())] == [second]


def test_head_reads_headers_without_a_body(client):
    rid = create(client, patient()).json()["id"]
    r = client.head(f"/fhir/Patient/{rid}")
    assert r.status_code == 200 and r.content == b"" and r.headers["etag"] == 'W/"1"'


# -- conditional create ------------------------------------------------------------------


def test_conditional_create_creates_once_then_returns_the_existing_resource(client):
    headers = {"If-None-Exist": mrn_query()}
    first = client.post("/fhir/Patient", json=patient(), headers=headers)
    second = client.post("/fhir/Patient", json=patient(family="Other"), headers=headers)
    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert second.json()["name"][0]["family"] == "Haugen"  # the existing one, not the body
    assert len(lookup(client, "Patient", mrn_query())) == 1


def test_conditional_create_with_several_matches_is_412(client):
    create(client, patient())
    create(client, patient(given="Kari"))
    r = client.post("/fhir/Patient", json=patient(), headers={"If-None-Exist": mrn_query()})
    assert_outcome(r, 412)
    assert len(lookup(client, "Patient", mrn_query())) == 2


def test_conditional_create_ignores_other_identifiers(client):
    create(client, patient(mrn="MRN-1"))
    r = client.post("/fhir/Patient", json=patient(mrn="MRN-2"), headers={"If-None-Exist": mrn_query("MRN-2")})
    assert r.status_code == 201


# -- conditional update ---------------------------------------------------------------


def test_conditional_update_creates_when_nothing_matches(client):
    r = client.put(f"/fhir/Patient?{mrn_query()}", json=patient())
    assert r.status_code == 201
    rid = r.json()["id"]
    assert [p["id"] for p in lookup(client, "Patient", mrn_query())] == [rid]


def test_conditional_update_updates_the_one_match(client):
    rid = create(client, patient()).json()["id"]
    r = client.put(f"/fhir/Patient?{mrn_query()}", json=patient(family="Berg"))
    assert r.status_code == 200
    assert r.json()["id"] == rid and r.headers["etag"] == 'W/"2"'
    assert client.get(f"/fhir/Patient/{rid}").json()["name"][0]["family"] == "Berg"


def test_conditional_update_with_several_matches_is_412(client):
    create(client, patient())
    create(client, patient(given="Kari"))
    assert_outcome(client.put(f"/fhir/Patient?{mrn_query()}", json=patient(family="X")), 412)
    assert {p["name"][0]["family"] for p in lookup(client, "Patient", mrn_query())} == {"Haugen"}


def test_conditional_update_with_a_body_id_of_another_resource_is_400(client):
    create(client, patient())
    assert_outcome(client.put(f"/fhir/Patient?{mrn_query()}", json={**patient(), "id": "someone-else"}), 400)


def test_conditional_update_of_a_service_request_by_accession(client):
    pid = create(client, patient()).json()["id"]
    sr = service_request(f"Patient/{pid}")
    query = f"identifier={sr['identifier'][0]['system']}|{sr['identifier'][0]['value']}"
    first = client.put(f"/fhir/ServiceRequest?{query}", json=sr)
    second = client.put(f"/fhir/ServiceRequest?{query}", json={**sr, "status": "revoked"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"] and second.json()["status"] == "revoked"


# -- conditional delete -----------------------------------------------------------------


def test_conditional_delete_deletes_the_one_match(client):
    rid = create(client, patient()).json()["id"]
    keep = create(client, patient(mrn="MRN-999")).json()["id"]
    r = client.delete(f"/fhir/Patient?{mrn_query()}")
    assert r.status_code in (200, 204)
    assert_outcome(client.get(f"/fhir/Patient/{rid}"), 410)
    assert client.get(f"/fhir/Patient/{keep}").status_code == 200


def test_conditional_delete_with_no_match_succeeds_without_deleting(client):
    keep = create(client, patient(mrn="MRN-999")).json()["id"]
    assert client.delete(f"/fhir/Patient?{mrn_query()}").status_code in (200, 204)
    assert client.get(f"/fhir/Patient/{keep}").status_code == 200


def test_conditional_delete_with_several_matches_is_412(client):
    create(client, patient())
    create(client, patient(given="Kari"))
    assert_outcome(client.delete(f"/fhir/Patient?{mrn_query()}"), 412)
    assert len(lookup(client, "Patient", mrn_query())) == 2


# -- the other types of a case --------------------------------------------------------


def test_a_whole_case_by_separate_creates_keeps_its_references(client):
    pid = create(client, patient()).json()["id"]
    sr = create(client, service_request(f"Patient/{pid}")).json()
    (case,) = lookup(client, "Task", f"focus=ServiceRequest/{sr['id']}")  # the order opened its case
    assert case["for"] == {"reference": f"Patient/{pid}"} and case["status"] == "requested"
    assert sr["identifier"][0]["type"]["coding"][0]["code"] == "ACSN"
    assert (
        lookup(client, "ServiceRequest", f"subject=Patient/{pid}")[0]["identifier"][0]["system"]
        == (sr["identifier"][0]["system"])
    )
    assert MRN_SYSTEM in client.get(f"/fhir/Patient/{pid}").text
