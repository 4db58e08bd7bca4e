"""Image linking against a real PACS: Orthanc 1.10, loaded with DCMTK's storescu.

The scenarios of test_linking.py against an independent implementation, on SQLite and
PostgreSQL: orders posted over FHIR (by accession number, Study Instance UID, or patient id
+ date + modality), the real worker finding the study by C-FIND or QIDO-RS and retrieving it
by C-MOVE (to our own Storage SCP), C-GET or WADO-RS; a PACS down then up; a study arriving
late; two orders for one study; a C-MOVE destination the PACS does not know. Patient reconciliation:
two studies with one accession number for two patients, a study of another patient (not linked,
``images-mismatch``) confirmed by an operator with ``$link-imaging``, pushed studies (storescu to our
Storage SCP) of the right and of another patient, and a PACS that is down to the end
(``pacs-unreachable``).

Every sample's IssuerOfPatientID is the sample PACS's, mapped to the orders' MRN system, and each
order's patient has the sample's PatientID as MRN: the orders' patients match their studies.

Orthanc runs once for the module (only in a private network namespace: tests/run), loaded
with the samples by storescu, and is emptied and loaded again before a test whenever an
earlier one changed what it holds. Our Storage SCP also runs once for the module, so
that Orthanc can know it from the start (DicomModalities); each test gives it its own store.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Literal

import pytest
from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select, update

from cases.patient_match import MatchRule
from cases.task import IMAGES_AVAILABLE, IMAGES_MISMATCH, IMAGES_PENDING, PACS_UNREACHABLE
from dicom_bridge.image_store import ImageStore
from dicom_bridge.linking import DCM, Linker, Source
from dicom_bridge.sample_pacs import SAMPLE_ISSUER, sample_files, sample_path
from dicom_bridge.storage_scp import StorageScp
from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.outbox import Backoff
from fhir_server.schema import OutboxRow
from overread.app import default_hooks
from overread.config import PacsPeer
from testbed.orthanc import Modalities, Orthanc
from tests.builders import MRN_SYSTEM, patient, service_request
from tests.test_linking_patients import OTHER_SYSTEM, OURS, THEIRS  # the twin patients

pytestmark = pytest.mark.orthanc

OUR_AE = "OVERREAD"
NOW = Backoff(max_attempts=3, first_delay=timedelta(0))
LATER = Backoff(max_attempts=5, first_delay=timedelta(hours=1))
Retrieve = Literal["c-move", "c-get", "wado-rs", "none"]
RULE = MatchRule(issuers={SAMPLE_ISSUER: MRN_SYSTEM, "STOLAV": MRN_SYSTEM, "OTHER-SITE": OTHER_SYSTEM})
CT_PATIENT = "1CT1"  # CT_small's PatientID: the patient of every study made from it here


@dataclass(frozen=True)
class Sample:
    """A study as Part 10 files for Orthanc, and what a query must find of it."""

    uid: str
    accession: str
    patient_id: str
    date: str  # DA, YYYYMMDD
    modality: str
    series: dict[str, list[str]]  # Series Instance UID -> SOP Instance UIDs
    files: list[Path]

    @property
    def instances(self) -> int:
        return sum(len(sops) for sops in self.series.values())

    @classmethod
    def write(cls, folder: Path, datasets: Sequence[Dataset]) -> Sample:
        folder.mkdir(parents=True, exist_ok=True)
        series: dict[str, list[str]] = {}
        files = []
        for ds in datasets:
            series.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
            files.append(folder / f"{ds.SOPInstanceUID}.dcm")
            ds.save_as(files[-1], enforce_file_format=True)
        first = datasets[0]
        return cls(
            str(first.StudyInstanceUID),
            str(first.AccessionNumber),
            str(first.PatientID),
            str(first.StudyDate),
            str(first.Modality),
            series,
            files,
        )


@dataclass(frozen=True)
class Samples:
    ct: Sample  # CT_small as 3 instances of one series; accession ACC-CT
    mr: Sample  # MR_small and reportsi (the sample PACS's MR study): 2 series, MR and SR
    follow_up: Sample  # the CT patient again, another day: what the patient-id query must not find

    @property
    def files(self) -> list[Path]:
        return [*self.ct.files, *self.mr.files, *self.follow_up.files]


def renewed(ds: Dataset, *levels: str) -> Dataset:
    """``ds`` with new UIDs at ``levels`` (study, series, instance)."""
    for level in levels:
        keyword = {"study": "StudyInstanceUID", "series": "SeriesInstanceUID", "instance": "SOPInstanceUID"}[level]
        setattr(ds, keyword, generate_uid())
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def ct_small(**overrides: str) -> Dataset:
    ds = dcmread(sample_path("CT_small.dcm"))
    ds.IssuerOfPatientID = SAMPLE_ISSUER
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> Samples:
    folder = tmp_path_factory.mktemp("samples")
    ct = [renewed(ct_small(AccessionNumber="ACC-CT"), "instance") for _ in range(3)]
    mr = []
    for path, overrides in sample_files():
        if Path(str(path)).name in ("MR_small.dcm", "reportsi.dcm"):
            ds = dcmread(str(path))
            for keyword, value in overrides.items():
                setattr(ds, keyword, value)
            mr.append(ds)
    follow_up = renewed(ct_small(AccessionNumber="ACC-CT-FU", StudyDate="20050301"), "study", "series", "instance")
    return Samples(
        Sample.write(folder / "ct", ct), Sample.write(folder / "mr", mr), Sample.write(folder / "fu", [follow_up])
    )


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StorageScp]:
    """Our Storage SCP for the module: the C-MOVE destination Orthanc knows as OVERREAD."""
    with StorageScp(OUR_AE, "127.0.0.1", 0, ImageStore(tmp_path_factory.mktemp("no-test"))) as running:
        yield running


@pytest.fixture(scope="module")
def orthanc_modalities(scp: StorageScp) -> Modalities:
    return {"overread": [OUR_AE, "127.0.0.1", scp.port]}


@dataclass
class Env:
    client: TestClient
    db: Database
    store: ImageStore
    orthanc: Orthanc
    scp: StorageScp
    samples: Samples
    patients: dict[str, str] = field(default_factory=dict)  # MRN -> Patient id

    def linker(
        self, retrieve: Retrieve = "none", qido: bool = False, our_ae: str = OUR_AE, backoff: Backoff = NOW
    ) -> Linker:
        """The worker as ``overread serve`` wires it: Orthanc, then the image store."""
        o = self.orthanc
        peer = PacsPeer(
            name="orthanc",
            ae_title=o.aet,
            host=o.host,
            port=o.dicom_port,
            qido_url=o.qido_url if qido else None,
            retrieve=retrieve,
        )
        sources = [
            Source("orthanc", self.store, peer, our_ae, timeout=10, rule=RULE),
            Source("image store", self.store, rule=RULE),
        ]
        linker = Linker(for_database(self.db), sources, backoff, default_hooks())
        linker.publish_endpoints()
        self.scp.on_received = linker.wake
        return linker

    def order(self, accession: str | None = None, study_uid: str | None = None, **extra) -> str:
        """A ServiceRequest by accession (ACSN), by Study Instance UID, or else by patient id + date + modality."""
        samples = (self.samples.ct, self.samples.mr, self.samples.follow_up)
        ordered = (s.patient_id for s in samples if accession == s.accession or study_uid == s.uid)
        mrn = extra.pop("mrn", None) or next(ordered, CT_PATIENT)
        who = extra.pop("who", {})
        if mrn not in self.patients:
            self.patients[mrn] = self.client.post("/fhir/Patient", json=patient(mrn, **who)).json()["id"]
        pid = self.patients[mrn]
        request = service_request(f"Patient/{pid}", accession or "", **extra)
        if study_uid:
            request["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}]
        elif not accession:
            del request["identifier"]
        response = self.client.post("/fhir/ServiceRequest", json=request)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def patient_order(self, sample: Sample) -> str:
        """An order with neither accession nor Study Instance UID: the patient's MRN, a date, a DCM modality."""
        day = f"{sample.date[:4]}-{sample.date[4:6]}-{sample.date[6:]}"
        code = {"coding": [{"system": DCM, "code": sample.modality}]}
        return self.order(mrn=sample.patient_id, occurrenceDateTime=f"{day}T08:30:00+01:00", code=code)

    def case(self, order_id: str) -> dict:
        (entry,) = self.client.get("/fhir/Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"]
        return dict(entry["resource"])

    def status(self, order_id: str) -> str:
        return str(self.case(order_id)["businessStatus"]["coding"][0]["code"])

    def reason(self, order_id: str) -> str:
        return str(self.case(order_id).get("statusReason", {}).get("text", ""))

    def studies(self) -> list[dict]:
        return [e["resource"] for e in self.client.get("/fhir/ImagingStudy").json().get("entry", [])]

    def jobs(self) -> list[tuple[str, int]]:
        with self.db.transaction() as session:
            return [(r.status, r.attempts) for r in session.scalars(select(OutboxRow).order_by(OutboxRow.pk))]

    def due(self) -> None:
        """Time passes: every job is due again."""
        with self.db.transaction() as session:
            session.execute(update(OutboxRow).values(available_at=OutboxRow.created_at))

    def files(self, study_uid: str) -> dict[str, list[str]]:
        """What the image store holds of the study: Series Instance UID -> SOP Instance UIDs."""
        folder = self.store.root / study_uid
        found = sorted(folder.glob("*/*.dcm")) if folder.is_dir() else []
        tree: dict[str, list[str]] = {}
        for path in found:
            tree.setdefault(path.parent.name, []).append(path.stem)
        return tree


