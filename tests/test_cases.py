"""Every door opens a case the same way: one Task and one image-linking job per new order."""

from sqlalchemy import select

from fhir_server.repository import Repository
from fhir_server.schema import OutboxRow
from overread.app import default_hooks
from tests.builders import case_transaction, patient, service_request
from tests.hl7_golden import OMI
from tests.intake import receive


def _cases(client, order_id: str) -> list[dict]:
    bundle = client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def _jobs(db) -> list[tuple[str, str, str]]:
    with db.transaction() as session:
        rows = session.scalars(select(OutboxRow).order_by(OutboxRow.pk))
        return [(r.topic, r.resource_type, r.resource_id) for r in rows]


def test_a_posted_order_opens_a_case_and_a_linking_job(client, db):
    pid = client.post("/fhir/Patient", json=patient()).json()["id"]
    order = client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{pid}")).json()
    (task,) = _cases(client, order["id"])
    assert (task["status"], task["intent"], task["for"]) == ("requested", "order", {"reference": f"Patient/{pid}"})
    assert _jobs(db) == [("link-imaging", "ServiceRequest", order["id"])]


def test_a_transaction_that_brings_its_own_task_gets_no_second_one(client, db):
    assert client.post("/fhir", json=case_transaction()).status_code == 200
    orders = client.get("/fhir/ServiceRequest").json()["entry"]
    (order,) = [e["resource"] for e in orders]
    assert len(_cases(client, order["id"])) == 1
    assert _jobs(db) == [("link-imaging", "ServiceRequest", order["id"])]


def test_only_the_create_of_an_active_order_opens_a_case(client, db):
    draft = {**service_request("Patient/p1"), "status": "draft"}
    assert client.post("/fhir/ServiceRequest", json=draft).status_code == 201
    put = client.put("/fhir/ServiceRequest/imported-1", json={**service_request("Patient/p1"), "id": "imported-1"})
    assert put.status_code == 201  # update-as-create with a client id: an import, not an order arriving
    assert client.get("/fhir/Task").json()["total"] == 0 and _jobs(db) == []


def test_an_hl7_order_opens_its_case_once_with_its_linking_job(client, db):
    receive(db, OMI, hooks=default_hooks())
    receive(db, OMI, hooks=default_hooks())  # a resend
    (order,) = [e["resource"] for e in client.get("/fhir/ServiceRequest").json()["entry"]]
    assert len(_cases(client, order["id"])) == 1
    assert _jobs(db) == [("link-imaging", "ServiceRequest", order["id"])]


def test_a_task_of_another_intent_about_the_order_is_not_its_case(client, db):
    """Only an intent-order Task is the case (second_opinion.is_case): a plan about the order is not it."""
    transaction = case_transaction()
    plan = transaction["entry"][2]
    plan["resource"] = {**plan["resource"], "intent": "plan"}
    response = client.post("/fhir", json=transaction)
    assert response.status_code == 200, response.text
    (order,) = [e["resource"] for e in client.get("/fhir/ServiceRequest").json()["entry"]]
    intents = sorted(t["intent"] for t in _cases(client, order["id"]))
    assert intents == ["order", "plan"]


def test_the_lookups_of_the_case_rules_find_current_resources_oldest_first(db):
    """``Repository.with_token`` and ``referring`` answer what the searches they replace answered."""
    study = {"resourceType": "ImagingStudy", "status": "available", "subject": {"reference": "Patient/p1"},
             "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}]}  # fmt: skip
    with db.begin() as conn:
        repo = Repository(conn)
        first, second, gone = (repo.create(study) for _ in range(3))
        repo.delete("ImagingStudy", gone.id)
        other = repo.create({**study, "subject": {"reference": "Patient/p2"}, "identifier": []})
        assert [s.id for s in repo.with_token("ImagingStudy", "identifier", "urn:dicom:uid", "urn:oid:1.2.3")] == [
            first.id,
            second.id,
        ]
        assert [s.id for s in repo.with_token("ImagingStudy", "identifier", "urn:dicom:uid", "urn:oid:1.2.3", 1)] == [
            first.id
        ]
        assert repo.with_token("ImagingStudy", "identifier", "urn:dicom:uid", "urn:oid:1.2") == []
        assert [s.id for s in repo.referring("ImagingStudy", "subject", "Patient/p2")] == [other.id]
        assert [s.id for s in repo.referring("ImagingStudy", "patient", "Patient/p1")] == [first.id, second.id]
        assert repo.referring("ImagingStudy", "subject", "Group/p2") == []
