"""Patient reconciliation before linking, and honest linking status, on real sockets: the bundled
sample PACS (a pynetdicom SCP), our Storage SCP fed by DCMTK's storescu, the FHIR API, on SQLite
and PostgreSQL. The same against Orthanc: test_linking_orthanc.py.

Two studies share accession ACC-TWIN: the order's patient's (MRN with a mapped issuer) and another
patient's of the same name (another issuer, another birth date).
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from cases.patient_match import MatchRule
from cases.task import (
    CASE_STATUS,
    CASE_STATUS_DISPLAY,
    IMAGES_AVAILABLE,
    IMAGES_MISMATCH,
    IMAGES_NOT_FOUND,
    IMAGES_PENDING,
    PACS_UNREACHABLE,
)
from dicom_bridge.image_store import ImageStore
from dicom_bridge.linking import Linker, Source
from dicom_bridge.sample_pacs import SamplePacs, sample_path
from dicom_bridge.storage_scp import StorageScp
from fhir_server import profiles
from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.outbox import Backoff
from fhir_server.schema import OutboxRow
from overread.app import default_hooks
from overread.config import PacsPeer
from testbed.ports import free_port
from tests.builders import MRN_SYSTEM, patient, service_request

NOW = Backoff(max_attempts=2, first_delay=timedelta(0))
LATER = Backoff(max_attempts=5, first_delay=timedelta(hours=1))
OTHER_SYSTEM = "urn:oid:1.2.3.4.5"
RULE = MatchRule(issuers={"STOLAV": MRN_SYSTEM, "OTHER-SITE": OTHER_SYSTEM})
#: The order's patient (tests.builders.patient) as the PACS knows her ...
OURS = {
    "PatientID": "MRN-100234",
    "IssuerOfPatientID": "STOLAV",
    "PatientName": "HAUGEN^INGRID",
    "PatientBirthDate": "19610417",
    "PatientSex": "F",
}
#: ... and another patient of the same name, at another site.
THEIRS = {**OURS, "PatientID": "55501", "IssuerOfPatientID": "OTHER-SITE", "PatientBirthDate": "19700101"}


def study(accession: str, who: dict[str, str]) -> Dataset:
    """pydicom's CT_small as a new study of ``who`` with ``accession``."""
    ds = dcmread(sample_path("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    del ds.OtherPatientIDsSequence  # CT_small's own (ABCD1234, 1234ABCD) would only add noise to the reasons
    ds.AccessionNumber = accession
    for keyword, value in who.items():
        setattr(ds, keyword, value)
    return ds


@dataclass
class Env:
    client: TestClient
    db: Database
    store: ImageStore
    pacs: SamplePacs
    scp: StorageScp
    woken: threading.Event = field(default_factory=threading.Event)

    def linker(self, port: int | None = None, backoff: Backoff = NOW, retrieve: str = "none") -> Linker:
        peer = PacsPeer(name="main", ae_title=self.pacs.ae_title, host="127.0.0.1", port=port or self.pacs.port)
        peer.retrieve = retrieve  # type: ignore[assignment]
        sources = [Source("main", self.store, peer, "OVERREAD", 5, RULE), Source("image store", self.store, rule=RULE)]
        linker = Linker(for_database(self.db), sources, backoff, default_hooks())
        linker.publish_endpoints()

        def wake(studies: set[tuple[str, str]]) -> None:
            linker.wake(studies)
            self.woken.set()

        self.scp.on_received = wake
        return linker

    def order(self, accession: str, **who: Any) -> str:
        pid = self.client.post("/fhir/Patient", json=patient(**who)).json()["id"]
        response = self.client.post("/fhir/ServiceRequest", json=service_request(f"Patient/{pid}", accession))
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def case(self, order_id: str) -> dict[str, Any]:
        (entry,) = self.client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"]
        return dict(entry["resource"])

    def status(self, order_id: str) -> str:
        return str(self.case(order_id)["businessStatus"]["coding"][0]["code"])

    def reason(self, order_id: str) -> str:
        return str(self.case(order_id).get("statusReason", {}).get("text", ""))

    def all(self, resource_type: str) -> list[dict[str, Any]]:
        return [e["resource"] for e in self.client.get(f"/fhir/{resource_type}").json().get("entry", [])]

    def linked_uids(self, order_id: str) -> list[str]:
        found = self.client.get("/fhir/ImagingStudy", params={"basedon": f"ServiceRequest/{order_id}"}).json()
        return [e["resource"]["identifier"][0]["value"].removeprefix("urn:oid:") for e in found.get("entry", [])]

    def jobs(self) -> list[tuple[str, int]]:
        with self.db.transaction() as session:
            return [(r.status, r.attempts) for r in session.scalars(select(OutboxRow).order_by(OutboxRow.pk))]

    def confirm(self, order_id: str, *parameters: dict[str, Any]) -> Any:
        body = {"resourceType": "Parameters", "parameter": list(parameters)}
        return self.client.post(f"/fhir/ServiceRequest/{order_id}/$link-imaging", json=body)


@pytest.fixture
def env(client, db, tmp_path: Path) -> Iterator[Env]:
    store = ImageStore(tmp_path / "images")
    with StorageScp("OVERREAD", "127.0.0.1", 0, store) as scp, SamplePacs(files=[]) as pacs:
        pacs.destinations["OVERREAD"] = ("127.0.0.1", scp.port)
        yield Env(client, db, store, pacs, scp)


@pytest.fixture
def twins(env: Env) -> tuple[Dataset, Dataset]:
    """The PACS holds two ACC-TWIN studies: ours, and the other patient's."""
    return env.pacs.add(study("ACC-TWIN", OURS)), env.pacs.add(study("ACC-TWIN", THEIRS))


def test_an_order_links_only_its_own_patients_study(env, twins):
    ours, _ = twins
    order_id = env.order("ACC-TWIN")
    assert env.linker().run_once() == 1
    assert env.linked_uids(order_id) == [ours.StudyInstanceUID]
    assert len(env.all("ImagingStudy")) == 1
    assert env.status(order_id) == IMAGES_AVAILABLE and env.jobs() == [("done", 1)]


def test_an_order_whose_patient_matches_neither_study_is_a_mismatch_with_both_identities(env, twins):
    ours, theirs = twins
    order_id = env.order("ACC-TWIN", mrn="MRN-888", family="Doe", given="John", gender="male")
    assert env.linker().run_once() == 1
    assert env.status(order_id) == IMAGES_MISMATCH
    assert env.all("ImagingStudy") == []
    assert env.jobs() == [("dead", 1)]  # final at once: trying again finds the same studies
    patient_ref = env.case(order_id)["for"]["reference"]
    order_patient = (
        f"Patient={patient_ref}, identifier={MRN_SYSTEM}|MRN-888, name=Doe^John, birthDate=1961-04-17, gender=male"
    )
    assert env.reason(order_id) == (
        f'Study {ours.StudyInstanceUID} on PACS "main" is not linked: its patient (PatientID=MRN-100234, '
        "IssuerOfPatientID=STOLAV, PatientName=HAUGEN^INGRID, PatientBirthDate=19610417, PatientSex=F) does not "
        f"match the order's patient ({order_patient}); if it is the right study, confirm it with $link-imaging. "
        f'Study {theirs.StudyInstanceUID} on PACS "main" is not linked: its patient (PatientID=55501, '
        "IssuerOfPatientID=OTHER-SITE, PatientName=HAUGEN^INGRID, PatientBirthDate=19700101, PatientSex=F) does "
        f"not match the order's patient ({order_patient}); if it is the right study, confirm it with $link-imaging."
    )


def test_a_confirmed_study_is_linked_and_audited(env, twins):
    _, theirs = twins
    order_id = env.order("ACC-TWIN", mrn="MRN-888", family="Doe", given="John", gender="male")
    linker = env.linker()
    linker.run_once()
    assert env.status(order_id) == IMAGES_MISMATCH
    uid = {"name": "studyInstanceUid", "valueString": theirs.StudyInstanceUID}
    reason = {"name": "reason", "valueString": "Registered under the wrong MRN at the referring site; checked by phone"}
    operator = {"name": "operator", "valueReference": {"reference": "Practitioner/p1", "display": "Dr Maja Lindgren"}}
    assert env.confirm(order_id, uid, operator).status_code == 400  # no reason
    assert env.confirm(order_id, uid, reason).status_code == 400  # no operator
    assert env.confirm(order_id, uid, reason, {"name": "operator", "valueReference": {}}).status_code == 400
    assert env.confirm(order_id, reason, operator).status_code == 400  # no study
    assert env.all("AuditEvent?type=110110") == [] and env.status(order_id) == IMAGES_MISMATCH
    response = env.confirm(order_id, uid, reason, operator)
    assert response.status_code == 202, response.text
    assert env.status(order_id) == IMAGES_PENDING
    assert linker.run_once() == 1
    assert env.linked_uids(order_id) == [theirs.StudyInstanceUID]
    assert env.status(order_id) == IMAGES_AVAILABLE
    (audit,) = env.all("AuditEvent?type=110110")
    (imaging,) = env.all("ImagingStudy")
    assert audit["agent"] == [{"who": operator["valueReference"], "requestor": True}]
    assert audit["purposeOfEvent"] == [{"text": reason["valueString"]}]
    assert audit["type"]["code"] == "110110" and audit["action"] == "U"
    entities = {e["what"]["reference"]: e for e in audit["entity"]}
    assert set(entities) == {
        f"ServiceRequest/{order_id}",
        f"ImagingStudy/{imaging['id']}",
        env.case(order_id)["for"]["reference"],
    }
    detail = entities[f"ImagingStudy/{imaging['id']}"]["detail"][0]["valueString"]
    assert "PatientID=55501, IssuerOfPatientID=OTHER-SITE" in detail
    # Asked again, the confirmed study stays the order's; the other patient's is still not linked.
    assert env.client.post(f"/fhir/ServiceRequest/{order_id}/$link-imaging").status_code == 202
    assert linker.run_once() == 1
    assert env.linked_uids(order_id) == [theirs.StudyInstanceUID]
    assert env.status(order_id) == IMAGES_AVAILABLE and len(env.all("AuditEvent?type=110110")) == 1


def test_a_confirmed_link_whose_retrieve_is_retried_is_audited_once(env, twins):
    _, theirs = twins
    order_id = env.order("ACC-TWIN", mrn="MRN-888", family="Doe", given="John", gender="male")
    linker = env.linker(retrieve="c-move", backoff=Backoff(max_attempts=5, first_delay=timedelta(0)))
    linker.run_once()
    destination = env.pacs.destinations.pop("OVERREAD")  # the first retrieve fails (0xA801)
    uid = {"name": "studyInstanceUid", "valueString": theirs.StudyInstanceUID}
    reason = {"name": "reason", "valueString": "Same patient, other site's MRN"}
    assert env.confirm(order_id, uid, reason, {"name": "operator", "valueString": "Dr Lindgren"}).status_code == 202
    assert linker.run_once() == 1
    assert env.status(order_id) == IMAGES_PENDING and "0xA801" in env.reason(order_id)
    assert env.linked_uids(order_id) == [theirs.StudyInstanceUID]
    env.pacs.destinations["OVERREAD"] = destination
    assert linker.run_once() == 1
    assert env.status(order_id) == IMAGES_AVAILABLE
    assert env.store.count(theirs.StudyInstanceUID) == 1
    assert len(env.all("AuditEvent?type=110110")) == 1


def test_a_confirmation_may_name_the_imaging_study_resource(env, twins):
    ours, _ = twins
    linked = env.order("ACC-TWIN")
    other = env.order("ACC-TWIN", mrn="MRN-888", family="Doe", given="John", gender="male")
    linker = env.linker()
    assert linker.run_once() == 2
    assert env.status(other) == IMAGES_MISMATCH
    (imaging,) = env.all("ImagingStudy")
    reference = {"name": "imagingStudy", "valueReference": {"reference": f"ImagingStudy/{imaging['id']}"}}
    reason = {"name": "reason", "valueString": "Same patient, merged records"}
    assert env.confirm(other, {**reference, "valueReference": {"reference": "ImagingStudy/nope"}}).status_code == 400
    assert env.confirm(other, reference, reason, {"name": "operator", "valueString": "Dr Lindgren"}).status_code == 202
    assert linker.run_once() == 1
    assert env.linked_uids(other) == env.linked_uids(linked) == [ours.StudyInstanceUID]
    (audit,) = env.all("AuditEvent?type=110110")
    assert audit["agent"][0]["who"] == {"display": "Dr Lindgren"}


def test_a_pacs_that_refuses_connections_ends_unreachable_not_not_found(env):
    port = free_port()  # nothing listens there: connection refused
    order_id = env.order("ACC-TWIN")
    linker = env.linker(port=port)
    unreachable = f'Could not reach PACS "main": SAMPLEPACS at 127.0.0.1:{port} did not answer.'
    nowhere = "No study in the image store matches AccessionNumber=ACC-TWIN."
    assert linker.run_once() == 1
    assert env.status(order_id) == IMAGES_PENDING
    assert env.reason(order_id) == f"{unreachable} {nowhere}"
    assert linker.run_once() == 1  # NOW: due again at once; the second of two attempts
    assert env.status(order_id) == PACS_UNREACHABLE
    assert env.reason(order_id) == f"{unreachable} {nowhere}"
    assert env.jobs() == [("dead", 2)]


def test_a_pacs_that_answers_nothing_ends_not_found(env):
    order_id = env.order("ACC-NOWHERE")
    linker = env.linker()
    linker.run_once(), linker.run_once()
    assert env.status(order_id) == IMAGES_NOT_FOUND
    assert env.reason(order_id) == 'No study on PACS "main" or in the image store matches AccessionNumber=ACC-NOWHERE.'


def storescu(port: int, path: Path) -> None:
    subprocess.run(["storescu", "-aec", "OVERREAD", "127.0.0.1", str(port), str(path)], check=True, timeout=30)


def pushed(env: Env, linker: Linker, ds: Dataset, path: Path) -> None:
    """``ds`` sent to our Storage SCP by storescu; the job it wakes has run."""
    ds.save_as(path, enforce_file_format=True)
    env.woken.clear()
    storescu(env.scp.port, path)
    # The SCP wakes the cases when the association has ended, on its own thread: wait for that.
    assert env.woken.wait(10), "the pushed study did not wake the job"
    assert linker.run_once() == 1


def test_a_pushed_study_of_another_patient_is_not_linked_and_the_right_one_is(env, tmp_path):
    order_id = env.order("ACC-PUSH")
    linker = env.linker(backoff=LATER)
    linker.run_once()
    assert env.status(order_id) == IMAGES_PENDING
    theirs, ours = study("ACC-PUSH", THEIRS), study("ACC-PUSH", OURS)
    pushed(env, linker, theirs, tmp_path / "theirs.dcm")
    assert env.status(order_id) == IMAGES_MISMATCH and env.all("ImagingStudy") == []
    assert env.reason(order_id).startswith(f"Study {theirs.StudyInstanceUID} in the image store is not linked")
    assert "PatientID=55501, IssuerOfPatientID=OTHER-SITE" in env.reason(order_id)
    pushed(env, linker, ours, tmp_path / "ours.dcm")
    assert env.status(order_id) == IMAGES_AVAILABLE
    assert env.linked_uids(order_id) == [ours.StudyInstanceUID]


def test_the_case_status_codes_are_in_the_code_system():
    system = profiles.by_url()[CASE_STATUS]
    defined = {c["code"]: c["display"] for c in system["concept"]}
    assert {code: defined.get(code) for code in CASE_STATUS_DISPLAY} == CASE_STATUS_DISPLAY
    assert system["count"] == len(system["concept"])
    expansion = profiles.expand("https://overread.org/fhir/ValueSet/case-status")
    assert {(CASE_STATUS, IMAGES_MISMATCH), (CASE_STATUS, PACS_UNREACHABLE)} <= expansion
