"""An outside FHIR client (fhirpy's SyncFHIRClient) against the running server.

CRUD, conditional update, search with paging (``fetch_all`` follows ``next`` links over
several pages) and a transaction, on SQLite and on PostgreSQL.
"""

import pytest
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, OperationOutcome, ResourceNotFound

from tests.builders import (
    ACSN_SYSTEM,
    MRN_SYSTEM,
    bundle,
    case_transaction,
    patient,
    post,
    service_request,
)

pytestmark = pytest.mark.server


@pytest.fixture
def fhir(live_server: str) -> SyncFHIRClient:
    return SyncFHIRClient(live_server, extra_headers={"Content-Type": "application/fhir+json"})


def test_crud(fhir):
    created = fhir.resource("Patient", **patient())
    created.save()
    assert created.id and created["meta"]["versionId"] == "1"

    fetched = fhir.reference("Patient", created.id).to_resource()
    assert fetched["identifier"][0]["value"] == "MRN-100234"
    assert fetched.get_by_path(["name", 0, "family"]) == "Haugen"

    fetched["name"][0]["family"] = "Haugen-Berg"
    fetched.save()
    assert fetched["meta"]["versionId"] == "2"
    assert fhir.get("Patient", created.id)["name"][0]["family"] == "Haugen-Berg"

    created.refresh()  # sends If-None-Match; either way it ends up current
    assert created["meta"]["versionId"] == "2"

    fetched.delete()
    with pytest.raises(ResourceNotFound):  # 410 Gone
        fhir.get("Patient", created.id)
    old = fhir.execute(f"Patient/{created.id}/_history/1", method="get")
    assert old["name"][0]["family"] == "Haugen"


def test_references_between_resources(fhir):
    p = fhir.resource("Patient", **patient())
    p.save()
    sr = fhir.resource("ServiceRequest", **service_request(p.reference))
    sr.save()
    assert sr["subject"].to_resource()["id"] == p.id
    found = fhir.resources("ServiceRequest").search(subject=p.reference).fetch_all()
    assert [s.id for s in found] == [sr.id]


def test_errors_come_back_as_operation_outcomes(fhir):
    with pytest.raises(ResourceNotFound):
        fhir.get("Patient", "nobody")
    with pytest.raises(OperationOutcome) as raised:
        fhir.resource("Patient", **patient(), favouriteColour="teal").save()
    assert raised.value.resource["resourceType"] == "OperationOutcome"


def test_conditional_update_creates_then_updates(fhir):
    search = fhir.resources("Patient").search(identifier=f"{MRN_SYSTEM}|MRN-100234")
    first, created = search.update(fhir.resource("Patient", **patient()))
    second, created_again = search.update(fhir.resource("Patient", **patient(family="Berg")))
    assert (created, created_again) == (True, False)
    assert first.id == second.id and second["meta"]["versionId"] == "2"
    fhir.resource("Patient", **patient(given="Twin")).save()
    with pytest.raises(MultipleResourcesFound):  # 412: the criteria match two
        search.update(fhir.resource("Patient", **patient()))


def test_search_pages_through_everything(fhir):
    fhir.execute(
        "",
        data=bundle("transaction", *(post(patient(mrn=f"MRN-{n:03d}", family="Nilsen")) for n in range(45))),
    )
    fhir.resource("Patient", **patient(family="Other")).save()

    search = fhir.resources("Patient").search(family="Nilsen").limit(10)
    assert search.count() == 45
    assert len(search.fetch()) == 10
    everyone = search.fetch_all()  # follows 5 pages of next links
    assert len(everyone) == 45
    assert sorted(p["identifier"][0]["value"] for p in everyone) == [f"MRN-{n:03d}" for n in range(45)]
    assert search.sort("-identifier").first()["identifier"][0]["value"] == "MRN-044"


def test_transaction(fhir):
    response = fhir.execute("", data=case_transaction())
    assert response["type"] == "transaction-response"
    assert [e["response"]["status"] for e in response["entry"]] == ["201 Created"] * 3
    patient_ref = "/".join(response["entry"][0]["response"]["location"].split("/")[-4:-2])

    sr = fhir.resources("ServiceRequest").search(identifier=f"{ACSN_SYSTEM}|ACSN-2024-000871").get()
    assert sr["subject"]["reference"] == patient_ref
    task = fhir.resources("Task").search(focus=f"ServiceRequest/{sr.id}").get()
    assert task["status"] == "requested" and task["for"]["reference"] == patient_ref

    again = fhir.execute("", data=case_transaction(accession="ACSN-2024-000872"))
    assert again["entry"][0]["response"]["status"] == "200 OK"
    assert fhir.resources("Patient").count() == 1
    assert fhir.resources("ServiceRequest").search(subject=patient_ref).count() == 2


def test_patch_from_fhirpy(fhir):
    """fhirpy's ``patch`` sends the changed elements as an object: a JSON Merge Patch (RFC 7386)."""
    created = fhir.resource("Patient", **patient(mrn="MRN-PATCH"))
    created.save()
    created.patch(active=False, gender="male")
    stored = fhir.get("Patient", created.id)
    assert stored["active"] is False and stored["gender"] == "male" and stored["meta"]["versionId"] == "2"
    assert stored["identifier"][0]["value"] == "MRN-PATCH"  # what the patch did not name stays
    with pytest.raises(OperationOutcome):
        created.patch(gender="yes")  # the result must still be valid FHIR: 422
