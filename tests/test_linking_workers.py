"""The image-linking worker as a durable job (docs/image-linking.md): several workers
share one database and run every job once; a worker that dies mid-job loses nothing; after a
restart the server links what was ordered while it was down. Against the bundled sample PACS,
on SQLite and PostgreSQL.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select, update

from cases.patient_match import MatchRule
from cases.task import IMAGES_AVAILABLE, LINK_IMAGING
from dicom_bridge.image_store import ImageStore
from dicom_bridge.linking import Linker, Source
from dicom_bridge.sample_pacs import DEMO_ACCESSION, DEMO_PATIENT, SAMPLE_ISSUER, SamplePacs, sample_path
from fhir_server import dates, outbox
from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.outbox import Backoff
from fhir_server.schema import OutboxRow
from overread.app import default_hooks, imaging
from overread.config import Linking, OverreadConfig, PacsPeer
from overread.settings import Settings
from testbed.ports import free_port
from tests.builders import MRN_SYSTEM, patient, service_request

NOW = Backoff(max_attempts=3, first_delay=timedelta(0))
#: 12 orders for 4 studies of the sample PACS: most studies are asked for by several orders.
ORDERS = {DEMO_ACCESSION: 5, "ACC-SAMPLE-MR": 4, "ACC-SAMPLE-RT": 2, "2008050417172310": 1}
#: Study Instance UID and instance count of each sample study, by accession number.
STUDIES = {
    DEMO_ACCESSION: ("1.3.6.1.4.1.5962.1.2.1.20040119072730.12322", 1),
    "ACC-SAMPLE-MR": ("1.3.6.1.4.1.5962.1.2.4.20040826185059.5457", 2),
    "ACC-SAMPLE-RT": ("1.2.999.999.99.9.9999.8888", 1),
}

#: The PatientID of each sample study: the MRN of the orders' patient, so that the patient matches.
PATIENTS = {
    DEMO_ACCESSION: DEMO_PATIENT,
    "ACC-SAMPLE-MR": "4MR1",
    "ACC-SAMPLE-RT": "id11111",
    "2008050417172310": "2008-4",
}
ISSUERS = {SAMPLE_ISSUER: MRN_SYSTEM}
RULE = MatchRule(issuers=ISSUERS)


@pytest.fixture(scope="module")
def pacs() -> Iterator[SamplePacs]:
    with SamplePacs() as running:
        yield running


def peer(pacs: SamplePacs, retrieve: str = "none") -> PacsPeer:
    return PacsPeer.model_validate(
        {"name": "sample", "ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port, "retrieve": retrieve}
    )


def linker(db: Database, pacs: SamplePacs, store: ImageStore, retrieve: str = "none") -> Linker:
    """A worker as ``overread serve`` wires one: the PACS, then the image store."""
    sources = [
        Source("sample", store, peer(pacs, retrieve), "OVERREAD", timeout=10, rule=RULE),
        Source("image store", store, rule=RULE),
    ]
    return Linker(for_database(db), sources, NOW, default_hooks())


def order(client: TestClient, accession: str, patient_id: str | None = None) -> str:
    if patient_id is None:
        patient_id = client.post("/fhir/Patient", json=patient(PATIENTS[accession])).json()["id"]
    response = client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{patient_id}", accession))
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def status(client: TestClient, order_id: str) -> str | None:
    (entry,) = client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"]
    codes = [c["code"] for c in entry["resource"].get("businessStatus", {}).get("coding", [])]
    return codes[0] if codes else None


def resources(client: TestClient, resource_type: str) -> list[dict]:
    bundle = client.get(f"/fhir/{resource_type}", params={"_count": 100}).json()
    return [e["resource"] for e in bundle.get("entry", [])]


def jobs(db: Database) -> list[tuple[str, int]]:
    with db.transaction() as session:
        return [(r.status, r.attempts) for r in session.scalars(select(OutboxRow).order_by(OutboxRow.pk))]


def wait_until(done: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_two_workers_on_one_database_run_every_job_once(client, db, pacs, tmp_path: Path):
    ordered = {acc: [order(client, acc) for _ in range(n)] for acc, n in ORDERS.items()}
    store = ImageStore(tmp_path / "images")
    # Two Database objects, as two server processes have: on SQLite they meet at the file's lock.
    databases = [Database(db.url), Database(db.url)]
    workers = [linker(d, pacs, store, "c-get") for d in databases]
    ran = [0, 0]
    failures: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i: int) -> None:
        try:
            start.wait(timeout=10)
            workers[i].publish_endpoints()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                ran[i] += (n := workers[i].run_once())
                if n == 0 and all(s != outbox.PENDING for s, _ in jobs(databases[i])):
                    return
                if n == 0:
                    time.sleep(0.01)  # the other worker holds the rest
            raise AssertionError("the jobs did not get done")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    finally:
        for d in databases:
            d.dispose()
    assert failures == []
    assert jobs(db) == [(outbox.DONE, 1)] * 12  # each claimed and run once
    assert sum(ran) == 12 and all(ran), ran  # both took part
    studies = resources(client, "ImagingStudy")
    by_uid = {s["identifier"][0]["value"]: s for s in studies}
    assert len(studies) == len(by_uid) == len(ORDERS)  # one per Study Instance UID
    for accession, order_ids in ordered.items():
        (study,) = [s for s in studies if any(i["value"] == accession for i in s["identifier"])]
        based_on = [ref["reference"] for ref in study["basedOn"]]
        assert sorted(based_on) == sorted(f"ServiceRequest/{o}" for o in order_ids)  # every order, once
        if accession in STUDIES:
            uid, instances = STUDIES[accession]
            assert study["identifier"][0]["value"] == f"urn:oid:{uid}"
            assert store.count(uid) == instances == study["numberOfInstances"]
    assert {status(client, o) for ids in ordered.values() for o in ids} == {IMAGES_AVAILABLE}
    assert len(resources(client, "Endpoint")) == 1  # published by both, created once


def test_a_worker_that_dies_mid_job_loses_nothing(client, db, pacs, tmp_path: Path):
    order_ids = [order(client, DEMO_ACCESSION), order(client, "ACC-SAMPLE-MR")]
    with db.transaction() as session:  # a worker claims the jobs, as Linker.run_once does ...
        claimed = outbox.claim(session, LINK_IMAGING)
        leased_until = {row.available_at for row in claimed}
    assert len(claimed) == 2  # ... and dies before it has done anything
    assert min(leased_until) > dates.now() + timedelta(minutes=1)
    survivor = linker(db, pacs, ImageStore(tmp_path / "images"))
    survivor.publish_endpoints()
    assert survivor.run_once() == 0  # leased to the dead worker: not taken while the lease runs
    assert jobs(db) == [(outbox.PENDING, 1)] * 2
    assert resources(client, "ImagingStudy") == []
    with db.transaction() as session:  # the lease runs out
        session.execute(update(OutboxRow).values(available_at=dates.now() - timedelta(seconds=1)))
    assert survivor.run_once() == 2
    assert jobs(db) == [(outbox.DONE, 2)] * 2
    assert [status(client, o) for o in order_ids] == [IMAGES_AVAILABLE] * 2
    assert len(resources(client, "ImagingStudy")) == 2
    assert survivor.run_once() == 0


def test_after_a_restart_the_server_links_what_was_ordered_while_it_was_down(client, db, tmp_path: Path):
    port = free_port()  # our Storage SCP's, known to the PACS as the C-MOVE destination OVERREAD
    with SamplePacs(destinations={"OVERREAD": ("127.0.0.1", port)}) as pacs:
        settings = Settings(database_url=db.url, dicom_port=port, image_store=tmp_path / "images")
        cfg = OverreadConfig(
            pacs=[peer(pacs, "c-move")],
            linking=Linking(first_retry_seconds=0, max_attempts=3, timeout_seconds=5, issuers=ISSUERS),
        )
        store = ImageStore(settings.image_store)
        first = order(client, DEMO_ACCESSION)  # before the server side ever ran
        with imaging(settings, for_database(db), cfg):
            wait_until(lambda: status(client, first) == IMAGES_AVAILABLE)
        second = order(client, "ACC-SAMPLE-MR")  # while it is down
        assert status(client, second) is None and jobs(db)[-1] == (outbox.PENDING, 0)
        with imaging(settings, for_database(db), cfg):  # started again
            wait_until(lambda: status(client, second) == IMAGES_AVAILABLE)
    assert jobs(db) == [(outbox.DONE, 1)] * 2  # no job lost or added by the restart
    for accession in (DEMO_ACCESSION, "ACC-SAMPLE-MR"):
        uid, instances = STUDIES[accession]
        assert store.count(uid) == instances  # C-MOVEd to the Storage SCP the server runs
    assert len(resources(client, "ImagingStudy")) == 2
    assert len(resources(client, "Endpoint")) == 1  # published at each start, created once


def test_threads_storing_the_same_instance_at_once_leave_one_whole_file(tmp_path: Path):
    """The Storage SCP's associations run on threads of their own; a push and a C-MOVE may
    bring the same instance at once. Every write succeeds and one complete file stays."""
    store = ImageStore(tmp_path / "images")
    ds = dcmread(sample_path("CT_small.dcm"))
    part10 = sample_path("CT_small.dcm").read_bytes()
    uids = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    failures: list[BaseException] = []
    start = threading.Barrier(3)

    def put() -> None:
        start.wait(timeout=10)
        for _ in range(40):
            try:
                store.write(*uids, part10)
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=put) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert failures == []
    files = [p for p in (tmp_path / "images").rglob("*") if p.is_file() and ".index" not in p.parts]
    (path,) = files  # no .part left behind
    assert dcmread(path).PixelData == ds.PixelData
