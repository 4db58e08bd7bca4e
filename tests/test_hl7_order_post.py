"""A mapped order Bundle, posted to the FHIR server, opens one case; posting it again opens none."""

import pytest

from tests.hl7_golden import DCM4CHE, GOLDEN, outcome

COUNTED = ("Patient", "ServiceRequest", "Task", "Organization", "Encounter", "Coverage")


def _count(client, rtype: str) -> int:
    response = client.get(f"/fhir/{rtype}", params={"_summary": "count"})
    assert response.status_code == 200, response.text
    return response.json()["total"]


@pytest.mark.parametrize(
    "message",
    [DCM4CHE / "OMI_O23-ImagingOrder.hl7", GOLDEN / "orm_crlf_bom.hl7"],
    ids=["dcm4che-OMI_O23", "orm_crlf_bom"],
)
def test_posting_a_mapped_order_twice_creates_one_case(client, message):
    bundle = outcome(message)
    first = client.post("/fhir", json=bundle)
    assert first.status_code == 200, first.text
    statuses = [e["response"]["status"] for e in first.json()["entry"]]
    assert all(s.startswith("201") for s in statuses), statuses
    counts = {rtype: _count(client, rtype) for rtype in COUNTED}
    assert counts["Patient"] == counts["ServiceRequest"] == counts["Task"] == 1

    again = client.post("/fhir", json=bundle)
    assert again.status_code == 200, again.text
    assert {rtype: _count(client, rtype) for rtype in COUNTED} == counts

    task = client.get("/fhir/Task").json()["entry"][0]["resource"]
    sr = client.get("/fhir/ServiceRequest").json()["entry"][0]["resource"]
    patient = client.get("/fhir/Patient").json()["entry"][0]["resource"]
    assert task["status"] == "requested"
    assert task["focus"]["reference"] == f"ServiceRequest/{sr['id']}"
    assert sr["subject"]["reference"] == f"Patient/{patient['id']}"


def test_the_order_context_is_stored_and_linked_and_a_resend_adds_nothing(client):
    bundle = outcome(GOLDEN / "orm_order_context.hl7")
    first = client.post("/fhir", json=bundle)
    assert first.status_code == 200, first.text
    counted = ("Condition", "AllergyIntolerance", "Observation")
    counts = {rtype: _count(client, rtype) for rtype in counted}
    assert counts == {"Condition": 2, "AllergyIntolerance": 2, "Observation": 3}
    sr = client.get("/fhir/ServiceRequest").json()["entry"][0]["resource"]
    assert sr["priority"] == "stat"  # sent in OBR-27.6 only, beside a PRN in ORC-7.6
    reasons = [client.get(f"/fhir/{r['reference']}").json() for r in sr["reasonReference"]]
    assert {c["code"]["coding"][0]["code"] for c in reasons} == {"R52", "S82.6"}
    patient_id = sr["subject"]["reference"]
    allergies = client.get("/fhir/AllergyIntolerance", params={"patient": patient_id}).json()
    assert {e["resource"]["code"].get("text", "") for e in allergies["entry"]} >= {"Peanut"}

    again = client.post("/fhir", json=bundle)  # a resend (or an XO) updates the same resources
    assert again.status_code == 200, again.text
    assert {rtype: _count(client, rtype) for rtype in counted} == counts


def test_a_document_sent_with_an_order_and_a_report_with_its_study_are_stored(client):
    document = client.post("/fhir", json=outcome(GOLDEN / "orm_document_not_report.hl7"))
    assert document.status_code == 200, document.text
    assert (_count(client, "DocumentReference"), _count(client, "DiagnosticReport")) == (1, 0)
    report = client.post("/fhir", json=outcome(GOLDEN / "oru_accession_obr20_override.hl7"))
    assert report.status_code == 200, report.text
    stored = client.get("/fhir/DiagnosticReport").json()["entry"][0]["resource"]
    assert stored["imagingStudy"][0]["identifier"]["value"] == "urn:oid:1.2.826.0.1.3680043.2.1125.400"


def test_the_visit_and_the_ordering_facility_are_stored_and_a_resend_adds_nothing(client):
    bundle = outcome(GOLDEN / "orm_visit_and_requester.hl7")
    first = client.post("/fhir", json=bundle)
    assert first.status_code == 200, first.text
    counted = ("Location", "PractitionerRole", "Organization", "Practitioner", "Coverage")
    counts = {rtype: _count(client, rtype) for rtype in counted}
    assert counts == {"Location": 1, "PractitionerRole": 1, "Organization": 5, "Practitioner": 3, "Coverage": 1}
    sr = client.get("/fhir/ServiceRequest").json()["entry"][0]["resource"]
    role = client.get(f"/fhir/{sr['requester']['reference']}").json()
    doctor = client.get(f"/fhir/{role['practitioner']['reference']}").json()
    facility = client.get(f"/fhir/{role['organization']['reference']}").json()
    assert (doctor["identifier"][0]["value"], facility["name"]) == ("REF-1", "Akutmottagningen")
    encounter = client.get(f"/fhir/{sr['encounter']['reference']}").json()
    bed = client.get(f"/fhir/{encounter['location'][0]['location']['reference']}").json()
    assert (bed["name"], bed["operationalStatus"]["code"]) == ("NORTHHOSP / W4 / 401 / B", "O")
    coverage = client.get("/fhir/Coverage").json()["entry"][0]["resource"]
    assert coverage["contained"][0]["patient"] == sr["subject"]  # the contained insured points at the patient

    again = client.post("/fhir", json=bundle)
    assert again.status_code == 200, again.text
    assert {rtype: _count(client, rtype) for rtype in counted} == counts
