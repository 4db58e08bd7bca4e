"""Batch and transaction Bundles (R4 http.html#transaction).

A batch runs each entry on its own; a transaction is atomic, rewrites ``urn:uuid:``
references, resolves conditional references, and processes DELETE, POST, PUT, GET in
that order whatever the order of the entries.
"""

from typing import Any

import pytest

from tests.builders import (
    ACSN_SYSTEM,
    Json,
    assert_outcome,
    bundle,
    case_transaction,
    delete,
    get,
    location_id,
    mrn_query,
    patient,
    post,
    put,
    service_request,
    task,
)

P, SR, T = (f"urn:uuid:0d4c7f2e-8a51-4c1b-b7f3-7a1c9e5d{n:04d}" for n in (1, 2, 3))


def send(client: Any, body: Json) -> Any:
    return client.post("/fhir", json=body)


def ok(client: Any, body: Json) -> Json:
    r = send(client, body)
    assert r.status_code == 200, r.text
    out: Json = r.json()
    return out


def everything(client: Any) -> list[tuple[str, str]]:
    """(type, id) of every current resource, from system history."""
    bundle = client.get("/fhir/_history?_count=1000").json()
    seen: dict[tuple[str, str], str] = {}
    for e in reversed(bundle.get("entry", [])):
        rtype, rid = e["fullUrl"].split("/")[-2:]
        key = (rtype, rid)
        seen[key] = e["request"]["method"]
    return sorted(k for k, method in seen.items() if method != "DELETE")


def read(client: Any, reference: str) -> Json:
    r = client.get(f"/fhir/{reference}")
    assert r.status_code == 200, r.text
    out: Json = r.json()
    return out


def reference_of(response_entry: Json) -> str:
    rtype, rid, _ = location_id(response_entry["response"]["location"])
    return f"{rtype}/{rid}"


# -- batch -----------------------------------------------------------------------------