@pytest.fixture(scope="module")
def loaded_studies() -> list[str]:
    """Orthanc's ids of the studies the samples are, once loaded (filled by ``pacs``)."""
    return []


@pytest.fixture
def pacs(orthanc: Orthanc, samples: Samples, loaded_studies: list[str]) -> Orthanc:
    """The module's Orthanc, running and holding the samples and nothing else.

    Emptied and loaded again (storescu) only when a test changed what it holds: a load
    costs Orthanc ~0.6 s, most tests only read.
    """
    orthanc.start()
    if not loaded_studies or sorted(orthanc.studies()) != loaded_studies:
        orthanc.clear()
        orthanc.load(samples.files)
        loaded_studies[:] = sorted(orthanc.studies())
        assert len(loaded_studies) == 3
    return orthanc


@pytest.fixture
def env(client, db, pacs: Orthanc, scp: StorageScp, samples: Samples, tmp_path: Path) -> Iterator[Env]:
    store = ImageStore(tmp_path / "images")
    scp.store, scp.on_received = store, None
    try:
        yield Env(client, db, store, pacs, scp, samples)
    finally:
        scp.on_received = None


def assert_linked(env: Env, order_ids: list[str], sample: Sample, qido: bool = False) -> dict:
    """One ImagingStudy for the sample, based on the orders, every series and instance, endpoint Orthanc."""
    (study,) = env.studies()
    assert study["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{sample.uid}"}
    assert [i["value"] for i in study["identifier"][1:]] == [sample.accession]  # typed ACSN
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{o}"} for o in order_ids]
    assert study["subject"] == env.case(order_ids[0])["for"]
    assert (study["numberOfSeries"], study["numberOfInstances"]) == (len(sample.series), sample.instances)
    found = {s["uid"]: sorted(i["uid"] for i in s["instance"]) for s in study["series"]}
    assert found == {uid: sorted(sops) for uid, sops in sample.series.items()}
    (reference,) = study["endpoint"]
    endpoint = env.client.get(f"/fhir/{reference['reference']}").json()
    o = env.orthanc
    assert endpoint["address"] == (o.qido_url if qido else f"dicom://{o.aet}@{o.host}:{o.dicom_port}")
    for order_id in order_ids:
        assert env.status(order_id) == IMAGES_AVAILABLE
        assert "statusReason" not in env.case(order_id)
    return study


