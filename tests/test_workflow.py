"""The case workflow and the report rules (cases.workflow), and routing (cases.routing).

Task status moves along the R4 state machine (409 business-rule otherwise), the ServiceRequest
follows its case, a final second-opinion report completes it, reports move preliminary → final →
amended/corrected/appended, the original report is referenced, new cases are routed and the
overdue ones found by search; HL7 order control goes through the same rules.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import pytest
from fastapi.testclient import TestClient

from cases.workflow import COMPARED_REPORT, ORDER_STATUS
from fhir_server.db import Database
from mappings.order_control import STATUSES
from mappings.original_report import REPORT_ROLE
from overread.app import create_app, default_hooks
from overread.config import ConfigError, OverreadConfig, load
from overread.settings import Settings
from tests.builders import assert_outcome, imaging_study, patient, service_request
from tests.conftest import FHIR_JSON
from tests.hl7_golden import OMI, omi_control
from tests.intake import receive

Json = dict[str, Any]
DCM = "http://dicom.nema.org/resources/ontology/DCM"
DISCREPANCY = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"
ROUTING = {
    "routing": [
        {"owner": {"reference": "Organization/neuro-group", "display": "Neuroradiology"}, "performer_type": "neuro"},
        {
            "owner": {"reference": "Practitioner/msk-reader", "display": "Dr. Berg"},
            "modality": ["MR"],
            "body_site": ["knee", "shoulder"],
        },
        {"owner": {"reference": "Organization/body-ct"}, "modality": "CT"},
    ],
    "due": {"routine": "72h", "urgent": "24h", "asap": "8h", "stat": "PT1H"},
}


@pytest.fixture
def routed(db: Database) -> Iterator[TestClient]:
    """A client of a server with the routing rules above."""
    cfg = OverreadConfig.model_validate(ROUTING)
    with TestClient(create_app(Settings(database_url=db.url), db, cfg), base_url="http://testserver") as c:
        c.headers.update(FHIR_JSON)
        yield c


def _open_case(client: TestClient, images: bool = True, **order: Any) -> tuple[str, Json]:
    """Post a Patient and an active order (and its images); return the order id and the case's Task."""
    pid = client.post("/fhir/Patient", json=patient()).json()["id"]
    sr = client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{pid}", **order))
    assert sr.status_code == 201, sr.text
    if images:
        _link_images(client, sr.json()["id"])
    return sr.json()["id"], _case(client, sr.json()["id"])


def _link_images(client: TestClient, order_id: str) -> str:
    study = client.post("/fhir/ImagingStudy", json=imaging_study(f"ServiceRequest/{order_id}", "Patient/p"))
    assert study.status_code == 201, study.text
    study_id: str = study.json()["id"]
    return study_id


def _case(client: TestClient, order_id: str) -> Json:
    (entry,) = client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"]
    resource: Json = entry["resource"]
    return resource


def _set(client: TestClient, resource: Json, **changes: Any) -> Any:
    return client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json={**resource, **changes})


def _status(client: TestClient, rtype: str, rid: str) -> str:
    status: str = client.get(f"/fhir/{rtype}/{rid}").json()["status"]
    return status


def _report(order_id: str, status: str, **extra: Any) -> Json:
    """A second-opinion report of the order: a major discrepancy against the original."""
    order = f"ServiceRequest/{order_id}"
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "basedOn": [{"reference": order}],
        "subject": {"display": "the order's patient"},
        "resultsInterpreter": [{"display": "Dr Second Reader"}],
        "conclusion": "Missed 9 mm nodule in the right upper lobe.",
        "conclusionCode": [{"coding": [{"system": DISCREPANCY, "code": "major", "display": "Major discrepancy"}]}],
        **extra,
    }


# -- Task transitions ----------------------------------------------------------------


