"""The second-opinion report rules (docs/workflow.md, docs/conformance.md), on SQLite and PostgreSQL.

- Coding consistency: a RADPEER score and a discrepancy level that the ConceptMap
  radpeer-to-discrepancy does not pair are refused (422), on the report and on its findings, and
  ``$validate`` reports the same issues; a code outside its ValueSet lists the allowed ones.
- A report needs the case's images to be final, unless the reader says why (no-images-reason).
- The second-opinion profile applies to reports on cases here, not to any report with a basedOn:
  the official R4 example DiagnosticReport-example-pgx is stored as it is.
- The final report marks the case ``reported``, and image news never overwrites it.
"""

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import OperationOutcome as FhirpyOutcome
from sqlalchemy import select

from cases.task import (
    CASE_STATUS,
    IMAGES_AVAILABLE,
    IMAGES_NOT_FOUND,
    IMAGES_PENDING,
    IMAGES_UNAVAILABLE,
    REPORTED,
    set_case_status,
)
from fhir_server.db import Database
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.repository import Repository
from fhir_server.router import handle
from fhir_server.schema import OutboxRow
from overread.app import default_hooks
from tests.builders import (
    NO_IMAGES_REASON,
    assert_outcome,
    imaging_study,
    no_images_reason,
    patient,
    service_request,
)
from tests.search_data import module_client

Json = dict[str, Any]
BASE = "https://overread.org/fhir"
DISCREPANCY = f"{BASE}/CodeSystem/second-opinion-discrepancy"
RADPEER = f"{BASE}/CodeSystem/radpeer"
FINDING = f"{BASE}/StructureDefinition/discrepancy-finding"
PGX = Path(__file__).parent / "fixtures" / "fhir" / "diagnosticreport-example-pgx.json"
#: ACR RADPEER 2016, as the ConceptMap states it (written out here so the test does not read the map it tests).
MEANS = {"1": "agree", "2a": "minor", "2b": "major", "3a": "minor", "3b": "major"}
LEVELS = ("agree", "minor", "major", "indeterminate")
PAIRS = [(score, level) for score in MEANS for level in LEVELS]


def _report(order_id: str, status: str = "final", level: str = "major", score: str | None = "2b", **extra: Any) -> Json:
    conclusion = [{"coding": [{"system": DISCREPANCY, "code": level}]}]
    if score is not None:
        conclusion.append({"coding": [{"system": RADPEER, "code": score}]})
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
        "subject": {"display": "the order's patient"},
        "resultsInterpreter": [{"display": "Dr Second Reader"}],
        "conclusion": "Missed 9 mm nodule in the right upper lobe.",
        "conclusionCode": conclusion,
        **extra,
    }


def _finding(level: str, score: str | None, **extra: Any) -> Json:
    codings = [{"system": DISCREPANCY, "code": level}] + ([{"system": RADPEER, "code": score}] if score else [])
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": f"{BASE}/CodeSystem/discrepancy-type", "code": "perceptual-miss"}]},
        "subject": {"reference": "Patient/p"},
        "valueCodeableConcept": {"coding": codings},
        "note": [{"text": "9 mm nodule, right upper lobe"}],
        **extra,
    }


def _open_case(client: TestClient, images: bool) -> str:
    pid = client.post("/fhir/Patient", json=patient()).json()["id"]
    order = client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{pid}"))
    assert order.status_code == 201, order.text
    if images:
        _link_images(client, order.json()["id"])
    return str(order.json()["id"])


def _link_images(client: TestClient, order_id: str) -> None:
    study = imaging_study(f"ServiceRequest/{order_id}", "Patient/p", f"2.25.{uuid.UUID(order_id).int}")
    assert client.post("/fhir/ImagingStudy", json=study).status_code == 201


def _case(client: TestClient, order_id: str) -> Json:
    (entry,) = client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"]
    task: Json = entry["resource"]
    return task


