"""Access tokens used against /fhir and /hl7, on SQLite and PostgreSQL: each scope shape (SMART v2,
v1, wildcard, query-filtered), 401 without a valid token and 403 outside the scopes, transaction and
batch entries checked one by one, included resources outside the scopes left out, chains and _has
into types not granted refused."""

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from fhir_server.db import Database
from overread.server import running
from testbed import smart_client
from testbed.smart_client import assertion, client_entry, es384, form, smart_app
from tests.builders import patient, service_request

KEY = es384()
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
#: client_id → the scopes it is allowed, and asks for.
CLIENTS = {
    "admin": "system/*.cruds system/hl7.r",
    "patients-v2": "system/Patient.rs",
    "patients-v1": "system/Patient.read",
    "all-read": "system/*.rs",
    "all-v1": "system/*.*",
    "observations": "system/Observation.rs",
    "obs-and-patients": "system/Observation.rs system/Patient.rs",
    "labs": "system/Observation.rs?category=laboratory system/Patient.rs",
    "patient-writer": "system/Patient.c",
    "orders": "system/ServiceRequest.rus",
    "hl7-reader": "system/hl7.r",
    "hl7-operator": "system/hl7.read system/hl7.u",
    "subscriber": "system/Subscription.cru system/Observation.rs?category=laboratory",
}
Bearer = Callable[[str], dict[str, str]]


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    app = smart_app(db, [client_entry(name, KEY, scope) for name, scope in CLIENTS.items()])
    with TestClient(app, base_url="http://testserver") as c:
        c.headers.update({"content-type": "application/fhir+json"})
        yield c


@pytest.fixture
def bearer(client: TestClient) -> Bearer:
    """The Authorization header of a token for ``client_id``, asking for all it is allowed."""

    return lambda client_id: smart_client.bearer(client, KEY, client_id, CLIENTS[client_id])


def observation(subject: str, category: str, code: str = "24627-2") -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": CATEGORY, "code": category}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
        "subject": {"reference": subject},
    }


@pytest.fixture
def stored(client: TestClient, bearer: Bearer) -> dict[str, str]:
    """A Patient with a laboratory and an imaging Observation, written by the admin client."""
    admin = bearer("admin")

    def create(resource: dict[str, Any]) -> str:
        response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=admin)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    pid = create(patient())
    return {
        "patient": pid,
        "lab": create(observation(f"Patient/{pid}", "laboratory")),
        "imaging": create(observation(f"Patient/{pid}", "imaging")),
    }


def types(bundle: dict[str, Any]) -> list[str]:
    return sorted(e["resource"]["resourceType"] for e in bundle.get("entry", []))


def test_no_token_is_401_with_a_bearer_challenge(client: TestClient, stored: dict[str, str]) -> None:
    for path in ("/fhir/Patient", f"/fhir/Patient/{stored['patient']}", "/fhir", "/hl7/messages", "/hl7/outbound"):
        response = client.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"].startswith("Bearer ")
        assert response.json()["issue"][0]["code"] == "login"
    bad = client.get("/fhir/Patient", headers={"Authorization": "Bearer not-a-token"})
    assert bad.status_code == 401
    assert 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert client.post("/fhir/Patient", json=patient()).status_code == 401
    assert client.get("/fhir/metadata").status_code == 200
    # the open routes are open for their methods only: others would reach the FHIR API
    assert client.post("/fhir/metadata").status_code == 401
    assert client.get("/fhir/auth/token").status_code == 401
    assert client.delete("/fhir/.well-known/smart-configuration").status_code == 401


@pytest.mark.parametrize("client_id", ["patients-v2", "patients-v1"])
def test_a_type_scope_v2_or_v1(client: TestClient, bearer: Bearer, stored: dict[str, str], client_id: str) -> None:
    auth = bearer(client_id)
    assert client.get(f"/fhir/Patient/{stored['patient']}", headers=auth).status_code == 200
    assert client.get("/fhir/Patient/not-there", headers=auth).status_code == 404
    assert types(client.get("/fhir/Patient?family=Haugen", headers=auth).json()) == ["Patient"]
    refused = client.get(f"/fhir/Observation/{stored['lab']}", headers=auth)
    assert refused.status_code == 403
    assert refused.json()["issue"][0]["code"] == "forbidden"
    assert client.get("/fhir/Observation", headers=auth).status_code == 403
    assert client.post("/fhir/Patient", json=patient(), headers=auth).status_code == 403
    assert client.put(f"/fhir/Patient/{stored['patient']}", json=patient(), headers=auth).status_code == 403
    assert client.delete(f"/fhir/Patient/{stored['patient']}", headers=auth).status_code == 403
    assert client.post("/fhir/Subscription", json={"resourceType": "Subscription"}, headers=auth).status_code == 403


