"""The FHIR core without HTTP: ``router.handle`` on a ``Repository``, hooks and the outbox.

Other doors (HL7, DICOM, workers) call the core like this. A hook runs inside the write
path (validate → hooks → write → index → outbox) and can add an outbox row with
``repo.enqueue``; the row commits with the write and disappears with it when the request
fails.
"""

from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from fhir_server import api
from fhir_server.db import Database
from fhir_server.errors import error
from fhir_server.executor import for_database
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.repository import Change, Hook, Repository
from fhir_server.router import handle
from fhir_server.schema import OutboxRow, ResourceRow
from tests.builders import (
    assert_outcome,
    bundle,
    case_transaction,
    mrn_query,
    patient,
    post,
    service_request,
    task,
)

BASE = "https://overread.example.org/fhir"


def call(db: Database, request: FhirRequest, hooks: Sequence[Hook] = ()) -> tuple[FhirResponse, Any]:
    """One request in one write transaction, committed whatever the outcome (as a bridge might)."""
    with db.transaction() as session:
        response = handle(request, Repository(session, hooks), BASE)
    body = None if response.body is None else orjson.loads(orjson.dumps(response.body))
    return response, body


def outbox(db: Database) -> list[tuple[str, str, int, Any]]:
    with db.transaction() as session:
        rows = session.scalars(select(OutboxRow).order_by(OutboxRow.pk)).all()
        return [(r.topic, r.resource_type, r.resource_version, orjson.loads(r.payload)) for r in rows]


def stored_count(db: Database) -> int:
    with db.transaction() as session:
        return session.scalar(select(func.count()).select_from(ResourceRow)) or 0


def notify_on_task(repo: Repository, change: Change) -> None:
    """A hook: every Task write leaves work for the notifier (e.g. a Subscription)."""
    if change.type == "Task":
        repo.enqueue("task-changed", change, {"method": change.method, "status": (change.resource or {}).get("status")})


def test_handle_creates_and_reads_without_http(db):
    created, body = call(db, FhirRequest("POST", "Patient", body=patient()))
    assert created.status == 201 and body["meta"]["versionId"] == "1"
    assert created.headers["Location"] == f"{BASE}/Patient/{body['id']}/_history/1"
    assert created.headers["ETag"] == 'W/"1"'

    read, again = call(db, FhirRequest("GET", f"Patient/{body['id']}"))
    assert read.status == 200 and again == body
    assert read.headers["ETag"] == 'W/"1"' and read.headers["Last-Modified"].endswith("GMT")


def test_handle_returns_errors_as_values(db):
    response, body = call(db, FhirRequest("GET", "Patient/nobody"))
    assert response.status == 404 and body["resourceType"] == "OperationOutcome"
    response, body = call(db, FhirRequest("POST", "Patient/nobody", body={}))
    assert response.status == 405 and body["issue"][0]["code"] == "not-supported"
    response, body = call(db, FhirRequest("PATCH", "Patient/nobody", body=[]))
    assert response.status == 404 and body["issue"][0]["code"] == "not-found"
    response, body = call(db, FhirRequest("POST", "Patient", body={**patient(), "active": "yes"}))
    assert response.status == 422 and body["issue"][0]["expression"] == ["Patient.active"]
    assert stored_count(db) == 0


def test_handle_conditional_create_and_prefer_header(db):
    request = FhirRequest("POST", "Patient", headers={"if-none-exist": mrn_query(), "prefer": "return=minimal"},
                          body=patient())  # fmt: skip
    first, body = call(db, request)
    second, _ = call(db, request)
    assert (first.status, second.status, body) == (201, 200, None)
    assert first.headers["Location"] == second.headers["Location"]


def test_a_hook_enqueues_an_outbox_row_committed_with_the_write(db):
    response, body = call(db, FhirRequest("POST", "", body=case_transaction()), hooks=[notify_on_task])
    assert response.status == 200, body
    task_id = body["entry"][2]["response"]["location"].split("/")[-3]
    assert outbox(db) == [("task-changed", "Task", 1, {"method": "POST", "status": "requested"})]

    current = call(db, FhirRequest("GET", f"Task/{task_id}"))[1]
    response, _ = call(
        db, FhirRequest("PUT", f"Task/{task_id}", body={**current, "status": "accepted"}), [notify_on_task]
    )
    assert response.status == 200
    assert outbox(db)[-1] == ("task-changed", "Task", 2, {"method": "PUT", "status": "accepted"})
    with db.transaction() as session:
        row = session.scalars(select(OutboxRow).order_by(OutboxRow.pk.desc())).first()
        assert (row.resource_id, row.status, row.attempts) == (task_id, "pending", 0)


