"""Index values whole (docs/reliability.md, "Index values whole"), on SQLite and PostgreSQL.

The index held the first 255 characters of a string or token (512 of a URI) and compared
that with the whole search value: a value longer than that was found by no search, and a
conditional create on it was not idempotent. References to this server's own base were
kept as URLs, so a search, ``_include`` or chain by ``Type/id`` missed them.
"""

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.builders import patient

LONG = "V" * 300
#: Past the first 255 characters: only the whole value tells them apart.
LONG_FAMILY, OTHER_FAMILY = "Ab" * 140 + "Xyz-tail", "Ab" * 140 + "Qrs-tail"
BASE = "http://testserver/fhir"  # what the client fixture's requests reach the server by


def ids(client: TestClient, query: str) -> set[str]:
    response = client.get(f"/fhir/{query}")
    assert response.status_code == 200, response.text
    return {e["resource"]["id"] for e in response.json().get("entry", []) if e["search"]["mode"] == "match"}


def created(client: TestClient, resource: dict[str, Any]) -> str:
    response = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_conditional_create_on_a_long_identifier_finds_what_it_created(client: TestClient) -> None:
    criteria = {"If-None-Exist": f"identifier=urn:x|{LONG}"}
    body = {**patient(), "identifier": [{"system": "urn:x", "value": LONG}]}
    first = client.post("/fhir/Patient", json=body, headers=criteria)
    second = client.post("/fhir/Patient", json=body, headers=criteria)
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json()["id"] == first.json()["id"]
    assert ids(client, f"Patient?identifier=urn:x|{LONG}") == {first.json()["id"]}
    assert ids(client, f"Patient?identifier={LONG}") == {first.json()["id"]}
    assert ids(client, f"Patient?identifier=urn:x|{LONG}W") == set()  # the same first 255, longer


def test_string_searches_see_past_the_first_255_characters(client: TestClient) -> None:
    long = created(client, patient(family=LONG_FAMILY))
    other = created(client, patient(family=OTHER_FAMILY))
    assert ids(client, f"Patient?family:exact={LONG_FAMILY}") == {long}
    assert ids(client, f"Patient?family:exact={LONG_FAMILY[:-1]}") == set()
    assert ids(client, f"Patient?family={LONG_FAMILY[:-3].lower()}") == {long}  # starts with, past 255
    assert ids(client, f"Patient?family={LONG_FAMILY[:100]}") == {long, other}
    assert ids(client, "Patient?family:contains=XYZ-T") == {long}
    assert ids(client, "Patient?family:contains=b-tail") == set()
    assert ids(client, f"Patient?name:exact={OTHER_FAMILY}") == {other}


PROTOCOL = "https://overread.org/fhir/protocols/" + "segment/" * 70  # 596 characters


def order(subject: str, **extra: Any) -> dict[str, Any]:
    return {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": {"text": "XR"},
            "subject": {"reference": subject}, **extra}  # fmt: skip


def test_uris_are_compared_whole_and_case_sensitively(client: TestClient) -> None:
    subject = f"Patient/{created(client, patient())}"
    long = created(client, order(subject, instantiatesUri=[PROTOCOL + "ct"]))
    other = created(client, order(subject, instantiatesUri=[PROTOCOL + "mr"]))
    parent = created(client, order(subject, instantiatesUri=["https://overread.org/fhir/protocols"]))
    upper = created(client, order(subject, instantiatesUri=["https://overread.org/FHIR/protocols/x"]))
    assert ids(client, f"ServiceRequest?instantiates-uri={PROTOCOL}ct") == {long}
    assert ids(client, f"ServiceRequest?instantiates-uri:below={PROTOCOL}c") == {long}
    assert ids(client, f"ServiceRequest?instantiates-uri:below={PROTOCOL}") == {long, other}
    assert ids(client, "ServiceRequest?instantiates-uri:below=https://overread.org/fhir/") == {long, other, parent}
    assert ids(client, "ServiceRequest?instantiates-uri:below=https://overread.org/FHIR/") == {upper}
    # above: the resource's URI is the value or a parent of it (R4 search.html#uri)
    assert ids(client, f"ServiceRequest?instantiates-uri:above={PROTOCOL}ct/v2") == {long, parent}
    assert ids(client, "ServiceRequest?instantiates-uri:above=https://overread.org/fhir/protocols/x") == {parent}
    assert ids(client, "ServiceRequest?instantiates-uri:above=https://overread.org/FHIR/protocols/x") == {upper}
    assert ids(client, "ServiceRequest?instantiates-uri:above=https://overread.org/fhir/protocolsx") == set()


def test_a_reference_to_this_servers_own_base_is_a_local_reference(client: TestClient) -> None:
    pid = created(client, patient(family="Selfbase"))
    absolute = created(client, order(f"{BASE}/Patient/{pid}"))
    relative = created(client, order(f"Patient/{pid}"))
    elsewhere = created(client, order(f"http://elsewhere.example/fhir/Patient/{pid}"))
    both = {absolute, relative}
    assert ids(client, f"ServiceRequest?subject=Patient/{pid}") == both
    assert ids(client, f"ServiceRequest?subject={BASE}/Patient/{pid}") == both
    assert ids(client, f"ServiceRequest?subject={pid}") == both
    assert ids(client, f"ServiceRequest?subject=http://elsewhere.example/fhir/Patient/{pid}") == {elsewhere}
    assert ids(client, "ServiceRequest?subject:Patient.family=selfbase") == both
    assert ids(client, "Patient?_has:ServiceRequest:subject:status=active") == {pid}
    bundle = client.get(f"/fhir/ServiceRequest?_id={absolute}&_include=ServiceRequest:subject").json()
    assert [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"] == [pid]
    bundle = client.get(f"/fhir/Patient?_id={pid}&_revinclude=ServiceRequest:subject").json()
    assert {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "include"} == both
    # The stored reference is what the client sent.
    stored = client.get(f"/fhir/ServiceRequest/{absolute}").json()
    assert stored["subject"]["reference"] == f"{BASE}/Patient/{pid}"


@pytest.mark.parametrize("reference", [f"http://elsewhere.example/{'x' * 600}/Patient/1", "urn:uuid:" + "9" * 700])
def test_a_long_absolute_reference_is_stored_and_found(client: TestClient, reference: str) -> None:
    sid = created(client, order(reference))
    assert ids(client, f"ServiceRequest?subject={reference}") == {sid}