def test_a_case_moves_along_legal_transitions_and_its_order_follows(client):
    order_id, task = _open_case(client)
    assert task["status"] == "requested"
    for status, order_status in [
        ("received", "active"),
        ("accepted", "active"),
        ("in-progress", "active"),
        ("on-hold", "on-hold"),
        ("in-progress", "active"),
        ("completed", "completed"),
    ]:
        response = _set(client, task, status=status)
        assert response.status_code == 200, response.text
        task = response.json()
        assert _status(client, "ServiceRequest", order_id) == order_status, status


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], "completed"),  # requested → completed: not started, and no report
        ([], "in-progress"),  # requested → in-progress: never accepted
        (["received", "rejected"], "accepted"),  # rejected is final
        (["accepted", "in-progress", "completed"], "in-progress"),  # completed is final
        (["cancelled"], "requested"),
    ],
)
def test_an_illegal_move_is_409_naming_from_to_and_the_legal_next_states(client, path, illegal):
    _, task = _open_case(client)
    for status in path:
        task = _set(client, task, status=status).json()
    before = task["status"]
    body = assert_outcome(_set(client, task, status=illegal), 409)
    (issue,) = body["issue"]
    assert issue["code"] == "business-rule"
    assert f"Task/{task['id']} cannot go from {before!r} to {illegal!r}" in issue["diagnostics"]
    assert "entered-in-error" in issue["diagnostics"]  # the legal next states are listed
    assert _status(client, "Task", task["id"]) == before  # nothing written


def test_the_legal_next_states_are_listed(client):
    _, task = _open_case(client)
    diagnostics = assert_outcome(_set(client, task, status="completed"), 409)["issue"][0]["diagnostics"]
    assert diagnostics.endswith("accepted, cancelled, entered-in-error, on-hold, ready, received, rejected")


@pytest.mark.parametrize(("status", "order_status"), [("cancelled", "revoked"), ("rejected", "revoked")])
def test_a_case_that_ends_unread_revokes_its_order(client, status, order_status):
    order_id, task = _open_case(client)
    assert _set(client, task, status=status).status_code == 200
    assert _status(client, "ServiceRequest", order_id) == order_status


def test_entered_in_error_is_legal_from_anywhere_and_leaves_the_order(client):
    order_id, task = _open_case(client)
    task = _set(client, task, status="cancelled").json()
    assert _set(client, task, status="entered-in-error").status_code == 200
    assert _status(client, "ServiceRequest", order_id) == "revoked"


def test_other_changes_to_a_case_and_tasks_of_no_case_are_not_restricted(client):
    _, task = _open_case(client)
    assert _set(client, task, businessStatus={"text": "awaiting images"}).status_code == 200
    other = {"resourceType": "Task", "status": "requested", "intent": "proposal"}
    created = client.post("/fhir/Task", json=other).json()
    assert _set(client, created, status="completed").status_code == 200


# -- reports -------------------------------------------------------------------------


def test_a_preliminary_report_leaves_the_case_open_and_a_final_one_completes_it(client):
    order_id, _ = _open_case(client)
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary")).json()
    assert _case(client, order_id)["status"] == "requested"
    final = _set(client, report, status="final")
    assert final.status_code == 200, final.text
    case = _case(client, order_id)
    assert case["status"] == "completed"
    assert case["output"] == [
        {"type": {"text": "second-opinion report"}, "valueReference": {"reference": f"DiagnosticReport/{report['id']}"}}
    ]
    assert _status(client, "ServiceRequest", order_id) == "completed"


def test_a_final_report_cannot_go_back_to_preliminary_but_can_be_corrected(client):
    order_id, _ = _open_case(client)
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "final")).json()
    body = assert_outcome(_set(client, report, status="preliminary"), 409)
    assert body["issue"][0]["code"] == "business-rule"
    assert "from 'final' to 'preliminary'" in body["issue"][0]["diagnostics"]
    assert "amended, appended, corrected, entered-in-error" in body["issue"][0]["diagnostics"]
    corrected = _set(client, report, status="corrected", conclusion="Missed 9 mm nodule, right lower lobe.")
    assert corrected.status_code == 200, corrected.text
    amended = _set(client, corrected.json(), status="amended")
    assert amended.status_code == 200
    assert _set(client, amended.json(), status="entered-in-error").status_code == 200
    case = _case(client, order_id)
    assert case["status"] == "completed" and len(case["output"]) == 1  # the same report, once


