"""Results out, nothing dropped in silence: a result that cannot become an ORU^R01 (no usable PID-3, a
mapping error, no destination) is a ``failed`` row with its reason, listed by ``GET /hl7/outbound`` and
shown on the case, and is delivered to a real MLLP receiver (python-hl7's) once it is replayed after the
fix; ``overread hl7 backfill`` queues what a destination added later never had; the case's
businessStatus follows delivery."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select

from fhir_server.db import Database
from fhir_server.repository import Repository
from hl7_bridge.outbound import FAILED, NO_DESTINATION, QUEUED, SENT, OutboundMessage
from hl7_bridge.results_queue import Gathered, Result, ResultsQueue
from overread.app import create_app, default_hooks
from overread.config import Destination, Hl7, OverreadConfig
from overread.settings import Settings
from testbed.ports import free_port
from tests.builders import no_images_reason
from tests.peers import Receiver
from tests.processes import OVERREAD
from tests.test_delivery import destination, drain, fhir_order, hl7_order, report_body, rows, task_delivery, worker

Json = dict[str, Any]
MRN = {"system": "urn:mrn", "value": "M7"}
PLACER = {"system": "urn:placer", "value": "P-7", "type": {"coding": [
    {"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "PLAC"}]}}  # fmt: skip
CT_CHEST = {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.close()


def app_client(db: Database, *destinations: Destination) -> TestClient:
    """The HTTP API of a server configured with these destinations (none: no destination at all)."""
    cfg = OverreadConfig(hl7=Hl7(destinations=list(destinations)))
    return TestClient(create_app(Settings(database_url=db.url), db, cfg), base_url="http://testserver")


def order_for(db: Database, patient: Json, subject: Json | None = None, code: Json = CT_CHEST) -> str:
    """A FHIR order for a new Patient; its subject a literal reference unless ``subject`` is given."""
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        stored = repo.create({"resourceType": "Patient", **patient})
        order = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "identifier": [PLACER],
                 "code": code, "subject": subject or {"reference": f"Patient/{stored.id}"}}  # fmt: skip
        order_id = repo.create(order).id
        repo.complete()
    return order_id


def report(db: Database, order_id: str, report_id: str = "so-1", status: str = "final", **changes: Any) -> int:
    """PUT the second-opinion report on the order (the order's subject as its own), with ``changes``
    (None leaves an element out); its version. Read without linked images (these orders have none),
    so it says why."""
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        subject = repo.read("ServiceRequest", order_id).resource["subject"]
        body = {**report_body(order_id, subject, status), "id": report_id, "extension": [no_images_reason()], **changes}
        body = {k: v for k, v in body.items() if v is not None}
        stored, _ = repo.update("DiagnosticReport", report_id, body)
        repo.complete()
    return stored.version


def edit(db: Database, rtype: str, rid: str, **changes: Any) -> None:
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        current = repo.read(rtype, rid)
        repo.update(rtype, rid, {**current.resource, **changes}, current.etag)
        repo.complete()


def case(db: Database, order_id: str) -> Json:
    with db.begin(write=False) as conn:
        found = Repository(conn).search("Task", [("focus", f"ServiceRequest/{order_id}")])
    return found[0].resource


def business_status(db: Database, order_id: str) -> tuple[str, str | None]:
    task = case(db, order_id)
    return task["businessStatus"]["coding"][0]["code"], task.get("statusReason", {}).get("text")


def failed_rows(client: TestClient) -> list[Json]:
    listed = client.get("/hl7/outbound", params={"status": "failed", "replayed": "false"})
    assert listed.status_code == 200, listed.text
    return list(listed.json())


def pid(message: Any, field: int) -> str:
    """PID-n as text ("" when the segment ends before it)."""
    segment = message.segment("PID")
    return str(segment[field]) if field < len(segment) else ""


# -- a subject referenced by identifier -------------------------------------------------------------


@pytest.mark.parametrize("stored", [True, False], ids=["patient-stored", "identifier-only"])
def test_a_subject_referenced_by_identifier_is_resolved_and_sent(
    db: Database, receiver: Receiver, stored: bool
) -> None:
    """The order (and so the report) names its patient by identifier only (R4 logical reference): the
    Patient with that identifier is found and sent; with none stored, the identifier alone is PID-3."""
    patient = {"identifier": [MRN], "name": [{"family": "Doe", "given": ["Jane"]}]} if stored else {}
    order_id = order_for(db, patient, subject={"identifier": MRN})
    report(db, order_id)
    assert drain(worker(db, destination(receiver.port))) == 1
    (message,) = receiver.accepted
    assert pid(message, 3).startswith("M7")
    assert pid(message, 5) == ("Doe^Jane" if stored else "")
    assert [(r.status, r.last_error) for r in rows(db)] == [(SENT, None)]
    assert business_status(db, order_id) == ("result-sent", None)


# -- no usable PID-3 ---------------------------------------------------------------------------------


def test_a_patient_without_identifier_is_a_failed_row_until_the_identifier_is_added_and_it_is_replayed(
    db: Database, receiver: Receiver
) -> None:
    order_id = order_for(db, {"name": [{"family": "Doe"}]})
    report(db, order_id)
    delivery = worker(db, destination(receiver.port))
    assert drain(delivery) == 0
    (row,) = rows(db)
    reason = "The patient has no identifier (PID-3)."
    assert (row.destination, row.status, row.last_error, row.control_id, row.raw) == ("ehr", FAILED, reason, None, None)
    with app_client(db, destination(receiver.port)) as client:
        assert [(m["id"], m["destination"], m["last_error"]) for m in failed_rows(client)] == [(row.pk, "ehr", reason)]
        (shown,) = task_delivery(db, order_id)
        assert (shown["status"], shown["error"], shown["report"]) == (
            "failed",
            reason,
            "DiagnosticReport/so-1/_history/1",
        )
        assert business_status(db, order_id) == ("result-failed", f"ORU^R01 to ehr: failed: {reason}")
        refused = client.post(f"/hl7/outbound/{row.pk}/replay")
        assert refused.status_code == 409 and reason in refused.text  # nothing written: still no PID-3
        assert len(rows(db)) == 1

        edit(db, "Patient", case(db, order_id)["for"]["reference"].split("/")[1], identifier=[MRN])
        replayed = client.post(f"/hl7/outbound/{row.pk}/replay")
        assert replayed.status_code == 200, replayed.text
        again = replayed.json()
        assert (again["status"], again["replay_of"], again["destination"]) == (QUEUED, row.pk, "ehr")
        assert business_status(db, order_id) == ("result-queued", None)
        assert drain(delivery) == 1
        assert [pid(m, 3).split("^")[0] for m in receiver.accepted] == ["M7"]
        assert failed_rows(client) == []  # replayed: no longer open
        assert client.post(f"/hl7/outbound/{row.pk}/replay").status_code == 409  # sent already: not twice
    (shown,) = task_delivery(db, order_id)
    assert (shown["status"], shown["controlId"]) == ("sent", again["control_id"])
    assert business_status(db, order_id) == ("result-sent", None)


def test_a_subject_with_no_identifier_value_is_a_failed_row(db: Database) -> None:
    order_id = order_for(db, {}, subject={"identifier": {"system": "urn:mrn"}, "display": "Jane Doe"})
    report(db, order_id)
    worker(db, destination(free_port())).queue_once()
    (row,) = rows(db)
    assert (row.status, row.last_error) == (FAILED, "DiagnosticReport/so-1 has no Patient subject.")
    assert business_status(db, order_id)[0] == "result-failed"


# -- no destination ----------------------------------------------------------------------------------


def test_no_destination_is_a_failed_row_replayed_to_the_destination_configured_later(
    db: Database, receiver: Receiver
) -> None:
    order_id = hl7_order(db)
    report(db, order_id)
    worker(db).queue_once()
    (row,) = rows(db)
    assert (row.destination, row.status, row.control_id) == (NO_DESTINATION, FAILED, None)
    assert row.last_error is not None and "orders from XYZ_RADIOLOGY" in row.last_error
    assert row.last_error.startswith("No destination is configured") and row.last_error.endswith(".")
    (shown,) = task_delivery(db, order_id)
    assert (shown["destination"], shown["status"]) == (NO_DESTINATION, "failed")
    assert business_status(db, order_id)[0] == "result-failed"
    with app_client(db) as client:
        assert [m["id"] for m in failed_rows(client)] == [row.pk]
        refused = client.post(f"/hl7/outbound/{row.pk}/replay")
        assert refused.status_code == 409 and "still has no destination" in refused.text

    with app_client(db, destination(receiver.port)) as client:  # the destination is configured now
        replayed = client.post(f"/hl7/outbound/{row.pk}/replay")
        assert replayed.status_code == 200, replayed.text
        assert (replayed.json()["destination"], replayed.json()["replay_of"]) == ("ehr", row.pk)
        assert drain(worker(db, destination(receiver.port))) == 1
        assert failed_rows(client) == []
    assert len(receiver.accepted) == 1 and str(receiver.accepted[0].segment("OBR")[25]) == "F"
    (shown,) = task_delivery(db, order_id)  # the "no destination" entry is gone: it has one now
    assert (shown["destination"], shown["status"]) == ("ehr", "sent")
    assert business_status(db, order_id) == ("result-sent", None)


def test_no_destination_may_take_the_name_of_results_without_one() -> None:
    with pytest.raises(ValidationError, match="marks results that have none"):
        Hl7(destinations=[Destination(name=NO_DESTINATION, host="127.0.0.1", port=1)])


def test_a_preliminary_report_no_destination_asks_for_is_no_failure(db: Database) -> None:
    order_id = fhir_order(db)
    report(db, order_id, status="preliminary")
    worker(db, destination(free_port())).queue_once()
    worker(db).queue_once()
    assert rows(db) == []


# -- mapping errors ----------------------------------------------------------------------------------


def test_a_mapping_error_is_a_failed_row_replayed_after_the_order_is_fixed(db: Database, receiver: Receiver) -> None:
    coded_nothing = {"coding": [{"system": "http://loinc.org", "display": "CT Chest"}]}  # OBR-4 needs a code
    order_id = order_for(db, {"identifier": [MRN]}, code=coded_nothing)
    report(db, order_id)
    delivery = worker(db, destination(receiver.port))
    assert drain(delivery) == 0
    (row,) = rows(db)
    assert (row.status, row.last_error) == (FAILED, "The order has no code (OBR-4).")
    with app_client(db, destination(receiver.port)) as client:
        assert [m["id"] for m in failed_rows(client)] == [row.pk]
        assert business_status(db, order_id)[0] == "result-failed"
        edit(db, "ServiceRequest", order_id, code=CT_CHEST)
        assert client.post(f"/hl7/outbound/{row.pk}/replay").status_code == 200
        assert drain(delivery) == 1
    assert str(receiver.accepted[0].segment("OBR")[4]).startswith("24627-2^CT Chest^LN")
    assert business_status(db, order_id) == ("result-sent", None)


def test_a_correction_that_reached_the_receiver_supersedes_the_failed_version_it_corrects(
    db: Database, receiver: Receiver
) -> None:
    order_id = order_for(db, {"name": [{"family": "Doe"}]})
    report(db, order_id)
    delivery = worker(db, destination(receiver.port))
    drain(delivery)
    (first,) = rows(db)
    assert first.status == FAILED and business_status(db, order_id)[0] == "result-failed"
    edit(db, "Patient", case(db, order_id)["for"]["reference"].split("/")[1], identifier=[MRN])
    report(db, order_id, status="amended", conclusion="Amended: a missed nodule.")  # version 2 goes out by itself
    assert drain(delivery) == 1
    assert [(r.report_version, r.status) for r in rows(db)] == [(1, FAILED), (2, SENT)]
    assert business_status(db, order_id) == ("result-sent", None)  # the latest version reached the EHR
    with app_client(db, destination(receiver.port)) as client:
        refused = client.post(f"/hl7/outbound/{first.pk}/replay")  # version 1 now would overwrite version 2
        assert refused.status_code == 409
        assert "a later version, DiagnosticReport/so-1/_history/2, is sent to ehr" in refused.text
    assert [str(m.segment("OBR")[25]) for m in receiver.accepted] == ["C"]


def test_of_two_failed_versions_only_the_latest_is_replayed(db: Database, receiver: Receiver) -> None:
    order_id = order_for(db, {"name": [{"family": "Doe"}]})
    report(db, order_id)
    report(db, order_id, status="corrected", conclusion="Corrected: a missed nodule.")
    delivery = worker(db, destination(receiver.port))
    drain(delivery)
    first, second = rows(db)
    assert [(r.report_version, r.status) for r in (first, second)] == [(1, FAILED), (2, FAILED)]
    edit(db, "Patient", case(db, order_id)["for"]["reference"].split("/")[1], identifier=[MRN])
    with app_client(db, destination(receiver.port)) as client:
        refused = client.post(f"/hl7/outbound/{first.pk}/replay")
        assert refused.status_code == 409 and "_history/2, is failed to ehr" in refused.text
        assert client.post(f"/hl7/outbound/{second.pk}/replay").status_code == 200
    assert drain(delivery) == 1
    assert [str(m.segment("OBR")[25]) for m in receiver.accepted] == ["C"]
    assert business_status(db, order_id) == ("result-sent", None)


def test_a_report_deleted_before_it_was_queued_is_a_failed_row(db: Database) -> None:
    order_id = fhir_order(db)
    report(db, order_id)
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        repo.delete("DiagnosticReport", "so-1")
        repo.complete()
    worker(db, destination(free_port())).queue_once()
    (row,) = rows(db)
    assert (row.status, row.order_id, row.result_status) == (FAILED, order_id, "F")
    assert row.last_error == "DiagnosticReport/so-1 was deleted (version 2)."


def test_a_result_whose_queueing_keeps_failing_ends_as_a_failed_row_not_a_log_line(
    db: Database, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    order_id = fhir_order(db)
    report(db, order_id)

    def broken(self: ResultsQueue, repo: Repository, result: Result) -> Gathered:
        raise RuntimeError("a bug")

    with monkeypatch.context() as patched:
        patched.setattr(ResultsQueue, "gather", broken)
        delivery = worker(db, destination(receiver.port), attempts=2)
        delivery.queue_once()
        assert rows(db) == []  # tried again first
        delivery.queue_once()
    (row,) = rows(db)
    assert (row.destination, row.status) == (NO_DESTINATION, FAILED)
    assert row.last_error == "Queueing failed 2 times, the last with RuntimeError: a bug."
    assert business_status(db, order_id)[0] == "result-failed"
    with app_client(db, destination(receiver.port)) as client:  # the bug fixed
        assert client.post(f"/hl7/outbound/{row.pk}/replay").status_code == 200
    assert drain(delivery) == 1 and len(receiver.accepted) == 1
    assert business_status(db, order_id) == ("result-sent", None)


# -- the outbound list's filters -----------------------------------------------------------------


def test_the_outbound_list_refuses_an_unknown_status_or_a_malformed_time(db: Database) -> None:
    report(db, fhir_order(db))
    worker(db).queue_once()
    with app_client(db) as client:
        bogus = client.get("/hl7/outbound", params={"status": "bogus"})
        assert bogus.status_code == 400
        assert "must be one of queued, error, sent, dead, failed (got 'bogus')" in bogus.text
        for name in ("since", "until"):
            bad = client.get("/hl7/outbound", params={name: "yesterday"})
            assert bad.status_code == 400 and name in bad.text and "yesterday" in bad.text
        assert len(client.get("/hl7/outbound", params={"since": "2020-01-01"}).json()) == 1
        assert client.get("/hl7/outbound", params={"since": "2999-01-01T00:00:00Z"}).json() == []
        assert client.get("/hl7/outbound", params={"until": "2020-01"}).json() == []


# -- backfill --------------------------------------------------------------------------------------------


def backfill(database_url: str, config: Path, *args: str) -> str:
    env = {**os.environ, "OVERREAD_DATABASE_URL": database_url, "OVERREAD_CONFIG": str(config)}
    done = subprocess.run([*OVERREAD, "hl7", "backfill", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_backfill_queues_what_a_destination_added_later_never_had(
    db: Database, receiver: Receiver, tmp_path: Path
) -> None:
    hl7_case, fhir_case, early = hl7_order(db), fhir_order(db), fhir_order(db)
    report(db, hl7_case, "so-hl7")  # from XYZ_RADIOLOGY: its own destination, not the default one
    report(db, fhir_case, "so-fhir")
    report(db, early, "so-early", status="preliminary")  # the default destination wants no preliminaries
    worker(db).queue_once()  # no destination yet: failed rows say so
    assert sorted((r.report_id, r.destination, r.status) for r in rows(db)) == [
        ("so-fhir", NO_DESTINATION, FAILED),
        ("so-hl7", NO_DESTINATION, FAILED),
    ]
    config = tmp_path / "overread.yaml"
    config.write_text(
        "hl7:\n  destinations:\n"
        f"    - {{name: ehr, host: 127.0.0.1, port: {receiver.port}, ack_timeout_seconds: 10}}\n"
        f"    - {{name: xyz, host: 127.0.0.1, port: {free_port()}, sending_facility: XYZ_RADIOLOGY}}\n"
    )
    listed = backfill(db.url, config, "--destination", "ehr", "--dry-run")
    assert "DiagnosticReport/so-fhir/_history/1" in listed and "would queue" in listed
    assert "so-hl7" not in listed and "so-early" not in listed
    assert listed.splitlines()[-1] == "dry run: 1 would queue"
    assert len(rows(db)) == 2  # a dry run queues nothing

    queued = backfill(db.url, config, "--destination", "ehr")
    assert queued.splitlines()[-1] == "1 queued"
    (made,) = [r for r in rows(db) if r.destination == "ehr"]
    none_row = next(r for r in rows(db) if r.report_id == "so-fhir" and r.destination == NO_DESTINATION)
    assert (made.report_id, made.status, made.replay_of) == ("so-fhir", QUEUED, none_row.pk)
    assert backfill(db.url, config, "--destination", "ehr") == "nothing to backfill\n"  # idempotent
    assert len(rows(db)) == 3

    assert drain(worker(db, destination(receiver.port))) == 1
    assert [str(m.segment("ORC")[2]).split("^")[0] for m in receiver.accepted] == ["P-1"]
    (shown,) = task_delivery(db, fhir_case)
    assert (shown["destination"], shown["status"]) == ("ehr", "sent")
    assert business_status(db, fhir_case) == ("result-sent", None)
    with app_client(db) as client:
        assert [m["report_id"] for m in failed_rows(client)] == ["so-hl7"]  # still open: xyz has not had it

    everywhere = backfill(db.url, config)  # every destination: xyz gets its facility's report
    assert "xyz" in everywhere and "so-hl7" in everywhere and everywhere.splitlines()[-1] == "1 queued"
    with db.transaction() as session:
        assert session.scalars(select(OutboundMessage.report_id).where(OutboundMessage.destination == "xyz")).all() == [
            "so-hl7"
        ]


@pytest.mark.slow
def test_backfill_names_an_unknown_destination(db: Database, tmp_path: Path) -> None:
    config = tmp_path / "overread.yaml"
    config.write_text("hl7:\n  destinations:\n    - {name: ehr, host: 127.0.0.1, port: 1}\n")
    env = {**os.environ, "OVERREAD_DATABASE_URL": db.url, "OVERREAD_CONFIG": str(config)}
    done = subprocess.run([*OVERREAD, "hl7", "backfill", "--destination", "lab"], env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "no destination lab is configured (configured: ehr)" in done.stderr
