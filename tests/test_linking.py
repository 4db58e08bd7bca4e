"""Image linking end to end on real sockets: orders in, the worker queries a PACS (the bundled
sample PACS, a pynetdicom SCP), links the ImagingStudy, retrieves, and the Task tells where
the case stands. Runs on SQLite and PostgreSQL. The same against Orthanc: test_linking_orthanc.py.
"""

import copy
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import select

from cases.patient_match import MatchRule
from cases.task import IMAGES_AVAILABLE, IMAGES_NOT_FOUND, IMAGES_PENDING
from dicom_bridge.image_store import ImageStore
from dicom_bridge.linking import Linker, Source, order_query
from dicom_bridge.query import StudyQuery, missing
from dicom_bridge.sample_pacs import DEMO_ACCESSION, DEMO_PATIENT, SAMPLE_ISSUER, SamplePacs, sample_path
from dicom_bridge.storage_scp import StorageScp
from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.outbox import Backoff
from fhir_server.schema import OutboxRow
from mappings.imaging_study import Series, Study
from overread.app import default_hooks
from overread.config import PacsPeer
from testbed.ports import free_port
from tests.builders import MRN_SYSTEM, patient, service_request

CT_STUDY = str(dcmread(sample_path("CT_small.dcm"), stop_before_pixels=True).StudyInstanceUID)
NOW = Backoff(max_attempts=3, first_delay=timedelta(0))
#: The sample studies' issuer is our test MRN system: an order's patient with the study's PatientID matches.
RULE = MatchRule(issuers={SAMPLE_ISSUER: MRN_SYSTEM})


@dataclass
class Env:
    client: TestClient
    db: Database
    store: ImageStore
    pacs: SamplePacs
    scp: StorageScp

    def linker(self, retrieve: str = "none", port: int | None = None, backoff: Backoff = NOW) -> Linker:
        peer = PacsPeer(name="main", ae_title=self.pacs.ae_title, host="127.0.0.1", port=port or self.pacs.port)
        peer.retrieve = retrieve  # type: ignore[assignment]
        sources = [
            Source("main", self.store, peer, "OVERREAD", rule=RULE),
            Source("image store", self.store, rule=RULE),
        ]
        linker = Linker(for_database(self.db), sources, backoff, default_hooks())
        linker.publish_endpoints()
        self.scp.on_received = linker.wake
        return linker

    def order(self, accession: str = DEMO_ACCESSION, mrn: str = DEMO_PATIENT, **extra) -> str:
        pid = self.client.post("/fhir/Patient", json=patient(mrn)).json()["id"]
        response = self.client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{pid}", accession, **extra))
        assert response.status_code == 201, response.text
        return response.json()["id"]

    def case(self, order_id: str) -> dict:
        (entry,) = self.client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"]
        return entry["resource"]

    def status(self, order_id: str) -> str:
        return self.case(order_id)["businessStatus"]["coding"][0]["code"]

    def studies(self) -> list[dict]:
        return [e["resource"] for e in self.client.get("/fhir/ImagingStudy").json().get("entry", [])]

    def jobs(self) -> list[tuple[str, int]]:
        with self.db.transaction() as session:
            return [(r.status, r.attempts) for r in session.scalars(select(OutboxRow).order_by(OutboxRow.pk))]


@pytest.fixture
def env(client, db, tmp_path: Path):
    store = ImageStore(tmp_path / "images")
    with StorageScp("OVERREAD", "127.0.0.1", 0, store) as scp, SamplePacs() as pacs:
        pacs.destinations["OVERREAD"] = ("127.0.0.1", scp.port)
        yield Env(client, db, store, pacs, scp)


def test_an_order_gets_its_imaging_study_from_the_pacs(env):
    order_id = env.order()
    assert env.linker().run_once() == 1
    (study,) = env.studies()
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{CT_STUDY}"}
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}]
    assert study["subject"] == env.case(order_id)["for"]
    assert (study["numberOfSeries"], study["numberOfInstances"], study["modality"][0]["code"]) == (1, 1, "CT")
    endpoint = env.client.get(f"/fhir/{study['endpoint'][0]['reference']}").json()
    assert endpoint["address"] == f"dicom://SAMPLEPACS@127.0.0.1:{env.pacs.port}"
    assert env.status(order_id) == IMAGES_AVAILABLE
    assert env.jobs() == [("done", 1)]
    assert env.store.count(CT_STUDY) == 0  # retrieve: none


