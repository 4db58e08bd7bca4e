"""Results out as ORU^R01 over MLLP, reliably: a receiver from another library (python-hl7's asyncio MLLP
server) gets real ORUs; receiver down then up, answering AE, never answering, a malformed ACK, order
kept, a crash between commit and send, and a kill -9 of ``overread serve``: the receiver accepts each
report version exactly once."""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from cases.results import RESULT
from fhir_server import outbox
from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.outbox import Backoff
from fhir_server.outbox_worker import Job
from fhir_server.repository import Repository
from fhir_server.schema import OutboxRow
from hl7_bridge.delivery import Delivery
from hl7_bridge.delivery_status import delivery_status
from hl7_bridge.outbound import DEAD, ERROR, QUEUED, SENT, OutboundMessage
from hl7_bridge.results_queue import ResultsQueue, choose
from hl7_bridge.sender import judge
from overread.app import create_app, default_hooks, results_out
from overread.config import Delivery as DeliveryConfig
from overread.config import Destination, Hl7, OverreadConfig
from overread.settings import Settings
from testbed.ports import free_port
from tests.builders import imaging_study
from tests.conftest import FHIR_JSON, Clock
from tests.hl7_golden import OMI
from tests.intake import receive
from tests.peers import Receiver
from tests.processes import fhir_base, serve_env, start_serve

DISCREPANCY = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"
Json = dict[str, Any]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.close()


def destination(port: int, ack_timeout_seconds: float = 10, **extra: Any) -> Destination:
    """A destination; the ACK timeout is long enough for a loaded CI machine (a late ACK means a resend)."""
    return Destination(name="ehr", host="127.0.0.1", port=port, ack_timeout_seconds=ack_timeout_seconds, **extra)


def worker(db: Database, *destinations: Destination, attempts: int = 3, lease: float = 60) -> Delivery:
    backoff = Backoff(attempts, timedelta(0), timedelta(0))
    return Delivery(for_database(db), destinations, backoff, default_hooks(), lease=timedelta(seconds=lease))


# -- a case and its report --------------------------------------------------------------------------


def hl7_order(db: Database, message: bytes = OMI) -> str:
    """An order in over HL7 (MSH-3 MESA_OF, MSH-4 XYZ_RADIOLOGY); its ServiceRequest id."""
    assert b"|AA|" in receive(db, message, None, default_hooks())
    with db.begin(write=False) as conn:
        orders = Repository(conn).search("ServiceRequest", [("_sort", "-_lastUpdated")])
    link_images(db, orders[0].id)
    return orders[0].id


def link_images(db: Database, order_id: str) -> None:
    """The case's images (what the linking worker writes): a final report needs them."""
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        subject = repo.read("ServiceRequest", order_id).resource["subject"]["reference"]
        uid = f"2.25.{uuid.UUID(order_id).int}"  # one study per order (ids are UUIDs)
        repo.create(imaging_study(f"ServiceRequest/{order_id}", subject, uid))
        repo.complete()


def fhir_order(db: Database) -> str:
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        patient = repo.create({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "M1"}]})
        order = repo.create(
            {
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "identifier": [{"system": "urn:placer", "value": "P-1", "type": _type("PLAC")}],
                "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
                "subject": {"reference": f"Patient/{patient.id}"},
            }
        )
        repo.complete()
    link_images(db, order.id)
    return order.id