def test_a_report_cannot_complete_a_cancelled_case(client):
    order_id, task = _open_case(client)
    _set(client, task, status="cancelled")
    body = assert_outcome(client.post("/fhir/DiagnosticReport", json=_report(order_id, "final")), 409)
    assert "is 'cancelled': a report cannot complete it" in body["issue"][0]["diagnostics"]
    assert client.get("/fhir/DiagnosticReport").json()["total"] == 0  # the whole request rolled back


def test_a_report_in_progress_case_completes_from_in_progress(client):
    order_id, task = _open_case(client)
    for status in ("accepted", "in-progress"):
        task = _set(client, task, status=status).json()
    assert client.post("/fhir/DiagnosticReport", json=_report(order_id, "final")).status_code == 201
    assert _case(client, order_id)["status"] == "completed"


def test_the_report_references_the_original_report_of_the_case(client):
    order_id, _ = _open_case(client)
    original = {
        **_report(order_id, "final", conclusion="No focal lesion."),
        "meta": {"tag": [{"system": REPORT_ROLE, "code": "original"}]},
    }
    original.pop("conclusionCode")
    original_id = client.post("/fhir/DiagnosticReport", json=original).json()["id"]
    assert _case(client, order_id)["status"] == "requested"  # an original report completes nothing
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary")).json()
    compared = {"url": COMPARED_REPORT, "valueReference": {"reference": f"DiagnosticReport/{original_id}"}}
    assert report["extension"] == [compared]
    again = _set(client, report, status="final").json()
    assert again["extension"] == [compared]  # not added twice


def test_no_compared_report_without_an_original(client):
    order_id, _ = _open_case(client)
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary")).json()
    assert "extension" not in report


# -- routing and due dates -------------------------------------------------------------


def _concept(*codes: str, system: str | None = None) -> Json:
    return {"coding": [{**({"system": system} if system else {}), "code": c} for c in codes]}


@pytest.mark.parametrize(
    ("order", "owner"),
    [
        ({"performerType": {"text": "Neuro"}}, "Organization/neuro-group"),
        ({"performerType": _concept("NEURO")}, "Organization/neuro-group"),
        (
            {"code": _concept("MR", system=DCM), "bodySite": [{"coding": [{"code": "X", "display": "Knee"}]}]},
            "Practitioner/msk-reader",
        ),
        ({"code": _concept("MR", system=DCM), "bodySite": [{"text": "Head"}]}, None),  # MR, but not MSK
        ({"category": [_concept("CT", system=DCM)]}, "Organization/body-ct"),
        ({"code": _concept("CT")}, None),  # a CT code of no DCM system is no modality
        ({"performerType": {"text": "neuro"}, "code": _concept("CT", system=DCM)}, "Organization/neuro-group"),
    ],
)
def test_routing_assigns_the_owner_of_the_first_matching_rule(routed, order, owner):
    _, task = _open_case(routed, **order)
    assert task.get("owner", {}).get("reference") == owner


@pytest.mark.parametrize(
    ("priority", "due"),
    [
        ("routine", "2024-03-08T08:12:00Z"),
        ("urgent", "2024-03-06T08:12:00Z"),
        ("asap", "2024-03-05T16:12:00Z"),
        ("stat", "2024-03-05T09:12:00Z"),
    ],
)
def test_the_priority_sets_the_due_date_from_authored_on(routed, priority, due):
    _, task = _open_case(routed, priority=priority)  # authoredOn 2024-03-05T09:12:00+01:00
    assert task["restriction"] == {"period": {"end": due}}


def test_an_hl7_order_is_routed_too(routed, db):
    receive(db, OMI, hooks=default_hooks())
    (entry,) = routed.get("/fhir/Task").json()["entry"]
    task = entry["resource"]
    assert task["meta"]["versionId"] == "1"  # routed as it was written, not in a second version
    assert "end" in task["restriction"]["period"]