@pytest.mark.parametrize("method", ["c-move", "c-get"])
def test_retrieve_brings_every_instance_into_the_image_store(env, method):
    order_id = env.order("ACC-SAMPLE-MR", mrn="4MR1")
    env.linker(method).run_once()
    (study,) = env.studies()
    assert study["numberOfSeries"] == 2
    assert env.store.count(study["identifier"][0]["value"].removeprefix("urn:oid:")) == study["numberOfInstances"] == 2
    assert env.status(order_id) == IMAGES_AVAILABLE
    assert env.jobs() == [("done", 1)]


def test_two_orders_for_one_study_share_one_imaging_study(env):
    first, second = env.order(), env.order()
    env.linker().run_once()
    (study,) = env.studies()
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{first}"}, {"reference": f"ServiceRequest/{second}"}]
    assert env.linker().run_once() == 0  # nothing left to do; relinking changes nothing
    assert env.status(first) == env.status(second) == IMAGES_AVAILABLE


def test_a_pacs_that_is_down_means_retry_then_linked_when_it_is_back(env):
    order_id = env.order()
    down = env.linker(port=free_port(), backoff=Backoff(max_attempts=5, first_delay=timedelta(hours=1)))
    down.sources.pop()  # the image store would not have it either
    assert down.run_once() == 1
    case = env.case(order_id)
    assert case["businessStatus"]["coding"][0]["code"] == IMAGES_PENDING
    assert "did not answer" in case["statusReason"]["text"]
    assert down.run_once() == 0  # backing off
    with env.db.transaction() as session:  # time passes
        session.execute(OutboxRow.__table__.update().values(available_at=OutboxRow.created_at))
    assert env.linker().run_once() == 1
    assert env.status(order_id) == IMAGES_AVAILABLE
    assert "statusReason" not in env.case(order_id)


def test_a_study_arriving_late_is_linked_on_a_later_attempt(env):
    order_id = env.order("ACC-LATE")
    linker = env.linker()
    linker.run_once()
    assert env.status(order_id) == IMAGES_PENDING and env.studies() == []
    assert env.case(order_id)["statusReason"]["text"] == (
        'No study on PACS "main" or in the image store matches AccessionNumber=ACC-LATE.'
    )
    env.pacs.add(new_study("ACC-LATE"))
    linker.run_once()
    assert env.status(order_id) == IMAGES_AVAILABLE and len(env.studies()) == 1


def test_the_job_gives_up_after_its_limit_with_a_final_status(env):
    order_id = env.order("ACC-NEVER")
    linker = env.linker()
    for _ in range(3):
        linker.run_once()
    assert env.status(order_id) == IMAGES_NOT_FOUND
    assert env.jobs() == [("dead", 3)]
    assert linker.run_once() == 0


def test_an_unknown_move_destination_is_a_clear_reason_and_the_study_stays_linked(env):
    del env.pacs.destinations["OVERREAD"]
    order_id = env.order()
    env.linker("c-move").run_once()
    case = env.case(order_id)
    assert case["businessStatus"]["coding"][0]["code"] == IMAGES_PENDING
    assert "0xA801" in case["statusReason"]["text"]
    assert len(env.studies()) == 1  # the radiologist can already open it on the PACS


def test_a_pushed_study_links_the_waiting_case(env, tmp_path):
    order_id = env.order("ACC-PUSHED")
    linker = env.linker(backoff=Backoff(max_attempts=5, first_delay=timedelta(hours=1)))
    linker.run_once()
    assert env.status(order_id) == IMAGES_PENDING
    pushed = new_study("ACC-PUSHED")
    pushed.save_as(tmp_path / "pushed.dcm")
    _storescu(env.scp.port, tmp_path / "pushed.dcm")
    # Woken when the association ends (the SCP's thread may finish after storescu), not after the hour.
    deadline = time.monotonic() + 10
    while not linker.run_once():
        assert time.monotonic() < deadline, "the pushed study did not wake the job"
        time.sleep(0.05)
    assert env.status(order_id) == IMAGES_AVAILABLE
    (study,) = env.studies()
    assert study["identifier"][0]["value"] == f"urn:oid:{pushed.StudyInstanceUID}"
    assert "endpoint" not in study  # found in our own image store


def test_a_revoked_order_is_not_linked(env):
    order_id = env.order()
    order = env.client.get(f"/fhir/ServiceRequest/{order_id}").json()
    env.client.put(f"/fhir/ServiceRequest/{order_id}", json={**order, "status": "revoked"})
    env.linker().run_once()
    assert env.studies() == [] and env.jobs() == [("done", 1)]