def _type(code: str) -> Json:
    return {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": code}]}


def report_body(order_id: str, subject: Json, status: str = "final", code: str = "major", conclusion: str = "") -> Json:
    """A second-opinion report on the order (no id)."""
    return {
        "resourceType": "DiagnosticReport",
        "status": status,
        "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
        "subject": subject,
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "issued": "2026-11-28T10:00:00+00:00",
        "resultsInterpreter": [{"display": "Dr Second Reader"}],
        "conclusion": conclusion or f"Second opinion ({status}): a missed nodule.\nFollow-up CT in 3 months.",
        "conclusionCode": [{"coding": [{"system": DISCREPANCY, "code": code}]}],
    }


def write_report(db: Database, order_id: str, report_id: str, status: str = "final", code: str = "major") -> int:
    """PUT the second-opinion report (create or new version); its version."""
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        subject = repo.read("ServiceRequest", order_id).resource["subject"]
        report = {**report_body(order_id, subject, status, code), "id": report_id}
        stored, _ = repo.update("DiagnosticReport", report_id, report)
        repo.complete()
    return stored.version


def rows(db: Database) -> list[OutboundMessage]:
    with db.transaction() as session:
        return list(session.scalars(select(OutboundMessage).order_by(OutboundMessage.pk)))


def task_delivery(db: Database, order_id: str) -> list[dict[str, str]]:
    with db.begin(write=False) as conn:
        found = Repository(conn).search("Task", [("focus", f"ServiceRequest/{order_id}")])
    return delivery_status(found[0].resource)


def obr25(message: hl7.Message) -> str:
    return str(message.segment("OBR")[25])


def drain(delivery: Delivery, name: str = "ehr", limit: int = 20) -> int:
    """Queue what is due (a report's versions one at a time) and send until nothing is due; how many sends."""
    while delivery.queue_once():
        pass
    sends = 0
    while sends < limit and delivery.send_once(name):
        sends += 1
    return sends


# -- tests ------------------------------------------------------------------------------------------


def test_a_final_report_reaches_the_receiver_once_as_an_oru(db: Database, receiver: Receiver) -> None:
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1")
    delivery = worker(db, destination(receiver.port))
    assert drain(delivery) == 1
    (message,) = receiver.accepted
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert str(message.segment("MSH")[5]) == "MESA_OF" and str(message.segment("MSH")[6]) == "XYZ_RADIOLOGY"
    assert obr25(message) == "F"
    disc = [obx for obx in message.segments("OBX") if str(obx[3]).startswith("DISC^")]
    assert len(disc) == 1 and str(disc[0][5]).startswith("major^Major discrepancy^99OVRD")
    assert str(message.segment("ORC")[2]).startswith("PlacerOrderNumberImagingServiceRequest")
    # The ordering provider (the order's requester), by which EHRs route results: ORC-12 and OBR-16.
    assert str(message.segment("ORC")[12]).startswith("^RequestingPhysicianFN^RequestingPhysicianGN^")
    assert str(message.segment("OBR")[16]) == str(message.segment("ORC")[12])
    (row,) = rows(db)
    assert (row.status, row.attempts, row.ack_code, row.result_status) == (SENT, 1, "AA", "F")
    assert row.control_id == receiver.control_ids()[0] and len(row.control_id) <= 20
    (shown,) = task_delivery(db, order_id)
    assert shown["status"] == "sent" and shown["controlId"] == row.control_id and shown["ackCode"] == "AA"
    assert shown["report"] == "DiagnosticReport/so-1/_history/1" and shown["destination"] == "ehr"
    # Running again (a restart) sends nothing more.
    assert drain(worker(db, destination(receiver.port))) == 0
    assert len(receiver.received) == 1


def test_a_correction_sends_a_second_oru_with_obr25_c(db: Database, receiver: Receiver) -> None:
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1", "final", "minor")
    delivery = worker(db, destination(receiver.port))
    drain(delivery)
    assert write_report(db, order_id, "so-1", "corrected", "major") == 2
    drain(delivery)
    assert [obr25(m) for m in receiver.accepted] == ["F", "C"]
    assert len(set(receiver.control_ids())) == 2
    assert [(r.report_version, r.status) for r in rows(db)] == [(1, SENT), (2, SENT)]
    assert {s["report"] for s in task_delivery(db, order_id)} == {
        "DiagnosticReport/so-1/_history/1",
        "DiagnosticReport/so-1/_history/2",
    }


def test_a_report_withdrawn_after_it_was_sent_goes_out_as_obr25_x_and_the_same_report_again_not_at_all(
    db: Database, receiver: Receiver
) -> None:
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1", "final")
    delivery = worker(db, destination(receiver.port))
    drain(delivery)
    assert write_report(db, order_id, "so-1", "final") == 2  # a client PUTs the same report again
    drain(delivery)
    assert [obr25(m) for m in receiver.accepted] == ["F"]
    write_report(db, order_id, "so-1", "entered-in-error")
    drain(delivery)
    assert [obr25(m) for m in receiver.accepted] == ["F", "X"]  # the EHR must not keep showing it


def test_receiver_down_then_up_delivers_once_after_a_retry(db: Database) -> None:
    port = free_port()
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1")
    delivery = worker(db, destination(port), attempts=5)
    delivery.queue_once()
    assert delivery.send_once("ehr")
    (row,) = rows(db)
    assert row.status == ERROR and row.attempts == 1 and "cannot reach" in (row.last_error or "")
    assert task_delivery(db, order_id)[0]["status"] == "error"
    receiver = Receiver(port).start()
    try:
        assert drain(delivery) == 1
        assert len(receiver.accepted) == 1 and receiver.control_ids() == [row.control_id]
    finally:
        receiver.close()
    (row,) = rows(db)
    assert (row.status, row.attempts) == (SENT, 2)
    assert task_delivery(db, order_id)[0]["status"] == "sent"


def test_receiver_answering_ae_is_retried_then_dead_then_a_replay_delivers(
    db: Database, receiver: Receiver, client: TestClient
) -> None:
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1")
    receiver.mode = "AE"
    delivery = worker(db, destination(receiver.port), attempts=3)
    assert drain(delivery) == 3
    (row,) = rows(db)
    assert (row.status, row.attempts, row.ack_code) == (DEAD, 3, "AE")
    # Every attempt was the same message: the same MSH-10, so a receiver can tell a resend.
    assert receiver.control_ids(receiver.received) == [row.control_id] * 3 and not receiver.accepted
    assert task_delivery(db, order_id)[0]["status"] == "dead"
    dead = client.get("/hl7/outbound", params={"status": "dead"}).json()
    assert [(m["id"], m["report_id"], m["attempts"]) for m in dead] == [(row.pk, "so-1", 3)]
    assert client.get(f"/hl7/outbound/{row.pk}").json()["raw"].startswith("MSH|")

    receiver.mode = "AA"
    replayed = client.post(f"/hl7/outbound/{row.pk}/replay")
    assert replayed.status_code == 200, replayed.text
    again = replayed.json()
    assert again["status"] == QUEUED and again["replay_of"] == row.pk and again["control_id"] != row.control_id
    assert client.post(f"/hl7/outbound/{again['id']}/replay").status_code == 409  # still in the queue
    assert drain(delivery) == 1
    assert receiver.control_ids() == [again["control_id"]]
    assert client.get(f"/hl7/outbound/{row.pk}").json()["replays"] == [again["id"]]
    assert client.get("/hl7/outbound", params={"status": "dead", "replayed": "false"}).json() == []
    assert client.get("/hl7/outbound", params={"report": "so-1", "status": "sent"}).json()[0]["id"] == again["id"]
    (shown,) = task_delivery(db, order_id)
    assert shown["status"] == "sent" and shown["controlId"] == again["control_id"]
    assert client.get("/hl7/outbound/999999").status_code == 404


def test_receiver_never_answering_times_out_and_the_resend_is_accepted_once(db: Database, receiver: Receiver) -> None:
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1")
    receiver.mode = "silent"
    delivery = worker(db, destination(receiver.port, ack_timeout_seconds=0.5), attempts=5)
    delivery.queue_once()
    started = time.monotonic()
    assert delivery.send_once("ehr")
    assert time.monotonic() - started < 5
    (row,) = rows(db)
    assert row.status == ERROR and row.last_error == "no ACK within 0.5 s"
    receiver.mode = "AA"
    assert drain(delivery) == 1
    assert receiver.control_ids() == [row.control_id]


def test_a_malformed_ack_is_not_a_delivery(db: Database, receiver: Receiver) -> None:
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1")
    receiver.mode = "malformed"
    delivery = worker(db, destination(receiver.port), attempts=5)
    delivery.queue_once()
    delivery.send_once("ehr")
    (row,) = rows(db)
    assert row.status == ERROR and "MSA-2" in (row.last_error or "")


@pytest.mark.parametrize(
    ("ack", "sent", "error"),
    [
        ("MSH|^~\\&|A|B|C|D|20260101||ACK|9|P|2.5.1\rMSA|AA|X1", True, None),
        ("MSH|^~\\&|A|B|C|D|20260101||ACK|9|P|2.5.1\rMSA|CA|X1", True, None),
        ("MSH|^~\\&|A|B|C|D|20260101||ACK|9|P|2.5.1\rMSA|AE|X1|Unknown patient", False, "AE: Unknown patient"),
        ("MSH|^~\\&|A|B|C|D|20260101||ACK|9|P|2.5.1\rMSA|AR|X1\rERR||||E||||No such order", False, "AR: No such order"),
        ("MSH|^~\\&|A|B|C|D|20260101||ACK|9|P|2.5.1\rMSA|AA|X2", False, "malformed ACK: MSA-2"),
        ("MSH|^~\\&|A|B|C|D|20260101||ACK|9|P|2.5.1\rMSA|OK|X1", False, "malformed ACK: MSA-1"),
        ("MSH|^~\\&|A|B|C|D|20260101||ACK|9|P|2.5.1", False, "malformed ACK: no MSA"),
        ("garbage", False, "malformed ACK"),
    ],
)
def test_judging_an_ack(ack: str, sent: bool, error: str | None) -> None:
    outcome = judge(ack.encode(), "X1")
    assert outcome.sent is sent
    assert (outcome.error or "").startswith(error or "")


def test_the_queue_keeps_its_order_behind_a_message_being_retried(db: Database) -> None:
    port = free_port()
    first, second = hl7_order(db), hl7_order(db, OMI.replace(b"|1001125|", b"|1001126|").replace(b"PID_1^", b"PID_2^")
                                             .replace(b"PlacerOrderNumberImagingServiceRequest", b"PLAC2"))  # fmt: skip
    assert first != second
    write_report(db, first, "so-1")
    write_report(db, second, "so-2")
    delivery = worker(db, destination(port), attempts=10)
    delivery.queue_once()
    assert delivery.send_once("ehr") and delivery.send_once("ehr")
    assert [(r.report_id, r.status, r.attempts) for r in rows(db)] == [("so-1", ERROR, 2), ("so-2", QUEUED, 0)]
    receiver = Receiver(port).start()
    try:
        assert drain(delivery) == 2
        assert [str(m.segment("OBR")[2]).split("^")[0] for m in receiver.accepted] == [
            "PlacerOrderNumberImagingServiceRequest",
            "PLAC2",
        ]
    finally:
        receiver.close()


def test_a_dead_message_no_longer_holds_up_the_queue(db: Database, receiver: Receiver) -> None:
    first = hl7_order(db)
    write_report(db, first, "so-1")
    receiver.mode = "AR"
    delivery = worker(db, destination(receiver.port), attempts=2)
    drain(delivery)
    write_report(db, first, "so-1", "amended")
    receiver.mode = "AA"
    drain(delivery)
    assert [(r.report_version, r.status) for r in rows(db)] == [(1, DEAD), (2, SENT)]
    assert [obr25(m) for m in receiver.accepted] == ["C"]


def test_a_correction_is_not_queued_before_the_final_report_whose_queueing_failed(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    order_id = fhir_order(db)
    write_report(db, order_id, "so-1")
    write_report(db, order_id, "so-1", "corrected")
    delivery = worker(db, destination(free_port()))
    build = ResultsQueue.handle
    failed: list[int] = []

    def flaky(self: ResultsQueue, job: Job) -> None:
        if job.version == 1 and not failed:  # a transient failure (a lock timeout, a dropped connection)
            failed.append(job.version)
            raise RuntimeError("database hiccup")
        build(self, job)

    monkeypatch.setattr(ResultsQueue, "handle", flaky)
    assert delivery.queue_once() == 1
    assert rows(db) == []  # version 2 waits for version 1
    assert delivery.queue_once() == 1
    assert [(r.report_version, r.result_status) for r in rows(db)] == [(1, "F")]  # version 2 claimed next
    assert delivery.queue_once() == 1
    assert [(r.report_version, r.result_status) for r in rows(db)] == [(1, "F"), (2, "C")]
    with db.transaction() as session:
        attempts = list(session.scalars(select(OutboxRow.attempts).where(OutboxRow.topic == RESULT)))
    assert attempts == [2, 1]  # waiting cost version 2 no attempt


def test_msh7_is_the_time_now_whatever_the_servers_time_zone(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    order_id = fhir_order(db)
    write_report(db, order_id, "so-1")
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        worker(db, destination(free_port())).queue_once()
    finally:
        monkeypatch.undo()
        time.tzset()
    (row,) = rows(db)
    msh7 = datetime.strptime((row.raw or b"").decode().split("|")[6], "%Y%m%d%H%M%S%z")
    assert msh7.utcoffset() in (timedelta(hours=-5), timedelta(hours=-4))
    assert abs(msh7 - datetime.now(UTC)) < timedelta(minutes=1)


# -- crashes ------------------------------------------------------------------------------------------


def test_a_crash_between_commit_and_send_delivers_each_version_once(
    db: Database, receiver: Receiver, clock: Clock
) -> None:
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1")
    # 1. A worker claimed the result row and died before queueing: the lease runs out, another does it.
    with db.transaction() as session:
        assert len(outbox.claim(session, RESULT, lease=timedelta(minutes=1))) == 1
    fresh = worker(db, destination(receiver.port), lease=60)
    assert fresh.queue_once() == 0  # leased by the dead worker
    clock.advance(timedelta(minutes=2))
    assert fresh.queue_once() == 1
    # 2. The message is queued; the worker dies while it holds the head of the queue, before sending.
    assert fresh.senders["ehr"].claim(timedelta(minutes=1)) is not None
    again = worker(db, destination(receiver.port), lease=60)
    assert not again.send_once("ehr")
    clock.advance(timedelta(minutes=2))
    assert again.send_once("ehr") and not again.send_once("ehr")
    # 3. A result row queued twice (two processes, a rerun) makes one message.
    with db.transaction() as session:
        session.execute(update(OutboxRow).values(status=outbox.PENDING, available_at=OutboxRow.created_at))
    assert drain(worker(db, destination(receiver.port))) == 0
    assert len(receiver.accepted) == len(receiver.received) == 1 and len(rows(db)) == 1


# -- choosing the destination --------------------------------------------------------------------


def test_results_go_to_the_ordering_facilitys_destination_else_the_default(db: Database) -> None:
    a, b = Receiver().start(), Receiver().start()
    try:
        own = Destination(name="xyz", host="127.0.0.1", port=a.port, sending_facility="XYZ_RADIOLOGY",
                          ack_timeout_seconds=0.5, version="2.3.1")  # fmt: skip
        default = destination(b.port)
        delivery = worker(db, own, default)
        write_report(db, hl7_order(db), "so-hl7")
        write_report(db, fhir_order(db), "so-fhir")
        delivery.queue_once()
        assert delivery.send_once("xyz") and delivery.send_once("ehr")
        assert [str(m.segment("MSH")[12]) for m in a.accepted] == ["2.3.1"]
        assert [str(m.segment("MSH")[12]) for m in b.accepted] == ["2.5.1"]
        assert str(b.accepted[0].segment("PID")[3]).startswith("M1")
    finally:
        a.close()
        b.close()


def test_a_preliminary_report_goes_only_where_asked(db: Database) -> None:
    eager = destination(1, send_preliminary=True).model_copy(update={"name": "eager"})
    plain = destination(2)
    assert [d.name for d in choose([eager, plain], None, "preliminary")] == ["eager"]
    assert [d.name for d in choose([eager, plain], None, "final")] == ["eager", "ehr"]
    order_id = hl7_order(db)
    write_report(db, order_id, "so-1", "preliminary")
    worker(db, plain).queue_once()
    assert rows(db) == []
    delivery = worker(db, eager)
    write_report(db, order_id, "so-2", "preliminary")
    delivery.queue_once()
    assert [(r.report_id, r.result_status) for r in rows(db)] == [("so-2", "P")]


def test_an_original_report_is_no_result(db: Database) -> None:
    order_id = hl7_order(db)
    with db.begin() as conn:
        repo = Repository(conn, default_hooks())
        order = repo.read("ServiceRequest", order_id).resource
        repo.create(
            {
                "resourceType": "DiagnosticReport",
                "meta": {"tag": [{"system": "https://overread.org/fhir/CodeSystem/report-role", "code": "original"}]},
                "status": "final",
                "basedOn": [{"reference": f"ServiceRequest/{order_id}"}],
                "subject": order["subject"],
                "code": {"text": "CT"},
            }
        )
        repo.complete()
    with db.transaction() as session:
        assert session.scalars(select(OutboxRow).where(OutboxRow.topic == RESULT)).all() == []


# -- the running server ------------------------------------------------------------------------------


def _wait(condition: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_delivery_threads_of_serve_deliver_a_report_posted_over_http(db: Database, receiver: Receiver) -> None:
    cfg = OverreadConfig(hl7=Hl7(destinations=[destination(receiver.port)], delivery=DeliveryConfig(poll_seconds=0.05)))
    order_id = hl7_order(db)
    with TestClient(create_app(Settings(database_url=db.url), db, cfg)) as client, results_out(for_database(db), cfg):
        client.headers.update(FHIR_JSON)
        with db.begin(write=False) as conn:
            subject = Repository(conn).read("ServiceRequest", order_id).resource["subject"]
        report = report_body(order_id, subject, code="agree", conclusion="Agree.")
        assert client.post("/fhir/DiagnosticReport", json=report).status_code == 201
        _wait(lambda: len(receiver.accepted) == 1)
        _wait(lambda: bool(task_delivery(db, order_id)) and task_delivery(db, order_id)[0]["status"] == "sent")
        task = client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"][0]["resource"]
        assert task["status"] == "completed"
    assert len(receiver.received) == 1


@pytest.mark.slow
def test_kill_9_between_commit_and_send_then_restart_delivers_once(database_url: str, tmp_path: Path) -> None:
    """``overread serve`` commits a report posted over HTTP and is killed (SIGKILL) before it could send it
    (its receiver is down); restarted on the same database with the receiver up, it sends it exactly once."""
    receiver_port = free_port()
    config = tmp_path / "overread.yaml"
    config.write_text(
        "hl7:\n  destinations:\n"
        f"    - {{name: ehr, host: 127.0.0.1, port: {receiver_port}, ack_timeout_seconds: 1}}\n"
        "  delivery: {first_retry_seconds: 0.2, max_retry_seconds: 0.5, poll_seconds: 0.05, lease_seconds: 2}\n"
    )
    env = serve_env(database_url, tmp_path, config)
    db = Database(database_url)
    order_id = hl7_order(db)
    with db.begin(write=False) as conn:
        subject = Repository(conn).read("ServiceRequest", order_id).resource["subject"]
    server = start_serve(env)
    receiver = Receiver(receiver_port)
    try:
        report = report_body(order_id, subject, conclusion="Major discrepancy.")
        posted = httpx.post(f"{fhir_base(env)}/DiagnosticReport", json=report, headers=FHIR_JSON)
        assert posted.status_code == 201, posted.text
        _wait(lambda: any(r.attempts >= 1 for r in rows(db)))  # queued, and tried against a receiver that is down
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        assert [r.status for r in rows(db)] == [ERROR]
        receiver.start()
        server = start_serve(env)
        _wait(lambda: [r.status for r in rows(db)] == [SENT])
        time.sleep(0.5)
        assert len(receiver.accepted) == len(receiver.received) == 1
        assert obr25(receiver.accepted[0]) == "F"
    finally:
        server.kill()
        server.wait(10)
        receiver.close()
        db.dispose()