def test_a_failed_transaction_leaves_no_outbox_row_even_if_the_caller_commits(db):
    body = case_transaction()
    body["entry"].append(post(service_request("Patient/nobody", intent="orders")))
    response, outcome = call(db, FhirRequest("POST", "", body=body), hooks=[notify_on_task])
    assert response.status == 422, outcome
    assert outcome["issue"][0]["expression"] == ["Bundle.entry[3].resource.intent"]
    assert outbox(db) == [] and stored_count(db) == 0


def test_a_failed_batch_entry_takes_its_outbox_row_with_it(db):
    def refuse_cancelled(repo: Repository, change: Change) -> None:
        notify_on_task(repo, change)
        if (change.resource or {}).get("status") == "cancelled":
            raise error(422, "business-rule", "A case cannot be cancelled before it is accepted")

    good = task("ServiceRequest/sr-1", "Patient/p-1")
    bad = task("ServiceRequest/sr-2", "Patient/p-1", status="cancelled")
    response, body = call(db, FhirRequest("POST", "", body=bundle("batch", post(good), post(bad))), [refuse_cancelled])
    assert response.status == 200
    assert [e["response"]["status"][:3] for e in body["entry"]] == ["201", "422"]
    assert body["entry"][1]["response"]["outcome"]["issue"][0]["code"] == "business-rule"
    assert outbox(db) == [("task-changed", "Task", 1, {"method": "POST", "status": "requested"})]
    assert stored_count(db) == 1


def test_a_hook_can_amend_the_resource_before_it_is_written(db):
    def tag_source(repo: Repository, change: Change) -> None:
        if change.resource is not None:
            meta = change.resource.setdefault("meta", {})
            meta["source"] = "urn:overread:fhir-rest"

    _, body = call(db, FhirRequest("POST", "Patient", body=patient()), hooks=[tag_source])
    assert body["meta"]["source"] == "urn:overread:fhir-rest" and body["meta"]["versionId"] == "1"


# -- the HTTP adapter with hooks ---------------------------------------------------------------


@pytest.fixture
def hooked(db):
    """The FastAPI adapter wired like create_app, with hooks the test controls."""
    hooks: list[Hook] = []
    app = FastAPI()
    api.mount(app, for_database(db), hooks)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers.update({"content-type": "application/fhir+json"})
        yield client, hooks


def test_over_http_a_failed_transaction_leaves_no_outbox_row(db, hooked):
    client, hooks = hooked
    hooks.append(notify_on_task)
    body = case_transaction()
    body["entry"][-1]["resource"]["intent"] = "orders"
    assert_outcome(client.post("/fhir", json=body), 422)
    assert outbox(db) == [] and stored_count(db) == 0
    assert client.post("/fhir", json=case_transaction()).status_code == 200
    assert [row[:3] for row in outbox(db)] == [("task-changed", "Task", 1)]


def test_over_http_an_unexpected_failure_is_a_500_outcome_without_a_stack_trace(db, hooked):
    client, hooks = hooked

    def broken(repo: Repository, change: Change) -> None:
        raise RuntimeError("secret internals: /etc/overread/db-password")

    hooks.append(broken)
    r = client.post("/fhir/Patient", json=patient())
    outcome = assert_outcome(r, 500)
    assert "secret" not in r.text and outcome["issue"][0]["code"] == "exception"
    assert stored_count(db) == 0


def test_over_http_a_conflicting_concurrent_write_is_a_409_outcome(db, hooked):
    """What the database reports as a conflict (a unique key) becomes 409 Conflict.

    The locks make this unreachable by ordinary requests (see test_concurrency); a hook
    that writes a conflicting row stands in for the race.
    """
    client, hooks = hooked

    def conflict(repo: Repository, change: Change) -> None:
        raise IntegrityError("INSERT INTO resource ...", {}, Exception("duplicate key value"))

    hooks.append(conflict)
    outcome = assert_outcome(client.put("/fhir/Patient/p-1", json={**patient(), "id": "p-1"}), 409)
    assert outcome["issue"][0]["code"] == "conflict"
    assert "INSERT" not in str(outcome)


class _DeadlockDetected(Exception):
    sqlstate = "40P01"  # what psycopg reports for PostgreSQL's deadlock_detected


def test_over_http_a_deadlock_is_a_409_outcome_and_other_database_errors_a_500(db, hooked):
    """A request that lost a deadlock was rolled back whole: 409, the client may retry it."""
    client, hooks = hooked
    failure: list[Exception] = [_DeadlockDetected("deadlock detected")]

    def database_error(repo: Repository, change: Change) -> None:
        raise OperationalError("SELECT pg_advisory_xact_lock(...)", {}, failure[0])

    hooks.append(database_error)
    outcome = assert_outcome(client.post("/fhir/Patient", json=patient()), 409)
    assert outcome["issue"][0]["code"] == "conflict" and "pg_advisory" not in str(outcome)
    failure[0] = Exception("disk I/O error")
    assert_outcome(client.post("/fhir/Patient", json=patient()), 500)
    assert stored_count(db) == 0