def test_overdue_open_cases_are_found_by_search(routed):
    due = {}
    for n, (authored, priority) in enumerate(
        [("2026-11-20T08:00:00Z", "routine"), ("2026-11-28T10:00:00Z", "stat"), ("2026-11-28T10:00:00Z", "routine")]
    ):
        order = service_request("Patient/p1", f"ACSN-{n}", authoredOn=authored, priority=priority)
        order_id = routed.post("/fhir/ServiceRequest", json=order).json()["id"]
        due[n] = _case(routed, order_id)
    done = _set(routed, due[0], status="cancelled").json()  # overdue, but closed
    order = service_request("Patient/p1", "ACSN-9", authoredOn="2026-11-01T08:00:00Z")
    late = _case(routed, routed.post("/fhir/ServiceRequest", json=order).json()["id"])

    found = routed.get("/fhir/Task", params={"due": "lt2026-11-28T12:00:00Z", "status:not": "completed"}).json()
    assert {e["resource"]["id"] for e in found["entry"]} == {due[1]["id"], late["id"], done["id"]}
    params = [("due", "lt2026-11-28T12:00:00Z"), ("status:not", "completed"), ("status:not", "cancelled")]
    found = routed.get("/fhir/Task", params=params).json()
    assert {e["resource"]["id"] for e in found["entry"]} == {due[1]["id"], late["id"]}


def test_the_capability_statement_lists_the_due_parameter(client):
    (task,) = [r for r in client.get("/fhir/metadata").json()["rest"][0]["resource"] if r["type"] == "Task"]
    (due,) = [p for p in task["searchParam"] if p["name"] == "due"]
    assert due == {"name": "due", "type": "date", "definition": "https://overread.org/fhir/SearchParameter/Task-due"}


def test_routing_config_is_strict(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text("routing:\n  - owner: {reference: Practitioner/p1}\n    modality: MR\ndue:\n  stat: 30m\n")
    routing = load(good).routing_rules()
    assert routing.rules[0].modality == ("MR",) and routing.due["stat"].total_seconds() == 1800
    assert routing.due["routine"].total_seconds() == 72 * 3600  # the defaults stay
    for text in (
        "routing:\n  - owner: {reference: neuro-group}\n",  # not a reference
        "routing:\n  - owner: {reference: Organization/x}\n    modalty: [CT]\n",  # misspelt
        "due:\n  whenever: 1h\n",
        "due:\n  stat: soon\n",
    ):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=r"bad\.yaml"):
            load(bad)


# -- HL7 order control through the same rules ------------------------------------------


def _msa(ack: bytes) -> str:
    return str(hl7.parse(ack.decode()).segment("MSA")[1])


def _hl7_case(client: TestClient) -> tuple[str, str]:
    (order,) = client.get("/fhir/ServiceRequest").json()["entry"]
    order_id = order["resource"]["id"]
    return _status(client, "ServiceRequest", order_id), _case(client, order_id)["status"]


def test_hl7_hold_release_and_cancel_go_through_the_workflow(client, db):
    assert _msa(receive(db, OMI, hooks=default_hooks())) == "AA"
    assert _msa(receive(db, omi_control("HD", 1), hooks=default_hooks())) == "AA"
    assert _hl7_case(client) == ("on-hold", "on-hold")
    assert _msa(receive(db, omi_control("RL", 2), hooks=default_hooks())) == "AA"
    assert _hl7_case(client) == ("active", "requested")
    assert _msa(receive(db, omi_control("CA", 3), hooks=default_hooks())) == "AA"
    assert _hl7_case(client) == ("revoked", "cancelled")
    assert _msa(receive(db, omi_control("RL", 4), hooks=default_hooks())) == "AE"  # a cancelled case stays cancelled
    assert _hl7_case(client) == ("revoked", "cancelled")