def _business_status(task: Json) -> str | None:
    codes = [c["code"] for c in task.get("businessStatus", {}).get("coding", []) if c["system"] == CASE_STATUS]
    return codes[0] if codes else None


def _route(db: Database, method: str, path: str, body: Json | None = None) -> tuple[FhirResponse, Json]:
    """One request through the core router (the door of HL7 and the workers), in one transaction."""
    with db.transaction() as session:
        repo = Repository(session, default_hooks())
        response = handle(FhirRequest(method, path, body=body), repo, "http://testserver/fhir")
        if response.status < 400:
            repo.complete()
    return response, orjson.loads(orjson.dumps(response.body))


# -- coding consistency ------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def imaged(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, str]]:
    """A client and a case with its images linked, once per module and database."""
    clients = module_client(request, tmp_path_factory, list)
    client = next(clients)
    yield client, _open_case(client, images=True)
    next(clients, None)


def _contradiction(outcome: Json) -> list[Json]:
    return [i for i in outcome.get("issue", []) if i["code"] == "business-rule"]


@pytest.mark.parametrize(("score", "level"), PAIRS, ids=[f"{s}-{lv}" for s, lv in PAIRS])
def test_every_radpeer_and_level_pair_is_checked_by_validate_and_by_a_write(imaged, score, level):
    client, order_id = imaged
    report = _report(order_id, level=level, score=score)
    validated = client.post("/fhir/DiagnosticReport/$validate", json=report)
    assert validated.status_code == 200
    written = client.post("/fhir/DiagnosticReport", json=report)
    routed, routed_body = _route(client.app.state.db, "POST", "DiagnosticReport", report)  # type: ignore[attr-defined]
    if MEANS[score] == level:
        assert validated.json()["issue"][0]["severity"] == "information", validated.text
        assert written.status_code == 201, written.text
        assert routed.status == 201, routed_body
        return
    outcome = assert_outcome(written, 422)
    assert outcome == validated.json() == routed_body  # one code path: $validate, HTTP and the router
    (issue,) = _contradiction(outcome)
    assert issue["expression"] == ["DiagnosticReport.conclusionCode[0]", "DiagnosticReport.conclusionCode[1]"]
    assert f"RADPEER {score!r}" in issue["diagnostics"] and f"level {level!r}" in issue["diagnostics"]
    assert f"means {MEANS[score]!r}" in issue["diagnostics"]
    assert "ConceptMap https://overread.org/fhir/ConceptMap/radpeer-to-discrepancy" in issue["diagnostics"]


def test_a_level_without_a_score_has_nothing_to_contradict(imaged):
    client, order_id = imaged
    created = client.post("/fhir/DiagnosticReport", json=_report(order_id, level="indeterminate", score=None))
    assert created.status_code == 201, created.text


@pytest.mark.parametrize(
    ("level", "score", "where", "allowed"),
    [
        ("major", "4", "DiagnosticReport.conclusionCode[1]", f"{RADPEER}: 1, 2a, 2b, 3a, 3b"),
        ("severe", "2b", "DiagnosticReport.conclusionCode[0]", f"{DISCREPANCY}: agree, indeterminate, major, minor"),
    ],
)
def test_a_code_outside_its_value_set_lists_the_allowed_codes(imaged, level, score, where, allowed):
    client, order_id = imaged
    report = _report(order_id, level=level, score=score)
    outcome = assert_outcome(client.post("/fhir/DiagnosticReport", json=report), 422)
    (issue,) = [i for i in outcome["issue"] if i["code"] == "code-invalid"]
    assert issue["expression"] == [where] and issue["diagnostics"].endswith(f"one of {allowed}")
    assert client.post("/fhir/DiagnosticReport/$validate", json=report).json() == outcome


