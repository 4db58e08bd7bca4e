"""The ordering and reader roles' compartments over HTTP with real tokens, on SQLite and PostgreSQL:
each sees its own cases and what surrounds them, nothing of another organization's (a 404 like a
missing resource's, searches, includes, chains, ``_has`` and histories that find nothing of it),
and writes only within them. The operator's scopes alone limit it."""

from typing import Any

from fastapi.testclient import TestClient

from cases.compartments import WRITTEN_BY
from testbed.roles import Case, ids, refs, token
from tests.builders import patient, service_request

DISCREPANCY = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"
Json = dict[str, Any]


def mine(cases: list[Case], **where: str) -> list[Case]:
    return [c for c in cases if all(getattr(c, k) == v for k, v in where.items())]


def assert_hidden(client: TestClient, auth: dict[str, str], reference: str) -> None:
    """``reference`` is answered as a missing resource is, its id aside, by every instance interaction."""
    rtype, rid = reference.split("/")
    for method, suffix, body in [("GET", "", None), ("GET", "/_history", None), ("GET", "/_history/1", None),
                                 ("PUT", "", {"resourceType": rtype, "id": rid}), ("DELETE", "", None)]:  # fmt: skip
        hidden = client.request(method, f"/fhir/{rtype}/{rid}{suffix}", json=body, headers=auth)
        body_missing = {**body, "id": "missing"} if body else None
        missing = client.request(method, f"/fhir/{rtype}/missing{suffix}", json=body_missing, headers=auth)
        assert hidden.status_code == missing.status_code == 404, (method, reference, hidden.text)
        assert hidden.text.replace(rid, "missing") == missing.text


def assert_compartment(client: TestClient, auth: dict[str, str], own: list[Case], other: list[Case]) -> None:
    """Every resource of ``own`` is read; every one of ``other`` is hidden (:func:`assert_hidden`)."""
    for case in own:
        for reference in refs(case):
            assert client.get(f"/fhir/{reference}", headers=auth).status_code == 200, reference
    for case in other:
        for reference in refs(case):
            assert_hidden(client, auth, reference)


def test_ordering_sees_the_cases_of_its_organization_and_what_surrounds_them(
    client: TestClient, cases: list[Case]
) -> None:
    ehr = token(client, "ehr-a")
    own, other = mine(cases, hospital="hosp-a"), mine(cases, hospital="hosp-b")
    assert_compartment(client, ehr, own, other)
    gone = f"Observation/{other[1].observation}"  # deleted, it is answered as missing too (not 410 Gone)
    assert client.delete(f"/fhir/{gone}", headers=token(client, "admin")).status_code == 200
    assert_hidden(client, ehr, gone)
    link = "/fhir/ServiceRequest/{}/$link-imaging"
    hidden, missing = (client.post(link.format(rid), headers=ehr) for rid in (other[0].order, "missing"))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.text.replace(other[0].order, "missing") == missing.text
    searched = [("ServiceRequest", "order"), ("Task", "task"), ("Patient", "patient"), ("DiagnosticReport", "report"),
                ("Observation", "observation"), ("Coverage", "coverage")]  # fmt: skip
    for rtype, attr in searched:
        found = client.get(f"/fhir/{rtype}?_total=accurate", headers=ehr).json()
        assert ids(found) == {getattr(c, attr) for c in own}, rtype
        assert found["total"] == len(own)
    # includes, :iterate, chains and _has find nothing of the other hospital's
    everything = client.get(
        "/fhir/ServiceRequest?_include=ServiceRequest:subject&_revinclude=DiagnosticReport:based-on"
        "&_revinclude:iterate=Observation:subject&_include=ServiceRequest:insurance",
        headers=ehr,
    ).json()
    assert ids(everything) == {x.split("/")[1] for c in own for x in refs(c) if "Task" not in x and "Imaging" not in x}
    all_patients = client.get("/fhir/Patient?_revinclude=Observation:subject", headers=ehr).json()
    assert ids(all_patients, "Observation") == {c.observation for c in own}
    chained = client.get("/fhir/Task?focus:ServiceRequest.subject:Patient.family=Secretfamily", headers=ehr).json()
    assert ids(chained) == {c.task for c in own}
    has = client.get("/fhir/Patient?_has:Observation:subject:value-string=Secret", headers=ehr).json()
    assert ids(has) == {c.patient for c in own}
    # a visible patient with a resource of another compartment: _has does not reach it
    shared = other[0]
    client.put(f"/fhir/Observation/{shared.observation}", headers=token(client, "admin"), json={
        "resourceType": "Observation", "id": shared.observation, "status": "final", "code": {"text": "x"},
        "subject": {"reference": f"Patient/{own[0].patient}"}, "valueString": "Elsewhere",
    })  # fmt: skip
    assert client.get("/fhir/Patient?_has:Observation:subject:value-string=Elsewhere", headers=ehr).json()["total"] == 0
    histories = client.get("/fhir/_history?_count=1000", headers=ehr).json()
    seen = {e["fullUrl"].split("/fhir/")[1] for e in histories["entry"]}
    assert {x for x in seen if not x.startswith("Organization/")} == {x for c in own for x in refs(c)}
    system = client.get("/fhir?_type=Patient,ServiceRequest", headers=ehr).json()
    assert ids(system) == {c.patient for c in own} | {c.order for c in own}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [
        {"request": {"method": "GET", "url": f"Patient/{own[0].patient}"}},
        {"request": {"method": "GET", "url": f"Patient/{other[0].patient}"}},
        {"request": {"method": "GET", "url": "ServiceRequest"}},
    ]}  # fmt: skip
    answered = client.post("/fhir", json=batch, headers=ehr).json()["entry"]
    assert [e["response"]["status"][:3] for e in answered] == ["200", "404", "200"]
    assert ids(answered[2]["resource"]) == {c.order for c in own}