def test_hl7_cancel_of_a_completed_case_is_an_application_error(client, db):
    receive(db, OMI, hooks=default_hooks())
    (order,) = client.get("/fhir/ServiceRequest").json()["entry"]
    _link_images(client, order["resource"]["id"])
    assert client.post("/fhir/DiagnosticReport", json=_report(order["resource"]["id"], "final")).status_code == 201
    assert _msa(receive(db, omi_control("CA", 1), hooks=default_hooks())) == "AE"
    assert _hl7_case(client) == ("completed", "completed")


def test_hl7_order_control_changes_the_case_not_another_task_about_the_order(client, db):
    receive(db, OMI, hooks=default_hooks())
    (order,) = client.get("/fhir/ServiceRequest").json()["entry"]
    case_id = _case(client, order["resource"]["id"])["id"]
    focus = {"reference": f"ServiceRequest/{order['resource']['id']}"}
    plan = {"resourceType": "Task", "status": "requested", "intent": "plan", "focus": focus}
    plan_id = client.post("/fhir/Task", json=plan).json()["id"]
    assert _msa(receive(db, omi_control("SC", 1, order_status="IP"), hooks=default_hooks())) == "AA"
    assert _msa(receive(db, omi_control("CA", 2), hooks=default_hooks())) == "AA"
    case = client.get(f"/fhir/Task/{case_id}").json()
    assert (case["status"], case["businessStatus"]["coding"][0]["code"]) == ("cancelled", "IP")
    untouched = client.get(f"/fhir/Task/{plan_id}").json()
    assert (untouched["status"], untouched["meta"]["versionId"]) == ("requested", "1")


def test_order_control_sets_the_order_status_its_case_task_gives_the_order():
    """HL7 order control (mappings.order_control) and the workflow (ORDER_STATUS) say the same of the order."""
    for request_status, task_status in STATUSES.values():
        assert request_status == (ORDER_STATUS[task_status] if task_status else None)


def test_a_report_that_names_no_images_gets_the_studies_linked_to_its_order(client):
    order_id, _ = _open_case(client, images=False)
    study_id = _link_images(client, order_id)
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary")).json()
    assert report["imagingStudy"] == [{"reference": f"ImagingStudy/{study_id}"}]
    named = client.post(
        "/fhir/DiagnosticReport",
        json=_report(order_id, "preliminary", imagingStudy=[{"reference": "ImagingStudy/other"}]),
    )
    assert named.json()["imagingStudy"] == [{"reference": "ImagingStudy/other"}]  # the reader's choice stands


def test_a_case_that_already_lists_the_final_report_is_not_written_again(client):
    """The client's own output (with a display) counts: no second output; the same report again: no new version."""
    order_id, task = _open_case(client)
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary")).json()
    output = {
        "type": {"text": "report"},
        "valueReference": {"reference": f"DiagnosticReport/{report['id']}", "display": "2nd read"},
    }
    completed = _set(client, task, status="completed", output=[output])
    assert completed.status_code == 200, completed.text
    final = _set(client, report, status="final")
    assert final.status_code == 200
    case = _case(client, order_id)
    assert case["output"] == [output] and case["businessStatus"]["coding"][0]["code"] == "reported"
    assert client.put(f"/fhir/DiagnosticReport/{report['id']}", json=final.json()).status_code == 200
    assert _case(client, order_id)["meta"]["versionId"] == case["meta"]["versionId"]


def test_a_final_report_is_changed_by_correcting_it_not_by_another_final(client):
    order_id, _ = _open_case(client)
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "final")).json()
    assert client.put(f"/fhir/DiagnosticReport/{report['id']}", json=report).status_code == 200  # the same again
    changed = {**report, "conclusion": "On review: no nodule."}
    body = assert_outcome(client.put(f"/fhir/DiagnosticReport/{report['id']}", json=changed), 409)
    assert "amended, corrected or appended" in body["issue"][0]["diagnostics"]
    corrected = client.put(f"/fhir/DiagnosticReport/{report['id']}", json={**changed, "status": "corrected"})
    assert corrected.status_code == 200