def test_batch_entries_are_independent_and_one_failure_undoes_nothing_else(client):
    client.put("/fhir/Patient/p-keep", json={**patient(mrn="MRN-7"), "id": "p-keep"})
    out = ok(
        client,
        bundle(
            "batch",
            post(patient(mrn="MRN-1")),
            post({**patient(mrn="MRN-2"), "favouriteColour": "teal"}),  # invalid: 422
            get("Patient/nobody"),  # 404
            put("Patient/p-2", {**patient(mrn="MRN-3"), "id": "p-2"}),
            delete("Patient/p-keep"),
            get("Patient/p-2"),
        ),
    )
    assert out["type"] == "batch-response"
    statuses = [int(e["response"]["status"].split()[0]) for e in out["entry"]]
    assert statuses == [201, 422, 404, 201, 200, 200] or statuses == [201, 422, 404, 201, 204, 200]
    assert out["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    assert out["entry"][2]["response"]["outcome"]["issue"][0]["code"] == "not-found"
    created = reference_of(out["entry"][0])
    assert read(client, created)["identifier"][0]["value"] == "MRN-1"
    assert read(client, "Patient/p-2")["identifier"][0]["value"] == "MRN-3"
    assert_outcome(client.get("/fhir/Patient/p-keep"), 410)
    assert everything(client) == sorted([("Patient", created.split("/")[1]), ("Patient", "p-2")])


def test_batch_with_every_entry_failing_is_still_a_200_batch_response(client):
    out = ok(client, bundle("batch", get("Patient/nobody"), put("Patient/a", {**patient(), "id": "b"})))
    assert [e["response"]["status"][:3] for e in out["entry"]] == ["404", "400"]
    assert everything(client) == []


# -- transaction: atomicity ------------------------------------------------------------------


def test_transaction_with_an_invalid_last_entry_stores_nothing(client):
    body = case_transaction()
    body["entry"][-1]["resource"]["status"] = "not-a-task-status-at-all"
    body["entry"][-1]["resource"]["intent"] = 42
    r = send(client, body)
    outcome = assert_outcome(r, 422)
    assert any("Bundle.entry[2]" in i.get("expression", [""])[0] for i in outcome["issue"])
    assert everything(client) == []
    assert client.get(f"/fhir/Patient?{mrn_query()}").json()["total"] == 0


def test_transaction_whose_failing_entry_is_processed_last_undoes_earlier_writes(client):
    client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1"})
    r = send(
        client,
        bundle(
            "transaction",
            get("Patient/nobody"),  # processed last, after the writes below: 404
            delete("Patient/p-1"),
            post(patient(mrn="MRN-2")),
            put("Patient/p-3", {**patient(mrn="MRN-3"), "id": "p-3"}),
        ),
    )
    assert_outcome(r, 404)
    assert everything(client) == [("Patient", "p-1")]
    assert read(client, "Patient/p-1")["meta"]["versionId"] == "1"


def test_transaction_with_an_if_match_conflict_is_412_and_stores_nothing(client):
    client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1"})
    r = send(
        client,
        bundle(
            "transaction",
            post(service_request("Patient/p-1")),
            put("Patient/p-1", {**patient(family="Berg"), "id": "p-1"}, if_match='W/"7"'),
        ),
    )
    assert_outcome(r, 412)
    assert everything(client) == [("Patient", "p-1")]


@pytest.mark.parametrize("kind", ["transaction", "batch"])
def test_a_bundle_entry_without_a_request_is_400(client, kind):
    assert_outcome(send(client, {"resourceType": "Bundle", "type": kind, "entry": [{"resource": patient()}]}), 400)


def test_a_collection_bundle_posted_to_the_base_is_400(client):
    assert_outcome(send(client, bundle("collection", post(patient()))), 400)


# -- transaction: references and the response -------------------------------------------------


def test_transaction_rewrites_urn_uuid_references_and_answers_with_locations(client):
    out = ok(client, case_transaction())
    assert out["resourceType"] == "Bundle" and out["type"] == "transaction-response"
    assert [e["response"]["status"] for e in out["entry"]] == ["201 Created"] * 3
    for e in out["entry"]:
        assert e["response"]["location"].startswith("http://testserver/fhir/")
        assert e["response"]["etag"] == 'W/"1"'
    patient_ref, sr_ref, task_ref = (reference_of(e) for e in out["entry"])
    assert [patient_ref.split("/")[0], sr_ref.split("/")[0], task_ref.split("/")[0]] == [
        "Patient",
        "ServiceRequest",
        "Task",
    ]
    sr, t = read(client, sr_ref), read(client, task_ref)
    assert sr["subject"] == {"reference": patient_ref}
    assert t["focus"] == {"reference": sr_ref} and t["for"] == {"reference": patient_ref}
    assert out["entry"][1]["resource"]["subject"] == {"reference": patient_ref}
    assert "urn:uuid" not in client.get("/fhir/_history").text


def test_transaction_conditional_create_reuses_the_existing_patient(client):
    first = ok(client, case_transaction(accession="ACSN-1"))
    second = ok(client, case_transaction(accession="ACSN-2"))
    assert second["entry"][0]["response"]["status"] == "200 OK"
    assert reference_of(second["entry"][0]) == reference_of(first["entry"][0])
    sr = read(client, reference_of(second["entry"][1]))
    assert sr["subject"]["reference"] == reference_of(first["entry"][0])
    assert client.get(f"/fhir/Patient?{mrn_query()}").json()["total"] == 1


def test_conditional_reference_resolves_to_an_existing_resource(client):
    client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1"})
    out = ok(client, bundle("transaction", post(service_request(f"Patient?{mrn_query()}"), SR)))
    assert read(client, reference_of(out["entry"][0]))["subject"] == {"reference": "Patient/p-1"}


def test_conditional_reference_resolves_to_a_patient_created_in_the_same_bundle(client):
    out = ok(
        client,
        bundle(
            "transaction",
            post(service_request(f"Patient?{mrn_query()}"), SR),
            post(task(SR, f"Patient?{mrn_query()}")),
            post(patient(), P, if_none_exist=mrn_query()),
        ),
    )
    patient_ref = reference_of(out["entry"][2])
    assert read(client, reference_of(out["entry"][0]))["subject"] == {"reference": patient_ref}
    assert read(client, reference_of(out["entry"][1]))["for"] == {"reference": patient_ref}


def test_conditional_reference_matches_however_the_criteria_are_encoded(client):
    encoded = mrn_query().replace("|", "%7C").replace(":", "%3A").replace("/", "%2F")
    out = ok(
        client,
        bundle(
            "transaction",
            post(patient(), P, if_none_exist=encoded),
            post(service_request(f"Patient?{mrn_query()}"), SR),
        ),
    )
    assert read(client, reference_of(out["entry"][1]))["subject"] == {"reference": reference_of(out["entry"][0])}


def test_conditional_reference_matching_nothing_or_several_fails_the_transaction(client):
    r = send(client, bundle("transaction", post(service_request(f"Patient?{mrn_query()}"))))
    assert r.status_code in (404, 412) and assert_outcome(r, r.status_code)
    client.put("/fhir/Patient/a", json={**patient(), "id": "a"})
    client.put("/fhir/Patient/b", json={**patient(given="Kari"), "id": "b"})
    assert_outcome(send(client, bundle("transaction", post(service_request(f"Patient?{mrn_query()}")))), 412)
    assert client.get("/fhir/ServiceRequest").json()["total"] == 0


def test_unresolvable_urn_uuid_reference_is_400(client):
    r = send(client, bundle("transaction", post(service_request("urn:uuid:1b5d8a57-0000-4000-8000-000000000000"))))
    assert_outcome(r, 400)
    assert everything(client) == []


def test_put_entries_can_be_referred_to_by_their_full_url(client):
    out = ok(
        client,
        bundle(
            "transaction",
            put("Patient/mrn-100234", {**patient(), "id": "mrn-100234"}, full_url=P),
            post(service_request(P), SR),
        ),
    )
    assert out["entry"][0]["response"]["status"] == "201 Created"
    assert read(client, reference_of(out["entry"][1]))["subject"] == {"reference": "Patient/mrn-100234"}


def test_conditional_update_entries_can_be_referred_to_by_their_full_url(client):
    """The V2-to-FHIR pattern: PUT Patient?identifier=… (create or update) and refer to it."""
    body = bundle(
        "transaction",
        put(f"Patient?{mrn_query()}", patient(), full_url=P),
        post(service_request(P), SR),
        post(task(SR, P)),
    )
    first = ok(client, body)
    assert first["entry"][0]["response"]["status"] == "201 Created"
    patient_ref = reference_of(first["entry"][0])
    assert read(client, reference_of(first["entry"][1]))["subject"] == {"reference": patient_ref}

    body["entry"][0]["resource"] = patient(family="Haugen-Berg")
    body["entry"][1]["resource"]["identifier"][0]["value"] = "ACSN-2"
    second = ok(client, body)
    assert second["entry"][0]["response"]["status"] == "200 OK"
    assert reference_of(second["entry"][0]) == patient_ref
    assert read(client, patient_ref)["name"][0]["family"] == "Haugen-Berg"
    assert read(client, reference_of(second["entry"][2]))["for"] == {"reference": patient_ref}
    assert client.get(f"/fhir/Patient?{mrn_query()}").json()["total"] == 1


# -- transaction: processing order --------------------------------------------------------


def test_transaction_processes_delete_post_put_get_in_that_order(client):
    client.put("/fhir/Patient/p-old", json={**patient(mrn="MRN-OLD"), "id": "p-old"})
    client.put("/fhir/Patient/p-1", json={**patient(mrn="MRN-1"), "id": "p-1"})
    out = ok(
        client,
        bundle(
            "transaction",
            get("Patient/p-1"),  # after the PUT: sees version 2
            get(f"Patient?{mrn_query('MRN-OLD')}"),  # after DELETE and POST: sees only the new one
            put("Patient/p-1", {**patient(mrn="MRN-1", family="Berg"), "id": "p-1"}),
            # After the DELETE, nothing matches MRN-OLD any more: a new Patient is created.
            post(patient(mrn="MRN-OLD", family="New"), P, if_none_exist=mrn_query("MRN-OLD")),
            delete("Patient/p-old"),
        ),
    )
    got, searched, updated, created, deleted = out["entry"]
    assert got["resource"]["meta"]["versionId"] == "2" and got["resource"]["name"][0]["family"] == "Berg"
    assert updated["response"]["status"].startswith("200") and updated["response"]["etag"] == 'W/"2"'
    assert created["response"]["status"] == "201 Created"
    assert deleted["response"]["status"][:3] in ("200", "204")
    assert [e["resource"]["name"][0]["family"] for e in searched["resource"].get("entry", [])] == ["New"]
    assert_outcome(client.get("/fhir/Patient/p-old"), 410)


def test_transaction_get_entries_answer_with_their_resources(client):
    client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1"})
    out = ok(client, bundle("transaction", get("Patient/p-1"), get(f"ServiceRequest?identifier={ACSN_SYSTEM}|X")))
    assert out["entry"][0]["response"]["status"] == "200 OK"
    assert out["entry"][0]["resource"]["id"] == "p-1"
    assert out["entry"][1]["resource"]["type"] == "searchset"


def test_two_identical_conditional_creates_in_one_transaction_make_one_resource(client):
    entry = {
        "resource": {"resourceType": "Practitioner", "identifier": [{"system": "urn:npi", "value": "123"}]},
        "request": {"method": "POST", "url": "Practitioner", "ifNoneExist": "identifier=urn:npi|123"},
    }
    response = client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [entry, entry]})
    assert response.status_code == 200, response.text
    statuses = [e["response"]["status"] for e in response.json()["entry"]]
    locations = {e["response"]["location"].split("/_history")[0] for e in response.json()["entry"]}
    assert statuses == ["201 Created", "200 OK"] and len(locations) == 1
    assert client.get("/fhir/Practitioner?identifier=urn:npi|123").json()["total"] == 1