@pytest.mark.parametrize(
    ("find", "key", "retrieve", "which"),
    [
        pytest.param("c-find", "accession", "none", "ct", id="c-find-accession-no-retrieve"),
        pytest.param("c-find", "accession", "c-move", "mr", id="c-find-accession-c-move"),
        pytest.param("c-find", "study-uid", "c-get", "mr", id="c-find-study-uid-c-get"),
        pytest.param("c-find", "patient", "c-move", "ct", id="c-find-patient-c-move"),
        pytest.param("qido-rs", "accession", "wado-rs", "mr", id="qido-accession-wado-rs"),
        pytest.param("qido-rs", "study-uid", "none", "ct", id="qido-study-uid-no-retrieve"),
        pytest.param("qido-rs", "patient", "c-get", "ct", id="qido-patient-c-get"),
    ],
)
def test_an_order_is_linked_and_retrieved(env, find: str, key: str, retrieve: Retrieve, which: str):
    sample: Sample = getattr(env.samples, which)
    if key == "accession":
        order_id = env.order(sample.accession)
    elif key == "study-uid":
        order_id = env.order(study_uid=sample.uid)
    else:
        order_id = env.patient_order(sample)  # the follow-up CT of the same patient must not match
    qido = find == "qido-rs"
    assert env.linker(retrieve, qido=qido).run_once() == 1
    assert_linked(env, [order_id], sample, qido=qido)
    assert env.jobs() == [("done", 1)]
    if retrieve == "none":
        assert env.files(sample.uid) == {}
    else:
        assert env.store.count(sample.uid) == sample.instances
        assert env.files(sample.uid) == {uid: sorted(sops) for uid, sops in sample.series.items()}