def test_wildcard_scopes(client: TestClient, bearer: Bearer, stored: dict[str, str]) -> None:
    reader = bearer("all-read")
    assert client.get(f"/fhir/Observation/{stored['imaging']}", headers=reader).status_code == 200
    assert types(client.get("/fhir?_type=Patient,Observation", headers=reader).json()) == [
        "Observation", "Observation", "Patient"
    ]  # fmt: skip
    assert client.post("/fhir/Patient", json=patient(), headers=reader).status_code == 403
    assert client.get("/hl7/messages", headers=reader).status_code == 403  # * is every FHIR type, not the HL7 store
    writer = bearer("all-v1")
    assert client.post("/fhir/Patient", json=patient(mrn="MRN-2"), headers=writer).status_code == 201


def test_a_query_filtered_scope(client: TestClient, bearer: Bearer, stored: dict[str, str]) -> None:
    labs = bearer("labs")
    found = client.get("/fhir/Observation?category=laboratory", headers=labs)
    assert found.status_code == 200
    assert [e["resource"]["id"] for e in found.json()["entry"]] == [stored["lab"]]
    assert client.get("/fhir/Observation", headers=labs).status_code == 403  # the filter is not asked
    assert client.get("/fhir/Observation?category=imaging", headers=labs).status_code == 403
    assert client.get(f"/fhir/Observation/{stored['lab']}", headers=labs).status_code == 200
    assert client.get(f"/fhir/Observation/{stored['lab']}/_history/1", headers=labs).status_code == 200
    # a resource outside the filter is answered as a missing one: the answer does not tell it exists
    hidden, missing = (client.get(f"/fhir/Observation/{rid}", headers=labs) for rid in (stored["imaging"], "nothing"))
    assert hidden.status_code == missing.status_code == 404
    text = hidden.json()["issue"][0]["diagnostics"].replace(stored["imaging"], "nothing")
    assert text == missing.json()["issue"][0]["diagnostics"]
    assert client.get(f"/fhir/Observation/{stored['imaging']}/_history/1", headers=labs).status_code == 404
    assert client.get(f"/fhir/Observation/{stored['lab']}/_history", headers=labs).status_code == 403


def test_transaction_entries_are_checked_and_a_refusal_fails_the_whole(
    client: TestClient, bearer: Bearer, stored: dict[str, str]
) -> None:
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:p",
                "resource": patient(mrn="MRN-T"),
                "request": {"method": "POST", "url": "Patient"},
            },
            {"resource": observation("urn:uuid:p", "laboratory"), "request": {"method": "POST", "url": "Observation"}},
        ],
    }
    writer = bearer("patient-writer")
    assert client.post("/fhir", json=transaction, headers=writer).status_code == 403
    mrn = client.get("/fhir/Patient?identifier=MRN-T", headers=bearer("admin")).json()
    assert mrn["total"] == 0  # nothing half-written
    transaction["entry"] = transaction["entry"][:1]
    assert client.post("/fhir", json=transaction, headers=writer).status_code == 200
    # a conditional reference is a search: it needs s on its type
    by_mrn = {"reference": "Patient?identifier=MRN-T"}
    transaction["entry"] = [{"resource": patient(mrn="MRN-U", link=[{"other": by_mrn, "type": "seealso"}]),
                             "request": {"method": "POST", "url": "Patient"}}]  # fmt: skip
    assert client.post("/fhir", json=transaction, headers=writer).status_code == 403
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"Patient/{stored['patient']}"}},
            {"request": {"method": "GET", "url": f"Observation/{stored['lab']}"}},
            {"request": {"method": "GET", "url": "Observation?category=laboratory"}},
        ],
    }
    answered = client.post("/fhir", json=batch, headers=bearer("patients-v2")).json()
    assert [e["response"]["status"][:3] for e in answered["entry"]] == ["200", "403", "403"]


def test_included_resources_outside_the_scopes_are_left_out(
    client: TestClient, bearer: Bearer, stored: dict[str, str]
) -> None:
    include = "/fhir/Observation?_include=Observation:subject"
    assert types(client.get(include, headers=bearer("observations")).json()) == ["Observation", "Observation"]
    both = types(client.get(include, headers=bearer("obs-and-patients")).json())
    assert both == ["Observation", "Observation", "Patient"]
    revinclude = "/fhir/Patient?_revinclude=Observation:subject"
    assert types(client.get(revinclude, headers=bearer("patients-v2")).json()) == ["Patient"]
    # a query-filtered scope: only the resources matching it come along
    labs = client.get(revinclude, headers=bearer("labs")).json()
    assert [e["resource"]["id"] for e in labs["entry"] if e["search"]["mode"] == "include"] == [stored["lab"]]
    iterate = "/fhir/Observation?_include=Observation:subject&_revinclude:iterate=Observation:subject"
    assert types(client.get(iterate, headers=bearer("observations")).json()) == ["Observation", "Observation"]