def test_a_contained_finding_is_checked_the_same_way(imaged):
    client, order_id = imaged
    finding = _finding("major", "1", id="f1")
    report = _report(order_id, contained=[finding], result=[{"reference": "#f1"}])
    outcome = assert_outcome(client.post("/fhir/DiagnosticReport", json=report), 422)
    (issue,) = _contradiction(outcome)
    assert issue["expression"] == ["DiagnosticReport.contained[0].valueCodeableConcept"]
    assert "RADPEER '1'" in issue["diagnostics"] and "level 'major'" in issue["diagnostics"]
    assert client.post("/fhir/DiagnosticReport/$validate", json=report).json() == outcome
    agreeing = _report(order_id, contained=[_finding("major", "3b", id="f1")], result=[{"reference": "#f1"}])
    assert client.post("/fhir/DiagnosticReport", json=agreeing).status_code == 201


def test_a_stored_finding_is_checked_when_a_report_lists_it(imaged):
    client, order_id = imaged
    unclaimed = client.post("/fhir/Observation", json=_finding("minor", "3b"))  # no profile claimed: stored
    assert unclaimed.status_code == 201
    reference = f"Observation/{unclaimed.json()['id']}"
    report = _report(order_id, result=[{"reference": reference}])
    outcome = assert_outcome(client.post("/fhir/DiagnosticReport", json=report), 422)
    (issue,) = _contradiction(outcome)
    assert issue["expression"] == ["DiagnosticReport.result[0]"]
    assert issue["diagnostics"].startswith(f"{reference}: RADPEER '3b'") and "means 'major'" in issue["diagnostics"]
    assert client.post("/fhir/DiagnosticReport/$validate", json=report).json() == outcome


def test_a_finding_under_its_profile_is_checked_on_its_own(imaged):
    client, _ = imaged
    claimed = {"meta": {"profile": [FINDING]}}
    outcome = assert_outcome(client.post("/fhir/Observation", json=_finding("agree", "2a", **claimed)), 422)
    (issue,) = _contradiction(outcome)
    assert issue["expression"] == ["Observation.valueCodeableConcept"]
    unknown = assert_outcome(client.post("/fhir/Observation", json=_finding("agree", "9", **claimed)), 422)
    (issue,) = unknown["issue"]
    assert issue["code"] == "code-invalid" and issue["diagnostics"].endswith("one of 1, 2a, 2b, 3a, 3b")
    assert client.post("/fhir/Observation", json=_finding("minor", "2a", **claimed)).status_code == 201


# -- a final report needs the case's images ------------------------------------------------


def test_a_final_report_without_images_is_refused_naming_the_override(client, db):
    order_id = _open_case(client, images=False)
    body = assert_outcome(client.post("/fhir/DiagnosticReport", json=_report(order_id)), 409)
    (issue,) = body["issue"]
    assert issue["code"] == "business-rule" and issue["expression"] == ["DiagnosticReport.status"]
    assert f"ServiceRequest/{order_id} has no ImagingStudy linked" in issue["diagnostics"]
    assert NO_IMAGES_REASON in issue["diagnostics"]
    assert client.get("/fhir/DiagnosticReport").json()["total"] == 0  # nothing of the request written
    case = _case(client, order_id)
    assert case["status"] == "requested" and _business_status(case) != REPORTED
    routed, routed_body = _route(db, "POST", "DiagnosticReport", _report(order_id))  # the core's other doors
    assert routed.status == 409 and NO_IMAGES_REASON in routed_body["issue"][0]["diagnostics"]


@pytest.mark.parametrize("status", ["amended", "corrected", "appended"])
def test_every_status_after_final_needs_the_images_or_the_reason_too(client, status):
    order_id = _open_case(client, images=False)
    reason = no_images_reason()
    final = client.post("/fhir/DiagnosticReport", json=_report(order_id, extension=[reason])).json()
    changed = {**final, "status": status, "conclusion": "On review: a 9 mm nodule, right lower lobe."}
    dropped = {k: v for k, v in changed.items() if k != "extension"}
    body = assert_outcome(client.put(f"/fhir/DiagnosticReport/{final['id']}", json=dropped), 409)
    assert NO_IMAGES_REASON in body["issue"][0]["diagnostics"]
    assert client.put(f"/fhir/DiagnosticReport/{final['id']}", json=changed).status_code == 200