def test_ordering_creates_orders_of_its_own_only(client: TestClient, cases: list[Case]) -> None:
    ehr = token(client, "ehr-a")
    own, other = mine(cases, hospital="hosp-a")[0], mine(cases, hospital="hosp-b")[0]
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:p", "resource": patient(mrn="MRN-NEW"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": service_request("urn:uuid:p", "ACSN-NEW", requester={"reference": "Organization/hosp-a"}),
         "request": {"method": "POST", "url": "ServiceRequest"}},
    ]}  # fmt: skip
    created = client.post("/fhir", json=transaction, headers=ehr)
    assert created.status_code == 200, created.text
    order = created.json()["entry"][1]["response"]["location"].split("/")[-3]
    assert client.get(f"/fhir/ServiceRequest/{order}", headers=ehr).status_code == 200
    assert client.get(f"/fhir/Task?focus=ServiceRequest/{order}", headers=ehr).json()["total"] == 1  # its case
    assert client.get(f"/fhir/ServiceRequest/{order}", headers=token(client, "ehr-b")).status_code == 404
    # an order of another hospital's, or one about another hospital's patient: refused, nothing written
    theirs = service_request(f"Patient/{own.patient}", "ACSN-X", requester={"reference": "Organization/hosp-b"})
    assert client.post("/fhir/ServiceRequest", json=theirs, headers=ehr).status_code == 403
    about = service_request(f"Patient/{other.patient}", "ACSN-Y", requester={"reference": "Organization/hosp-a"})
    assert client.post("/fhir/ServiceRequest", json=about, headers=ehr).status_code == 403
    assert (
        client.get("/fhir/ServiceRequest?identifier=ACSN-X,ACSN-Y", headers=token(client, "admin")).json()["total"] == 0
    )
    report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT"},
              "basedOn": [{"reference": f"ServiceRequest/{other.order}"}]}  # fmt: skip
    assert client.post("/fhir/DiagnosticReport", json=report, headers=ehr).status_code == 403
    # conditional interactions search outside the compartment: refused
    assert (
        client.post("/fhir/Patient", json=patient(), headers={**ehr, "If-None-Exist": "identifier=MRN-0"}).status_code
        == 403
    )
    assert client.delete("/fhir/Patient?identifier=MRN-1", headers=ehr).status_code == 403
    assert client.post("/fhir/Subscription", json={"resourceType": "Subscription"}, headers=ehr).status_code == 403
    assert client.patch(f"/fhir/Patient/{own.patient}", json=[], headers=ehr).status_code == 403


def second_opinion(order: str, subject: str) -> Json:
    return {
        "resourceType": "DiagnosticReport", "status": "preliminary",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2"}]},
        "basedOn": [{"reference": f"ServiceRequest/{order}"}], "subject": {"reference": subject},
        "resultsInterpreter": [{"display": "Dr Second Reader"}],
        "conclusion": "Agree.", "conclusionCode": [{"coding": [{"system": DISCREPANCY, "code": "agree"}]}],
    }  # fmt: skip