def test_chains_and_has_into_types_not_granted_are_refused(
    client: TestClient, bearer: Bearer, stored: dict[str, str]
) -> None:
    chain = "/fhir/Observation?subject:Patient.family=Haugen"
    assert client.get(chain, headers=bearer("observations")).status_code == 403
    assert types(client.get(chain, headers=bearer("obs-and-patients")).json()) == ["Observation", "Observation"]
    has = "/fhir/Patient?_has:Observation:subject:category=imaging"
    assert client.get(has, headers=bearer("patients-v2")).status_code == 403
    assert types(client.get(has, headers=bearer("obs-and-patients")).json()) == ["Patient"]
    # the filtered scope grants no search of Observation without its query: no _has through it either
    assert client.get(has, headers=bearer("labs")).status_code == 403


def test_history_and_operations(client: TestClient, bearer: Bearer, stored: dict[str, str]) -> None:
    auth = bearer("patients-v2")
    assert client.get(f"/fhir/Patient/{stored['patient']}/_history", headers=auth).status_code == 200
    assert client.get("/fhir/Patient/_history", headers=auth).status_code == 200
    assert client.get("/fhir/_history", headers=auth).status_code == 403
    assert client.get("/fhir/_history", headers=bearer("all-read")).status_code == 200
    assert client.post("/fhir/Patient/$validate", json=patient(), headers=auth).status_code == 200
    assert client.post("/fhir/Observation/$validate", json=patient(), headers=auth).status_code == 403
    order = client.post(
        "/fhir/ServiceRequest", json=service_request(f"Patient/{stored['patient']}"), headers=bearer("admin")
    )
    link = f"/fhir/ServiceRequest/{order.json()['id']}/$link-imaging"
    assert client.post(link, headers=bearer("all-read")).status_code == 403
    assert client.post(link, headers=bearer("orders")).status_code == 202


def test_hl7_routes_need_hl7_scopes(client: TestClient, bearer: Bearer) -> None:
    assert client.get("/hl7/messages", headers=bearer("all-v1")).status_code == 403
    reader = bearer("hl7-reader")
    assert client.get("/hl7/messages", headers=reader).status_code == 200
    assert client.get("/hl7/outbound", headers=reader).status_code == 200
    assert client.post("/hl7/messages/1/replay", headers=reader).status_code == 403
    assert client.post("/hl7/messages/1/replay", headers=bearer("hl7-operator")).status_code == 404  # allowed; none


def test_the_hl7_apis_schema_is_for_those_who_may_read_the_hl7_api(client: TestClient, bearer: Bearer) -> None:
    assert client.get("/openapi.json").status_code == 401
    assert client.get("/openapi.json", headers=bearer("all-v1")).status_code == 403
    schema = client.get("/openapi.json", headers=bearer("hl7-reader"))
    assert schema.status_code == 200
    assert {"/hl7/messages", "/hl7/outbound"} <= set(schema.json()["paths"])


def test_a_token_over_a_real_socket(db: Database) -> None:
    app = smart_app(db, [client_entry("ehr", KEY, "system/Patient.cruds")])
    with running(app) as root, httpx.Client(base_url=f"{root}/fhir") as http:
        assert http.get("/Patient").status_code == 401
        data = form(assertion(KEY, "ehr", f"{root}/fhir/auth/token"), "system/Patient.cruds")
        granted = http.post("/auth/token", data=data)
        assert granted.status_code == 200, granted.text
        auth = {"Authorization": f"Bearer {granted.json()['access_token']}"}
        created = http.post("/Patient", json=patient(), headers={**auth, "content-type": "application/fhir+json"})
        assert created.status_code == 201
        assert http.get(f"/Patient/{created.json()['id']}", headers=auth).status_code == 200
        assert http.get("/Observation", headers=auth).status_code == 403


def test_a_subscription_is_refused_for_what_its_writer_may_not_search_and_read(
    client: TestClient, bearer: Bearer
) -> None:
    """A Subscription pushes every resource its criteria match: only what its writer may ask for itself."""
    subscriber = bearer("subscriber")

    def subscription(criteria: str) -> dict[str, Any]:
        channel = {"type": "rest-hook", "endpoint": "https://ehr.example.org/hook", "payload": "application/fhir+json"}
        return {
            "resourceType": "Subscription",
            "status": "requested",
            "reason": "r",
            "criteria": criteria,
            "channel": channel,
        }

    for criteria in ("DiagnosticReport?status=final", "Observation", "Observation?category=imaging"):
        refused = client.post("/fhir/Subscription", json=subscription(criteria), headers=subscriber)
        assert refused.status_code == 403, (criteria, refused.text)
        batch = {"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": subscription(criteria), "request": {"method": "POST", "url": "Subscription"}}]}  # fmt: skip
        assert client.post("/fhir", json=batch, headers=subscriber).status_code == 403, criteria
    # within its scopes it passes access control; no endpoint is configured here, so the egress rule answers
    allowed = client.post(
        "/fhir/Subscription", json=subscription("Observation?category=laboratory"), headers=subscriber
    )
    assert allowed.status_code == 422 and "allowed_endpoints" in allowed.text, allowed.text