def test_a_pacs_that_is_down_means_retry_then_linked_when_it_is_back(env):
    ct = env.samples.ct
    order_id = env.order(ct.accession)
    linker = env.linker("c-move", backoff=LATER)
    env.orthanc.kill()
    try:
        assert linker.run_once() == 1
        assert env.status(order_id) == IMAGES_PENDING
        assert "did not answer" in env.reason(order_id)
        assert env.studies() == [] and env.jobs() == [("pending", 1)]
        assert linker.run_once() == 0  # backing off
    finally:
        env.orthanc.start()  # same ports, storage and modalities
    env.due()
    assert linker.run_once() == 1
    assert_linked(env, [order_id], ct)
    assert env.jobs() == [("done", 2)]
    assert env.store.count(ct.uid) == ct.instances


def test_a_study_arriving_late_is_linked_on_a_later_attempt(env, tmp_path):
    order_id = env.order("ACC-LATE")
    linker = env.linker("c-move", qido=True, backoff=LATER)
    assert linker.run_once() == 1
    assert env.status(order_id) == IMAGES_PENDING and env.studies() == []
    assert env.reason(order_id) == 'No study on PACS "orthanc" or in the image store matches AccessionNumber=ACC-LATE.'
    late = Sample.write(
        tmp_path / "late", [renewed(ct_small(AccessionNumber="ACC-LATE"), "study", "series", "instance")]
    )
    env.orthanc.load(late.files)  # storescu, as a modality would
    assert linker.run_once() == 0  # not due yet
    env.due()
    assert linker.run_once() == 1
    assert_linked(env, [order_id], late, qido=True)
    assert env.jobs() == [("done", 2)]
    assert env.files(late.uid) == late.series


def test_two_orders_for_one_study_share_one_imaging_study(env):
    mr = env.samples.mr
    first, second = env.order(mr.accession), env.order(study_uid=mr.uid)
    linker = env.linker("c-move")
    assert linker.run_once() == 2
    assert_linked(env, [first, second], mr)
    assert env.jobs() == [("done", 1), ("done", 1)]
    assert env.store.count(mr.uid) == mr.instances  # moved twice, stored once
    assert linker.run_once() == 0
    (study,) = env.studies()
    assert study["meta"]["versionId"] == "2"  # created, then based on the second order too


