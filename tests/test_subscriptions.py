"""R4 Subscriptions: handshake, rest-hook notifications from the outbox, retries and the error state.

A real HTTP receiver (``http.server`` on a free 127.0.0.1 port, in a thread, the one endpoint
``subscriptions.allowed_endpoints`` allows) records what the worker sends; the worker's
``run_once`` is driven by the test. Also: the searches a referrer finds second-opinion reports with.
"""

from datetime import timedelta

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from fhir_server import dates, subscriptions
from fhir_server.executor import for_database
from fhir_server.notifier import FAILED, Notifier
from fhir_server.outbox import Backoff
from fhir_server.schema import OutboxRow, ResourceRow
from overread.app import create_app, make_hooks
from overread.config import OverreadConfig, Subscriptions
from overread.settings import Settings
from testbed.ports import free_port
from tests.builders import imaging_study, patient, service_request
from tests.peers import HttpReceiver as Receiver

DISCREPANCY = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"


@pytest.fixture
def port() -> int:
    """The receiver's port: the one Subscription endpoints may use."""
    return free_port()


@pytest.fixture
def receiver(port):
    r = Receiver(port).start()
    yield r
    r.stop()


@pytest.fixture
def cfg(port) -> OverreadConfig:
    return OverreadConfig(subscriptions=Subscriptions(allowed_endpoints=[f"http://127.0.0.1:{port}/hook"]))


@pytest.fixture
def client(db, cfg):
    with TestClient(create_app(Settings(database_url=db.url), db, cfg), base_url="http://testserver") as c:
        yield c


def worker(db, cfg: OverreadConfig, backoff: Backoff, timeout: float = 5) -> Notifier:
    return Notifier(for_database(db), make_hooks(cfg), backoff, timeout, egress=cfg.subscriptions.egress())


@pytest.fixture
def notifier(db, cfg):
    notifier = worker(db, cfg, Backoff(max_attempts=5, first_delay=timedelta(seconds=30)))
    yield notifier
    notifier.close()


def deliver(worker: Notifier) -> int:
    """Run the worker until nothing is due; how many rows it handled."""
    handled = 0
    for _ in range(50):
        if not (n := worker.run_once()):
            return handled
        handled += n
    raise AssertionError("the worker never ran dry")


def subscription(endpoint: str, criteria: str, status: str = "active", **channel) -> dict:
    return {
        "resourceType": "Subscription",
        "status": status,
        "reason": "Second-opinion results for the referrer's EHR",
        "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": endpoint, **channel},
    }


def report(status: str = "final", conclusion: str = "No change since the prior study.", **extra) -> dict:
    """A plain DiagnosticReport (no order, no discrepancy code): free to update in any status."""
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "code": {"text": "CT chest"},
        "conclusion": conclusion,
        **extra,
    }


def rows(db) -> list[OutboxRow]:
    with db.transaction() as session:
        return list(session.scalars(select(OutboxRow).where(OutboxRow.topic == "subscription").order_by(OutboxRow.pk)))


def make_due(db) -> None:
    """Time passes: every pending row is due now."""
    with db.transaction() as session:
        session.execute(update(OutboxRow).where(OutboxRow.status == "pending").values(available_at=dates.now()))


# -- handshake -----------------------------------------------------------------------


def test_a_handshake_makes_a_requested_subscription_active(client, db, notifier, receiver):
    sub = subscription(receiver.url, "DiagnosticReport?status=final", status="requested", header=["X-Api-Key: s3cret"])
    created = client.post("/fhir/Subscription", json=sub)
    assert created.status_code == 201
    (row,) = rows(db)
    assert (row.resource_id, orjson.loads(row.payload)) == (created.json()["id"], {"kind": "handshake"})

    assert deliver(notifier) == 1
    (hello,) = receiver.requests
    assert (hello.method, hello.path, hello.body, hello.headers["x-api-key"]) == ("POST", "/hook", b"", "s3cret")
    now = client.get(f"/fhir/Subscription/{created.json()['id']}").json()
    assert now["status"] == "active" and "error" not in now
    assert [r.status for r in rows(db)] == ["done"]