def test_a_preliminary_report_needs_no_images(client):
    order_id = _open_case(client, images=False)
    created = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary"))
    assert created.status_code == 201, created.text
    assert _case(client, order_id)["status"] == "requested"


def test_the_override_lets_the_report_be_final_and_is_kept_on_it(client, db):
    order_id = _open_case(client, images=False)
    with db.transaction() as session:  # the linking worker is still looking
        set_case_status(Repository(session, default_hooks()), order_id, IMAGES_PENDING, "no study matches yet")
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary")).json()
    reason = no_images_reason("Read on the referring hospital's viewer; the study never reached our PACS")
    final = client.put(
        f"/fhir/DiagnosticReport/{report['id']}", json={**report, "status": "final", "extension": [reason]}
    )
    assert final.status_code == 200, final.text
    stored = client.get(f"/fhir/DiagnosticReport/{report['id']}").json()
    assert stored["status"] == "final" and reason in stored["extension"]
    case = _case(client, order_id)
    assert case["status"] == "completed" and _business_status(case) == REPORTED  # not images-pending
    assert "statusReason" not in case  # the linking worker's reason went with its status


def test_a_mistyped_or_repeated_override_is_refused(client):
    order_id = _open_case(client, images=False)
    wrong = {"url": NO_IMAGES_REASON, "valueBoolean": True}
    body = assert_outcome(client.post("/fhir/DiagnosticReport", json=_report(order_id, extension=[wrong])), 422)
    assert body["issue"][0]["expression"] == ["DiagnosticReport.extension[0].valueBoolean"]
    twice = [no_images_reason("a"), no_images_reason("b")]
    assert_outcome(client.post("/fhir/DiagnosticReport", json=_report(order_id, extension=twice)), 422)


def test_once_the_images_are_linked_the_report_is_accepted_and_references_them(client):
    order_id = _open_case(client, images=False)
    assert client.post("/fhir/DiagnosticReport", json=_report(order_id)).status_code == 409
    _link_images(client, order_id)
    created = client.post("/fhir/DiagnosticReport", json=_report(order_id))
    assert created.status_code == 201, created.text
    (study,) = client.get("/fhir/ImagingStudy", params={"basedon": f"ServiceRequest/{order_id}"}).json()["entry"]
    assert created.json()["imagingStudy"] == [{"reference": f"ImagingStudy/{study['resource']['id']}"}]
    assert "extension" not in created.json()


# -- the profile only where it belongs: DiagnosticReport-example-pgx -----------------------------


def _pgx() -> Json:
    pgx: Json = json.loads(PGX.read_text(encoding="utf-8"))
    return pgx


def _unchanged(stored: Json, sent: Json) -> bool:
    return {k: v for k, v in stored.items() if k not in ("id", "meta")} == {k: v for k, v in sent.items() if k != "id"}


def test_the_r4_pgx_example_is_stored_unchanged_by_post_and_put(client, db):
    pgx = _pgx()
    assert client.post("/fhir/DiagnosticReport/$validate", json=pgx).json()["issue"][0]["severity"] == "information"
    posted = client.post("/fhir/DiagnosticReport", json=pgx)
    assert posted.status_code == 201, posted.text
    assert _unchanged(posted.json(), pgx)
    put = client.put("/fhir/DiagnosticReport/example-pgx", json=pgx)
    assert put.status_code == 201, put.text
    stored = client.get("/fhir/DiagnosticReport/example-pgx").json()
    assert _unchanged(stored, pgx) and stored["id"] == "example-pgx"
    with db.transaction() as session:  # no second opinion: nothing to deliver as a result
        assert session.scalars(select(OutboxRow).where(OutboxRow.topic == "result")).all() == []