def test_an_unknown_move_destination_is_a_failed_retrieve_and_the_study_stays_linked(env):
    ct = env.samples.ct
    order_id = env.order(ct.accession)
    assert "STRANGER" not in [m[0] for m in env.orthanc.modalities.values()]
    assert env.linker("c-move", our_ae="STRANGER").run_once() == 1
    assert env.status(order_id) == IMAGES_PENDING
    # Orthanc 1.10 does not answer 0xA801 (Refused: Move Destination unknown): its C-MOVE SCP turns
    # every exception of its move handler, "Unknown modality for AET" included, into 0xC000
    # (Failed: Unable to process; OrthancFramework MoveScp.cpp). The sample PACS answers 0xA801
    # (test_linking.py). Either way the reason names the failed C-MOVE and its status.
    assert env.reason(order_id) == (
        "C-MOVE to STRANGER failed: status 0xC000; does ORTHANC know STRANGER as a move destination?"
    )
    (study,) = env.studies()  # the radiologist can already open it on the PACS
    assert study["identifier"][0]["value"] == f"urn:oid:{ct.uid}"
    assert study["basedOn"] == [{"reference": f"ServiceRequest/{order_id}"}]
    assert study["numberOfInstances"] == ct.instances
    assert env.jobs() == [("pending", 1)]
    assert env.store.count(ct.uid) == 0


# -- patient reconciliation ------------------------------------------------------------


def twin(accession: str, who: dict[str, str], folder: Path) -> Sample:
    """CT_small as a new study of ``who`` with ``accession``, written for storescu."""
    ds = renewed(ct_small(AccessionNumber=accession, **who), "study", "series", "instance")
    del ds.OtherPatientIDsSequence  # CT_small's own would only add noise to the reasons
    return Sample.write(folder, [ds])


@pytest.fixture
def twins(env: Env, tmp_path: Path) -> tuple[Sample, Sample]:
    """Orthanc holds two ACC-TWIN studies as well: ours, and the other patient's."""
    ours, theirs = twin("ACC-TWIN", OURS, tmp_path / "ours"), twin("ACC-TWIN", THEIRS, tmp_path / "theirs")
    env.orthanc.load([*ours.files, *theirs.files])
    return ours, theirs


JOHN_DOE = {"family": "Doe", "given": "John", "gender": "male"}


def linked_uids(env: Env, order_id: str) -> list[str]:
    found = env.client.get("/fhir/ImagingStudy", params={"basedon": f"ServiceRequest/{order_id}"}).json()
    return [e["resource"]["identifier"][0]["value"].removeprefix("urn:oid:") for e in found.get("entry", [])]


@pytest.mark.parametrize("qido", [False, True], ids=["c-find", "qido-rs"])
def test_an_order_links_only_its_own_patients_study_of_a_shared_accession(env, twins, qido: bool):
    ours, _ = twins
    order_id = env.order("ACC-TWIN", mrn="MRN-100234")
    assert env.linker(qido=qido).run_once() == 1
    assert linked_uids(env, order_id) == [ours.uid]
    assert len(env.studies()) == 1
    assert env.status(order_id) == IMAGES_AVAILABLE and env.jobs() == [("done", 1)]


@pytest.mark.parametrize("qido", [False, True], ids=["c-find", "qido-rs"])
def test_an_order_whose_patient_matches_neither_study_is_a_mismatch_naming_both(env, twins, qido: bool):
    ours, theirs = twins
    order_id = env.order("ACC-TWIN", mrn="MRN-888", who=JOHN_DOE)
    assert env.linker(qido=qido).run_once() == 1
    assert env.status(order_id) == IMAGES_MISMATCH
    assert env.studies() == [] and env.jobs() == [("dead", 1)]
    reason = env.reason(order_id)
    order_patient = f"identifier={MRN_SYSTEM}|MRN-888, name=Doe^John, birthDate=1961-04-17, gender=male"
    for sample, who in ((ours, OURS), (theirs, THEIRS)):
        identity = ", ".join(f"{k}={v}" for k, v in who.items())
        assert f'Study {sample.uid} on PACS "orthanc" is not linked: its patient ({identity}) does not match' in reason
    assert reason.count(order_patient) == 2