def test_link_imaging_operation_runs_the_job_again(env):
    order_id = env.order("ACC-LATER")
    linker = env.linker(backoff=Backoff(max_attempts=1))
    linker.run_once()
    assert env.status(order_id) == IMAGES_NOT_FOUND
    env.pacs.add(new_study("ACC-LATER"))
    response = env.client.post(f"/fhir/ServiceRequest/{order_id}/$link-imaging")
    assert response.status_code == 202 and response.json()["resourceType"] == "OperationOutcome"
    assert env.status(order_id) == IMAGES_PENDING
    linker.run_once()
    assert env.status(order_id) == IMAGES_AVAILABLE


def test_link_imaging_refuses_what_it_cannot_do(client):
    assert client.post("/fhir/ServiceRequest/nope/$link-imaging").status_code == 404
    assert client.post("/fhir/Patient/p/$link-imaging").status_code == 404
    assert client.get("/fhir/ServiceRequest/x/$link-imaging").status_code == 405
    ops = [r for r in client.get("/fhir/metadata").json()["rest"][0]["resource"] if r["type"] == "ServiceRequest"]
    assert ops[0]["operation"][0]["name"] == "link-imaging"


def new_study(accession: str) -> Dataset:
    """A study no PACS has yet: pydicom's MR_small with new UIDs and ``accession``, of the orders' patient."""
    ds = dcmread(sample_path("MR_small.dcm"))
    ds.PatientID, ds.IssuerOfPatientID = DEMO_PATIENT, SAMPLE_ISSUER
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = accession
    return ds


def _storescu(port: int, path: Path) -> None:
    import subprocess

    subprocess.run(["storescu", "-aec", "OVERREAD", "127.0.0.1", str(port), str(path)], check=True, timeout=30)


def test_a_pacs_answer_that_cannot_be_mapped_is_a_retry_with_the_reason(env):
    broken = new_study("ACC-BROKEN")
    del broken.Modality  # ImagingStudy.series.modality is required: the mapping refuses it
    env.pacs.add(broken)
    order_id = env.order("ACC-BROKEN")
    env.linker().run_once()
    case = env.case(order_id)
    assert case["businessStatus"]["coding"][0]["code"] == IMAGES_PENDING
    assert case["statusReason"]["text"].startswith("Linking failed: ValueError: a series-level answer lacks")
    assert env.jobs() == [("pending", 1)] and env.studies() == []


def test_an_answer_short_of_its_own_counts_is_not_the_study():
    study = Dataset()
    study.StudyInstanceUID, study.NumberOfStudyRelatedSeries = "1.2.3", 2
    series = Dataset()
    series.SeriesInstanceUID, series.NumberOfSeriesRelatedInstances = "1.2.3.1", 3
    assert missing(Study(study, [])) == "1.2.3: 0 of 2 series answered"
    study.NumberOfStudyRelatedSeries = 1
    assert missing(Study(study, [Series(series, [Dataset()])])) == "1.2.3: 1 of 3 instances of series 1.2.3.1"
    assert missing(Study(study, [Series(series, [Dataset()] * 3)])) is None


def test_the_image_store_takes_no_path_for_a_uid(tmp_path):
    store = ImageStore(tmp_path / "images")
    (tmp_path / "images").mkdir()
    outside = tmp_path / "elsewhere" / "1.2" / "1.2.3.dcm"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"")
    for bad in ("..", "../elsewhere", "1..2", ".1", "1²", "1" * 65):
        with pytest.raises(ValueError):
            store.path(bad, "1.2", "1.2.3")
        assert store.count(bad) == 0
    assert store.find(StudyQuery(study_uid="../elsewhere")) == []  # an order's identifier is not a path
    assert store.path("1.2.840", "1.2", "1.2.3") == tmp_path / "images" / "1.2.840" / "1.2" / "1.2.3.dcm"


def test_a_job_finished_by_another_run_is_not_undone(env):
    # A lease that ran out mid-retrieve (or a push that woke the job) lets two runs share a job:
    # the one that finishes second must neither revive nor kill the row, nor unlink the case.
    order_id = env.order()
    linker = env.linker(backoff=Backoff(max_attempts=1))
    assert linker.run_once() == 1
    with env.db.transaction() as session:
        (pk,) = session.scalars(select(OutboxRow.pk))
    linker._retry(pk, order_id, "the late run failed")
    assert env.jobs() == [("done", 1)]
    assert env.status(order_id) == IMAGES_AVAILABLE and "statusReason" not in env.case(order_id)