def test_a_reader_sees_the_cases_routed_to_it_and_reports_on_them_only(client: TestClient, cases: list[Case]) -> None:
    reader = token(client, "reader-1")
    own, other = mine(cases, reader="read-1"), mine(cases, reader="read-2")
    assert ids(client.get("/fhir/Task", headers=reader).json()) == {c.task for c in own}
    assert_compartment(client, reader, own, other)
    assert ids(client.get("/fhir/DiagnosticReport", headers=reader).json()) == {c.report for c in own}
    case = own[0]
    written = client.post("/fhir/DiagnosticReport", json=second_opinion(case.order, f"Patient/{case.patient}"),
                          headers=reader)  # fmt: skip
    assert written.status_code == 201, written.text
    assert client.get(f"/fhir/DiagnosticReport/{written.json()['id']}", headers=reader).status_code == 200
    theirs = second_opinion(other[0].order, f"Patient/{other[0].patient}")
    assert client.post("/fhir/DiagnosticReport", json=theirs, headers=reader).status_code == 403
    # another case's patient slipped into a report of its own case: refused too
    sneaked = second_opinion(case.order, f"Patient/{other[0].patient}")
    assert client.post("/fhir/DiagnosticReport", json=sneaked, headers=reader).status_code == 403
    # a reader writes reports, observations and its Tasks; no orders, no patients
    assert client.post("/fhir/Patient", json=patient(mrn="MRN-R"), headers=reader).status_code == 403
    started = client.get(f"/fhir/Task/{case.task}", headers=reader).json() | {"status": "accepted"}
    assert client.put(f"/fhir/Task/{case.task}", json=started, headers=reader).status_code == 200
    accepted = client.get(f"/fhir/Task/{other[0].task}", headers=token(client, "admin")).json()
    assert client.put(f"/fhir/Task/{other[0].task}", json=accepted, headers=reader).status_code == 404
    transaction = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": theirs, "request": {"method": "POST", "url": "DiagnosticReport"}}]}  # fmt: skip
    assert client.post("/fhir", json=transaction, headers=reader).status_code == 403


def test_the_operator_is_limited_by_its_scopes(client: TestClient, cases: list[Case]) -> None:
    operator = token(client, "operator")
    assert client.get("/hl7/messages", headers=operator).status_code == 200
    assert client.get("/fhir/Patient", headers=operator).status_code == 403
    assert client.get(f"/fhir/Patient/{cases[0].patient}", headers=operator).status_code == 403


def test_an_id_no_resource_can_have_is_missing_for_a_role_too(client: TestClient, cases: list[Case]) -> None:
    """The compartment check bound ``a\\x00`` to PostgreSQL, which refused it: a 500, not a 404."""
    for suffix in ("", "/_history/1", "/_history"):
        response = client.get(f"/fhir/Patient/a%00{suffix}", headers=token(client, "reader-1"))
        assert response.status_code == 404, response.text


def test_a_role_client_may_not_validate_against_a_type(client: TestClient, cases: list[Case]) -> None:
    """A type-level ``$validate`` checks a resource's references against the store (is the order a
    case?), so its answer could tell whether a record outside the compartment exists: refused."""
    other = mine(cases, hospital="hosp-b")[0]
    task = {"resourceType": "Task", "status": "requested", "intent": "order",
            "focus": {"reference": f"ServiceRequest/{other.order}"}}  # fmt: skip
    for client_id in ("ehr-a", "reader-1"):
        answer = client.post("/fhir/Task/$validate", json=task, headers=token(client, client_id))
        assert answer.status_code == 403, answer.text
        assert other.order not in answer.text
    assert client.post("/fhir/Task/$validate", json=task, headers=token(client, "admin")).status_code == 200


def test_the_orders_an_ordering_system_writes_are_its_own_whatever_parties_they_name(
    client: TestClient, cases: list[Case]
) -> None:
    ehr = token(client, "ehr-a")
    own = mine(cases, hospital="hosp-a")[0]
    order = service_request(f"Patient/{own.patient}", "ACSN-MINE")  # no requester, no performer
    created = client.post("/fhir/ServiceRequest", json=order, headers=ehr)
    assert created.status_code == 201, created.text
    rid = created.json()["id"]
    assert {"system": WRITTEN_BY, "code": "ehr-a"} in created.json()["meta"]["tag"]
    assert client.get(f"/fhir/ServiceRequest/{rid}", headers=ehr).status_code == 200
    assert rid in ids(client.get("/fhir/ServiceRequest?identifier=ACSN-MINE", headers=ehr).json())
    assert_hidden(client, token(client, "ehr-b"), f"ServiceRequest/{rid}")
    # an update that leaves the tag out keeps it its own
    updated = client.put(f"/fhir/ServiceRequest/{rid}", json={**order, "id": rid, "status": "revoked"}, headers=ehr)
    assert updated.status_code == 200, updated.text
    assert client.get(f"/fhir/ServiceRequest/{rid}", headers=ehr).json()["status"] == "revoked"