def test_an_operator_confirms_a_study_of_another_patient_and_the_link_is_audited(env, twins):
    _, theirs = twins
    order_id = env.order("ACC-TWIN", mrn="MRN-888", who=JOHN_DOE)
    linker = env.linker("c-get")
    linker.run_once()
    assert env.status(order_id) == IMAGES_MISMATCH
    reason = "The referring site registered the study under its own MRN; confirmed with them by phone."
    body = {
        "resourceType": "Parameters",
        "parameter": [
            {"name": "studyInstanceUid", "valueString": theirs.uid},
            {"name": "reason", "valueString": reason},
            {"name": "operator", "valueReference": {"reference": "Practitioner/p1", "display": "Dr Maja Lindgren"}},
        ],
    }
    without_reason = {**body, "parameter": [body["parameter"][0], body["parameter"][2]]}
    assert env.client.post(f"/fhir/ServiceRequest/{order_id}/$link-imaging", json=without_reason).status_code == 400
    response = env.client.post(f"/fhir/ServiceRequest/{order_id}/$link-imaging", json=body)
    assert response.status_code == 202, response.text
    assert linker.run_once() == 1
    assert linked_uids(env, order_id) == [theirs.uid]
    assert env.status(order_id) == IMAGES_AVAILABLE
    assert env.store.count(theirs.uid) == theirs.instances  # retrieved as any linked study
    (study,) = env.studies()
    (audit,) = [e["resource"] for e in env.client.get("/fhir/AuditEvent?type=110110").json()["entry"]]
    assert audit["agent"] == [
        {"who": {"reference": "Practitioner/p1", "display": "Dr Maja Lindgren"}, "requestor": True}
    ]
    assert audit["purposeOfEvent"] == [{"text": reason}]
    what = {e["what"]["reference"]: e for e in audit["entity"]}
    assert set(what) == {
        f"ServiceRequest/{order_id}",
        f"ImagingStudy/{study['id']}",
        env.case(order_id)["for"]["reference"],
    }
    assert what[f"ImagingStudy/{study['id']}"]["description"] == f"Study {theirs.uid}"
    assert (
        "PatientID=55501, IssuerOfPatientID=OTHER-SITE"
        in what[f"ImagingStudy/{study['id']}"]["detail"][0]["valueString"]
    )


def test_pushed_studies_link_the_waiting_case_only_when_the_patient_matches(env, tmp_path):
    order_id = env.order("ACC-PUSHED", mrn="MRN-100234")
    linker = env.linker(backoff=LATER)
    woken = threading.Event()

    def wake(studies: set[tuple[str, str]]) -> None:
        linker.wake(studies)
        woken.set()

    env.scp.on_received = wake
    linker.run_once()
    assert env.status(order_id) == IMAGES_PENDING
    for who, status in ((THEIRS, IMAGES_MISMATCH), (OURS, IMAGES_AVAILABLE)):
        sample = twin("ACC-PUSHED", who, tmp_path / who["PatientID"])
        woken.clear()
        subprocess.run(
            ["storescu", "-aec", OUR_AE, "127.0.0.1", str(env.scp.port), *map(str, sample.files)],
            check=True,
            capture_output=True,
            timeout=30,
        )
        assert woken.wait(10), "the pushed study did not wake the case"  # the SCP's thread, after the release
        assert linker.run_once() == 1
        assert env.status(order_id) == status
    assert linked_uids(env, order_id) == [sample.uid]  # the second, ours
    assert len(env.studies()) == 1


def test_a_pacs_that_is_down_to_the_end_is_unreachable_not_not_found(env):
    ct = env.samples.ct
    order_id = env.order(ct.accession)
    linker = env.linker()
    env.orthanc.kill()
    try:
        runs = [linker.run_once() for _ in range(NOW.max_attempts)]
        assert runs == [1] * NOW.max_attempts
        assert env.status(order_id) == PACS_UNREACHABLE
        o = env.orthanc
        assert env.reason(order_id) == (
            f'Could not reach PACS "orthanc": {o.aet} at {o.host}:{o.dicom_port} did not answer. '
            f"No study in the image store matches AccessionNumber={ct.accession}."
        )
        assert env.jobs() == [("dead", NOW.max_attempts)] and env.studies() == []
    finally:
        env.orthanc.start()
