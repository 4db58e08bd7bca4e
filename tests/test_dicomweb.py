"""QIDO-RS and WADO-RS (dicom_bridge.dicomweb) against a real Orthanc and its DICOMweb plugin."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from dicom_bridge.dicomweb import DicomWebClient, parts
from dicom_bridge.errors import PacsError, PacsUnavailable, RetrieveFailed
from dicom_bridge.image_store import ImageStore
from dicom_bridge.query import StudyQuery
from testbed.orthanc import Orthanc

pytestmark = pytest.mark.orthanc

PATIENT = "OVR-P1"
CT_ACCESSION, MR_ACCESSION = "ACC-CT-1", "ACC-MR-1"


def study(folder: Path, source: str, accession: str, date: str, series_sizes: list[int]) -> tuple[str, list[Path]]:
    """Copies of a pydicom test file as one study of ``series_sizes`` instances per series."""
    study_uid, files = generate_uid(), []
    for number, size in enumerate(series_sizes, start=1):
        series_uid = generate_uid()
        for instance in range(1, size + 1):
            ds = pydicom.dcmread(str(get_testdata_file(source)))
            ds.PatientID, ds.AccessionNumber, ds.StudyDate = PATIENT, accession, date
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, number
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = instance
            files.append(folder / f"{ds.SOPInstanceUID}.dcm")
            ds.save_as(files[-1])
    return study_uid, files


@pytest.fixture(scope="module")
def studies(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CT study (two series: 2 + 1 instances) and an MR study (1 instance) of one patient."""
    folder = tmp_path_factory.mktemp("dicom")
    ct, ct_files = study(folder, "CT_small.dcm", CT_ACCESSION, "20260105", [2, 1])
    mr, mr_files = study(folder, "MR_small.dcm", MR_ACCESSION, "20260210", [1])
    orthanc.start()
    orthanc.clear()
    orthanc.load(ct_files + mr_files)
    return {"CT": ct, "MR": mr}


@pytest.fixture
def client(orthanc: Orthanc, studies: dict[str, str]) -> Iterator[DicomWebClient]:
    orthanc.start()
    with DicomWebClient(orthanc.qido_url) as web:
        yield web


def uids(found: list) -> set[str]:
    return {s.uid for s in found}


def test_find_by_accession_builds_the_tree(client, studies):
    [found] = client.find(StudyQuery(accession=CT_ACCESSION))
    assert found.uid == studies["CT"]
    assert found.dataset.AccessionNumber == CT_ACCESSION
    assert found.dataset.NumberOfStudyRelatedInstances == 3
    assert sorted(len(s.instances) for s in found.series) == [1, 2]
    assert sorted(s.dataset.SeriesNumber for s in found.series) == [1, 2]
    for series in found.series:
        assert series.dataset.Modality == "CT"
        assert {i.SeriesInstanceUID for i in series.instances} == {series.dataset.SeriesInstanceUID}
        assert all(i.SOPClassUID == pydicom.uid.CTImageStorage for i in series.instances)


def test_find_by_study_uid(client, studies):
    [found] = client.find(StudyQuery(study_uid=studies["MR"]))
    assert found.dataset.AccessionNumber == MR_ACCESSION
    assert [len(s.instances) for s in found.series] == [1]


@pytest.mark.parametrize(
    ("date", "modality", "expected"),
    [
        ("20260105", "CT", {"CT"}),
        ("20260101-20260131", "", {"CT"}),
        ("20260101-20260228", "MR", {"MR"}),
        ("", "", {"CT", "MR"}),
    ],
)
def test_find_by_patient_date_and_modality(client, studies, date, modality, expected):
    found = client.find(StudyQuery(patient_id=PATIENT, study_date=date, modality=modality))
    assert uids(found) == {studies[m] for m in expected}


@pytest.mark.parametrize(
    "query",
    [StudyQuery(accession="NO-SUCH"), StudyQuery(study_uid="1.2.3.4"), StudyQuery(patient_id=PATIENT, modality="US")],
)
def test_no_match_is_an_empty_list(client, query):
    assert client.find(query) == []


def test_an_empty_query_is_refused(client):
    with pytest.raises(ValueError):
        client.find(StudyQuery())


def test_retrieve_stores_every_instance(client, studies, tmp_path):
    store = ImageStore(tmp_path)
    [found] = client.find(StudyQuery(accession=CT_ACCESSION))
    assert client.retrieve(found.uid, store) == found.dataset.NumberOfStudyRelatedInstances == 3
    assert store.count(found.uid) == 3
    on_disk = {pydicom.dcmread(p).SOPInstanceUID for p in tmp_path.glob("*/*/*.dcm")}
    assert on_disk == {i.SOPInstanceUID for s in found.series for i in s.instances}


def test_retrieve_of_an_unknown_study_fails(client, tmp_path):
    with pytest.raises(RetrieveFailed):
        client.retrieve("1.2.3.4", ImageStore(tmp_path))


def test_a_pacs_down_is_unavailable_then_back(orthanc, client, tmp_path):
    orthanc.kill()
    try:
        with pytest.raises(PacsUnavailable):
            client.find(StudyQuery(accession=CT_ACCESSION))
        with pytest.raises(PacsUnavailable):
            client.retrieve("1.2.3.4", ImageStore(tmp_path))
    finally:
        orthanc.start()
    assert len(client.find(StudyQuery(accession=CT_ACCESSION))) == 1


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_multipart_parts_in_any_chunking(size):
    body = (
        b"preamble\r\n--b1\r\nContent-Type: application/dicom\r\n\r\nfirst"
        b"\r\n--b1\r\n\r\n\r\n--x--"  # a part with no headers, whose body looks a little like a delimiter
        b"\r\n--b1--\r\nepilogue"
    )
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    assert list(parts(chunks, b"b1")) == [b"first", b"\r\n--x--"]


def test_a_cut_multipart_body_fails():
    with pytest.raises(RetrieveFailed):
        list(parts([b"--b1\r\n\r\nfirst\r\n--b1\r\n\r\nhalf an inst"], b"b1"))


@pytest.mark.parametrize("uid", ["..", "1..2", "1²", "1" * 65, ""])
def test_retrieve_refuses_what_is_not_a_uid(uid, tmp_path):
    with DicomWebClient("http://127.0.0.1:1/dicom-web") as web, pytest.raises(PacsError):
        web.retrieve(uid, ImageStore(tmp_path))