def test_the_same_report_on_an_order_that_is_a_case_here_must_be_a_second_opinion(client):
    order_id = _open_case(client, images=True)
    on_a_case = {**_pgx(), "basedOn": [{"reference": f"ServiceRequest/{order_id}"}]}
    on_a_case.pop("id")
    body = assert_outcome(client.post("/fhir/DiagnosticReport", json=on_a_case), 422)
    assert any(i["expression"] == ["DiagnosticReport.conclusionCode"] for i in body["issue"])
    assert client.post("/fhir/DiagnosticReport/$validate", json=on_a_case).json() == body
    # The order stored here (PUT opens no case) with a Task about it that is no case: still not a case.
    order = {**service_request("Patient/899962"), "id": "example-pgx"}
    assert client.put("/fhir/ServiceRequest/example-pgx", json=order).status_code == 201
    plan = {
        "resourceType": "Task",
        "status": "requested",
        "intent": "plan",
        "focus": {"reference": "ServiceRequest/example-pgx"},
    }
    assert client.post("/fhir/Task", json=plan).status_code == 201
    assert client.put("/fhir/DiagnosticReport/example-pgx", json=_pgx()).status_code == 201


@pytest.mark.server
def test_fhirpy_stores_the_pgx_example(live_server):
    fhir = SyncFHIRClient(live_server, extra_headers={"Content-Type": "application/fhir+json"})
    pgx = _pgx()
    created = fhir.resource("DiagnosticReport", **{k: v for k, v in pgx.items() if k != "id"})
    created.save()
    assert _unchanged(fhir.get("DiagnosticReport", created.id), pgx)
    updated = fhir.resource("DiagnosticReport", **pgx)
    updated.save()
    assert _unchanged(fhir.get("DiagnosticReport", "example-pgx"), pgx)
    contradicting = fhir.resource("DiagnosticReport", **_report("example-pgx", level="agree", score="3b"))
    with pytest.raises(FhirpyOutcome):
        contradicting.save()


# -- honest case status --------------------------------------------------------------------------


def test_the_final_report_marks_the_case_reported_in_its_transaction(client):
    order_id = _open_case(client, images=True)
    report = client.post("/fhir/DiagnosticReport", json=_report(order_id, "preliminary")).json()
    assert _business_status(_case(client, order_id)) != REPORTED
    final = client.put(f"/fhir/DiagnosticReport/{report['id']}", json={**report, "status": "final"})
    assert final.status_code == 200
    case = _case(client, order_id)
    assert case["status"] == "completed" and _business_status(case) == REPORTED
    history = client.get(f"/fhir/Task/{case['id']}/_history").json()["entry"]
    assert [_business_status(e["resource"]) for e in history].count(REPORTED) == 1


@pytest.mark.parametrize("news", [IMAGES_PENDING, IMAGES_AVAILABLE, IMAGES_NOT_FOUND, IMAGES_UNAVAILABLE])
def test_image_news_never_overwrites_a_reported_case(client, db, news):
    order_id = _open_case(client, images=True)
    assert client.post("/fhir/DiagnosticReport", json=_report(order_id)).status_code == 201
    version = _case(client, order_id)["meta"]["versionId"]
    with db.transaction() as session:  # what the image-linking worker calls, found or not, after the report
        repo = Repository(session, default_hooks())
        set_case_status(repo, order_id, news, "found on main")
        repo.complete()
    case = _case(client, order_id)
    assert _business_status(case) == REPORTED and case["meta"]["versionId"] == version


def test_an_open_case_still_takes_image_news(client, db):
    order_id = _open_case(client, images=False)
    with db.transaction() as session:
        set_case_status(Repository(session, default_hooks()), order_id, IMAGES_AVAILABLE)
    assert _business_status(_case(client, order_id)) == IMAGES_AVAILABLE