def test_a_failing_handshake_puts_the_subscription_in_error_and_is_retried(client, db, notifier, receiver):
    receiver.status = 403
    sid = client.post("/fhir/Subscription", json=subscription(receiver.url, "Task?status=completed", "requested"))
    sid = sid.json()["id"]
    deliver(notifier)
    failed = client.get(f"/fhir/Subscription/{sid}").json()
    assert (failed["status"], failed["error"]) == ("error", FAILED)  # the detail is the operator's
    (row,) = rows(db)
    assert (row.status, row.attempts) == ("pending", 1) and row.available_at > dates.now()
    assert "HTTP 403" in row.last_error

    receiver.status = 200
    make_due(db)
    deliver(notifier)
    assert client.get(f"/fhir/Subscription/{sid}").json()["status"] == "active"
    assert len(receiver.requests) == 2


def test_a_subscription_the_server_cannot_serve_is_refused(client, port):
    endpoint = f"http://127.0.0.1:{port}/hook"
    for criteria in ("Nonsense?status=final", "DiagnosticReport?no-such-param=1", "DiagnosticReport?_count=5"):
        refused = client.post("/fhir/Subscription", json=subscription(endpoint, criteria))
        assert refused.status_code == 422, criteria
        assert refused.json()["resourceType"] == "OperationOutcome"
    websocket = subscription(endpoint, "Task?status=completed")
    websocket["channel"]["type"] = "websocket"
    assert client.post("/fhir/Subscription", json=websocket).status_code == 422


# -- notifications ---------------------------------------------------------------------


def test_a_matching_report_is_put_to_the_endpoint_with_the_custom_headers(client, db, notifier, receiver):
    sub = subscription(
        receiver.url,
        "DiagnosticReport?status=final",
        payload="application/fhir+json",
        header=["Authorization: Bearer t0k3n", "X-Referrer: st-olav"],
    )
    assert client.post("/fhir/Subscription", json=sub).status_code == 201
    assert client.post("/fhir/DiagnosticReport", json=report("preliminary")).status_code == 201
    assert rows(db) == []  # does not match: no row at all
    final = client.post("/fhir/DiagnosticReport", json=report("final")).json()

    assert deliver(notifier) == 1
    (got,) = receiver.requests
    assert (got.method, got.path) == ("PUT", f"/hook/DiagnosticReport/{final['id']}")
    assert got.headers["content-type"].startswith("application/fhir+json")
    assert (got.headers["authorization"], got.headers["x-referrer"]) == ("Bearer t0k3n", "st-olav")
    assert got.resource == final


def test_without_a_payload_the_notification_is_an_empty_post(client, db, notifier, receiver):
    sub = subscription(receiver.url, "DiagnosticReport?status=final")
    assert client.post("/fhir/Subscription", json=sub).status_code == 201
    client.post("/fhir/DiagnosticReport", json=report("final"))
    deliver(notifier)
    (got,) = receiver.requests
    assert (got.method, got.path, got.body) == ("POST", "/hook", b"")


def test_a_case_completed_notifies_a_task_subscription(client, db, notifier, receiver):
    sub = subscription(receiver.url, "Task?status=completed", payload="application/fhir+json")
    assert client.post("/fhir/Subscription", json=sub).status_code == 201
    pid = client.post("/fhir/Patient", json=patient()).json()["id"]
    order = client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{pid}")).json()
    (entry,) = client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order['id']}"}).json()["entry"]
    task = entry["resource"]
    for status in ("accepted", "in-progress", "completed"):
        task = {k: v for k, v in task.items() if k != "meta"} | {"status": status}
        answer = client.put(f"/fhir/Task/{task['id']}", json=task)
        assert answer.status_code == 200, answer.json()
        task = answer.json()
    deliver(notifier)
    (got,) = receiver.requests  # only the completed version matches
    assert got.path == f"/hook/Task/{task['id']}"
    assert (got.resource["status"], got.resource["meta"]["versionId"]) == ("completed", task["meta"]["versionId"])