def test_close_closes_the_dicomweb_client(env):
    peer = PacsPeer(name="web", ae_title="WEB", host="127.0.0.1", port=1, qido_url="http://127.0.0.1:1/dicom-web")
    linker = Linker(
        for_database(env.db), [Source("web", env.store, peer, "OVERREAD"), Source("image store", env.store)]
    )
    linker.close()
    assert linker.sources[0].web is not None and linker.sources[0].web.http.is_closed


def test_a_push_while_the_job_runs_is_not_undone_by_its_backoff(env):
    order_id = env.order("ACC-WOKEN")
    linker = env.linker(backoff=Backoff(max_attempts=5, first_delay=timedelta(hours=1)))
    pacs_find = linker.sources[0].find

    def find_then_pushed(query):  # the study arrives by C-STORE just after the PACS said "none"
        found = pacs_find(query)
        env.pacs.add(new_study("ACC-WOKEN"))
        linker.wake({("1.2.3", "ACC-WOKEN")})
        return found

    linker.sources[0].find = find_then_pushed  # type: ignore[method-assign]
    assert linker.run_once() == 1 and env.status(order_id) == IMAGES_PENDING
    linker.sources[0].find = pacs_find  # type: ignore[method-assign]
    assert linker.run_once() == 1  # due at once, not in an hour
    assert env.status(order_id) == IMAGES_AVAILABLE


def test_the_image_store_finds_studies_by_accession_and_by_patient(tmp_path):
    store = ImageStore(tmp_path)
    template = dcmread(str(get_testdata_file("CT_small.dcm")), stop_before_pixels=True)

    def add(into: ImageStore, accession: str, patient_id: str, study: str, instances: int) -> None:
        for n in range(instances):
            ds = copy.deepcopy(template)
            ds.AccessionNumber, ds.PatientID, ds.StudyInstanceUID = accession, patient_id, study
            ds.SeriesInstanceUID, ds.SOPInstanceUID = f"{study}.1", f"{study}.1.{n}"
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            into.write(study, f"{study}.1", f"{study}.1.{n}", buffer.getvalue())

    add(store, "ACC-1", "P1", "1.2.3.1", 3)
    add(store, "ACC-2", "P2", "1.2.3.2", 2)
    (tmp_path / "lost+found").mkdir()  # not a study: left alone
    [found] = store.find(StudyQuery(accession="ACC-2"))
    assert found.uid == "1.2.3.2" and sum(len(s.instances) for s in found.series) == 2
    [found] = store.find(StudyQuery(patient_id="P1"))
    assert found.uid == "1.2.3.1" and sum(len(s.instances) for s in found.series) == 3
    assert store.find(StudyQuery(accession="ACC-3")) == []
    # the index names the studies of a key: a query reads those, not one file of every study
    assert sorted(p.name for p in (tmp_path / ".index" / "accession").iterdir()) == [b"ACC-1".hex(), b"ACC-2".hex()]
    # an entry whose study never arrived (a crash between the two) is skipped
    (tmp_path / ".index" / "accession" / b"ACC-9".hex()).mkdir()
    (tmp_path / ".index" / "accession" / b"ACC-9".hex() / "1.2.3.9").touch()
    assert store.find(StudyQuery(accession="ACC-9")) == []
    # a store from before the index, or whose indexing a crash cut short, is indexed on its next query
    shutil.rmtree(tmp_path / ".index")
    (tmp_path / ".index" / "accession").mkdir(parents=True)
    [found] = store.find(StudyQuery(accession="ACC-1"))
    assert found.uid == "1.2.3.1" and (tmp_path / ".index" / "patient" / b"P2".hex() / "1.2.3.2").exists()
    assert (tmp_path / ".index" / "built").exists()


def test_the_pacs_query_takes_a_modality_sent_apart_from_the_procedure_code():
    dcm = "http://dicom.nema.org/resources/ontology/DCM"
    order = {
        "code": {"coding": [{"system": "http://loinc.org", "code": "36643-5"}]},
        "orderDetail": [{"coding": [{"system": dcm, "code": "CT"}]}],  # IPC-5 (mappings.imaging_procedure)
    }
    assert order_query(order, None).modality == "CT"
    assert order_query({**order, "code": {"coding": [{"system": dcm, "code": "MR"}]}}, None).modality == "MR"
