"""The FHIR base itself, ``[base]`` with no trailing slash as FHIR clients write it (R4 http.html):
POST is a transaction or batch, GET a search of the whole system (``_type`` and the parameters
common to the types searched). Neither answers with a redirect, which many clients do not
follow on POST."""

from typing import Any

import httpx
import pytest
from fhirpy import SyncFHIRClient

from tests.builders import assert_outcome, bundle, case_transaction, patient, post, service_request

Json = dict[str, Any]


def ids(searchset: Json) -> list[tuple[str, str]]:
    return sorted((e["resource"]["resourceType"], e["resource"]["id"]) for e in searchset.get("entry", []))


def created(client: Any, resource: Json) -> str:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


@pytest.mark.parametrize("path", ["/fhir", "/fhir/"])
def test_a_transaction_posted_to_the_base_is_processed_in_place(client, path):
    response = client.post(path, json=case_transaction(), follow_redirects=False)
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "transaction-response"


@pytest.mark.parametrize("path", ["/fhir", "/fhir/"])
def test_get_on_the_base_searches_every_type(client, path):
    pid = created(client, patient())
    sid = created(client, service_request(f"Patient/{pid}"))
    response = client.get(path, params={"_count": "100"}, follow_redirects=False)
    assert response.status_code == 200, response.text
    found = response.json()
    assert found["type"] == "searchset"
    assert {("Patient", pid), ("ServiceRequest", sid)} <= set(ids(found))
    assert found["total"] == len(found["entry"])


def test_type_narrows_a_system_search_and_common_parameters_apply(client):
    pid = created(client, patient())
    sid = created(client, service_request(f"Patient/{pid}"))
    created(client, patient(mrn="MRN-2", meta={"tag": [{"system": "urn:t", "code": "x"}]}))
    found = client.get("/fhir", params={"_type": "Patient,ServiceRequest", "_id": f"{pid},{sid}"}).json()
    assert ids(found) == sorted([("Patient", pid), ("ServiceRequest", sid)])
    only_orders = client.get("/fhir", params={"_type": "ServiceRequest"}).json()
    assert ids(only_orders) == [("ServiceRequest", sid)]
    tagged = client.get("/fhir", params={"_tag": "urn:t|x"}).json()
    assert [t for t, _ in ids(tagged)] == ["Patient"] and tagged["total"] == 1
    assert "_type=ServiceRequest" in only_orders["link"][0]["url"]
    assert only_orders["link"][0]["url"].startswith("http://testserver/fhir?")


def test_a_system_search_pages_in_a_stable_order(client):
    for n in range(5):
        created(client, patient(mrn=f"MRN-{n}"))
    first = client.get("/fhir", params={"_count": "3", "_sort": "_lastUpdated"}).json()
    assert first["total"] == 5 and len(first["entry"]) == 3
    (following,) = [link["url"] for link in first["link"] if link["relation"] == "next"]
    second = client.get(following.removeprefix("http://testserver")).json()
    assert len(second["entry"]) == 2 and not set(ids(first)) & set(ids(second))


def test_parameters_not_common_to_the_types_searched(client):
    created(client, patient(family="Haugen"))
    strict = {"Prefer": "handling=strict"}
    outcome = assert_outcome(client.get("/fhir", params={"family": "Haugen"}, headers=strict), 400)
    assert "family" in outcome["issue"][0]["diagnostics"]
    created(client, patient(mrn="MRN-2", family="Berg"))
    # lenient (the default): the unknown parameter is left out, and the self link says so
    lenient = client.get("/fhir", params={"family": "Haugen"}).json()
    assert lenient["total"] == 2 and "family" not in lenient["link"][0]["url"]
    # with _type=Patient alone, every Patient parameter is common to the types searched
    narrowed = client.get("/fhir", params={"family": "Haugen", "_type": "Patient"}).json()
    assert narrowed["total"] == 1 and "family=Haugen" in narrowed["link"][0]["url"]
    assert_outcome(client.get("/fhir", params={"_type": "Nonsense"}), 404)
    assert_outcome(client.get("/fhir", params={"_sort": "family"}), 400)


def test_post_search_on_the_base(client):
    pid = created(client, patient())
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = client.post("/fhir/_search", content=f"_id={pid}&_type=Patient", headers=form)
    assert response.status_code == 200, response.text
    assert ids(response.json()) == [("Patient", pid)]


@pytest.mark.server
def test_outside_clients_post_a_transaction_to_the_base_without_a_trailing_slash(live_server):
    assert not live_server.endswith("/")
    raw = httpx.post(live_server, json=case_transaction(), headers={"Content-Type": "application/fhir+json"})
    assert raw.status_code == 200 and raw.json()["type"] == "transaction-response"
    # fhirpy with an absolute URL equal to its base, redirects refused: the base answers itself
    fhir = SyncFHIRClient(
        live_server,
        extra_headers={"Content-Type": "application/fhir+json"},
        requests_config={"allow_redirects": False},
    )
    response = fhir.execute(live_server, data=bundle("batch", post(patient(mrn="MRN-FHIRPY"))))
    assert response["type"] == "batch-response"
    assert response["entry"][0]["response"]["status"] == "201 Created"
    everything = fhir.execute(f"{live_server}?_type=Patient", method="get")
    assert everything["total"] == 2