def test_receiver_down_then_up_keeps_every_version_in_order(client, db, notifier, port):
    receiver = Receiver(port)  # nothing listens there yet
    sub = subscription(receiver.url, "DiagnosticReport?status=final", payload="application/fhir+json")
    sid = client.post("/fhir/Subscription", json=sub).json()["id"]
    first = client.post("/fhir/DiagnosticReport", json=report()).json()
    rid = first["id"]
    for text in ("Second reading.", "Third reading."):
        client.put(f"/fhir/DiagnosticReport/{rid}", json=report(conclusion=text, id=rid))

    assert deliver(notifier) == 1  # only the oldest row of the subscription is tried
    failing = client.get(f"/fhir/Subscription/{sid}").json()
    assert (failing["status"], failing["error"]) == ("error", FAILED)
    queued = rows(db)
    assert [(r.status, r.attempts) for r in queued] == [("pending", 1), ("pending", 0), ("pending", 0)]
    assert queued[0].available_at > dates.now() and "ConnectError" in (queued[0].last_error or "")
    assert notifier.run_once() == 0  # backing off, and the later versions wait behind the first

    receiver.start()
    try:
        make_due(db)
        assert deliver(notifier) == 3
        versions = [r.resource["meta"]["versionId"] for r in receiver.requests]
        assert versions == ["1", "2", "3"]
        assert receiver.requests[2].resource["conclusion"] == "Third reading."
    finally:
        receiver.stop()
    recovered = client.get(f"/fhir/Subscription/{sid}").json()
    assert recovered["status"] == "active" and "error" not in recovered
    assert [r.status for r in rows(db)] == ["done"] * 3
    # the error state was written once (not once per attempt), and cleared once
    history = client.get(f"/fhir/Subscription/{sid}/_history").json()
    assert history["total"] == 3


def test_after_the_last_attempt_the_row_is_dead_and_the_subscription_says_so(client, db, cfg, port):
    notifier = worker(db, cfg, Backoff(max_attempts=2, first_delay=timedelta(0)), timeout=2)
    try:
        sub = subscription(f"http://127.0.0.1:{port}/hook", "DiagnosticReport?status=final")  # nothing listens
        sid = client.post("/fhir/Subscription", json=sub).json()["id"]
        client.post("/fhir/DiagnosticReport", json=report())
        deliver(notifier)
    finally:
        notifier.close()
    (row,) = rows(db)
    assert (row.status, row.attempts) == ("dead", 2) and row.last_error
    failed = client.get(f"/fhir/Subscription/{sid}").json()
    assert (failed["status"], failed["error"]) == ("error", f"{FAILED} (gave up after 2 attempts)")


def test_a_subscription_turned_off_gets_nothing(client, db, notifier, receiver):
    sub = subscription(receiver.url, "DiagnosticReport?status=final")
    created = client.post("/fhir/Subscription", json=sub).json()
    client.post("/fhir/DiagnosticReport", json=report())  # queued while active
    off = {k: v for k, v in created.items() if k != "meta"} | {"status": "off"}
    assert client.put(f"/fhir/Subscription/{created['id']}", json=off).status_code == 200
    client.post("/fhir/DiagnosticReport", json=report())  # not queued: off
    assert deliver(notifier) == 1
    assert receiver.requests == [] and [r.status for r in rows(db)] == ["done"]


def test_a_subscription_past_its_end_gets_nothing(client, db, notifier, receiver):
    ended = subscription(receiver.url, "DiagnosticReport?status=final") | {"end": "2020-01-01T00:00:00Z"}
    running = subscription(receiver.url, "DiagnosticReport?status=final") | {"end": "2999-01-01T00:00:00+01:00"}
    client.post("/fhir/Subscription", json=ended)
    live = client.post("/fhir/Subscription", json=running).json()
    client.post("/fhir/DiagnosticReport", json=report())
    assert [(r.resource_id, r.topic) for r in rows(db)] == [(live["id"], "subscription")]


# -- what referrers search reports by --------------------------------------------------


def second_opinion(order: str, subject: str, status: str, code: str, issued: str) -> dict:
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "basedOn": [{"reference": order}],
        "subject": {"reference": subject},
        "code": {"text": "Second opinion: CT chest"},
        "issued": issued,
        "resultsInterpreter": [{"reference": "Practitioner/reader-1"}],
        "conclusion": f"Second reading: {code}.",
        "conclusionCode": [{"coding": [{"system": DISCREPANCY, "code": code}]}],
    }


def test_referrers_find_reports_by_order_patient_status_issued_and_discrepancy(client):
    pid = client.post("/fhir/Patient", json=patient()).json()["id"]
    orders = [
        client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{pid}", accession=a)).json()["id"]
        for a in ("ACSN-1", "ACSN-2")
    ]
    study = imaging_study(f"ServiceRequest/{orders[0]}", f"Patient/{pid}")
    assert client.post("/fhir/ImagingStudy", json=study).status_code == 201  # read for the final report
    reports = []
    for order, status, code, issued in (
        (orders[0], "final", "major", "2024-03-06T10:00:00Z"),
        (orders[1], "preliminary", "agree", "2024-03-08T09:30:00Z"),
    ):
        created = client.post(
            "/fhir/DiagnosticReport",
            json=second_opinion(f"ServiceRequest/{order}", f"Patient/{pid}", status, code, issued),
        )
        assert created.status_code == 201, created.json()
        reports.append(created.json()["id"])

    def found(**params: str) -> list[str]:
        bundle = client.get("/fhir/DiagnosticReport", params=params).json()
        return sorted(e["resource"]["id"] for e in bundle.get("entry", []))

    assert found(**{"based-on": f"ServiceRequest/{orders[0]}"}) == [reports[0]]
    assert found(patient=f"Patient/{pid}") == sorted(reports)
    assert found(status="final") == [reports[0]]
    assert found(issued="ge2024-03-07") == [reports[1]]
    assert found(conclusion=f"{DISCREPANCY}|major") == [reports[0]]
    assert found(conclusion="agree", patient=pid) == [reports[1]]


# -- review fixes ----------------------------------------------------------------------


def test_a_header_httpx_cannot_send_is_refused_and_never_wedges_the_queue(client, db, notifier, receiver):
    bad = subscription(receiver.url, "DiagnosticReport?status=final", header=["X-Name: caf\u00e9"])
    assert client.post("/fhir/Subscription", json=bad).status_code == 422
    # One stored before the check: the row fails like an HTTP error (retried, error recorded), it is not left leased.
    sid = client.post("/fhir/Subscription", json=subscription(receiver.url, "DiagnosticReport?status=final")).json()
    sid = sid["id"]
    with db.transaction() as session:
        row = session.scalars(
            select(ResourceRow).where(ResourceRow.type == "Subscription", ResourceRow.id == sid)
        ).one()
        row.content = row.content.replace('"type":"rest-hook"', '"type":"rest-hook","header":["X-Name: caf\u00e9"]')
    client.post("/fhir/DiagnosticReport", json=report())
    assert deliver(notifier) == 1
    (row,) = rows(db)
    assert (row.status, row.attempts) == ("pending", 1) and "UnicodeEncodeError" in row.last_error
    assert row.available_at > dates.now()  # waits for its retry, not for a lease to run out


def test_a_json_payload_is_sent_as_json_and_a_delivery_to_an_active_one_writes_nothing(
    client, db, notifier, receiver, monkeypatch
):
    sub = subscription(receiver.url, "DiagnosticReport?status=final", payload="application/json")
    sid = client.post("/fhir/Subscription", json=sub).json()["id"]
    client.post("/fhir/DiagnosticReport", json=report())
    invalidated: list[bool] = []
    monkeypatch.setattr(subscriptions, "invalidate", lambda: invalidated.append(True))
    assert deliver(notifier) == 1
    (got,) = receiver.requests
    assert got.headers["content-type"] == "application/json; charset=utf-8"
    assert invalidated == []  # the Subscription was active already: no write, the cache stays
    assert client.get(f"/fhir/Subscription/{sid}").json()["meta"]["versionId"] == "1"
