"""The Orthanc harness itself (tests/orthanc.py): up in the namespace, loads, finds, restarts."""

from __future__ import annotations

import subprocess

import httpx
import pydicom
import pytest
from pydicom.data import get_testdata_file

from testbed.orthanc import Orthanc, in_private_netns

pytestmark = pytest.mark.orthanc

FILES = [str(get_testdata_file("CT_small.dcm")), str(get_testdata_file("MR_small.dcm"))]


def findscu(orthanc: Orthanc, *keys: str) -> list[str]:
    """Study-level C-FIND with DCMTK (an independent SCU); the answers' StudyInstanceUIDs."""
    command = ["findscu", "-S", "-aet", "CHECKER", "-aec", orthanc.aet, orthanc.host, str(orthanc.dicom_port)]
    command += ["-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID"]
    for key in keys:
        command += ["-k", key]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=30)
    # findscu prints each answer's elements to stderr, e.g. "(0020,000d) UI [1.2.3]   # ..."
    return [
        line.split("[", 1)[1].split("]", 1)[0].rstrip("\0 ")
        for line in done.stderr.splitlines()
        if "(0020,000d)" in line
    ]


@pytest.fixture
def loaded(orthanc_empty: Orthanc, tmp_path) -> Orthanc:
    """CT_small and MR_small, given the accession numbers ACC-CT and ACC-MR (they have none)."""
    files = []
    for path in FILES:
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = f"ACC-{ds.Modality}"
        files.append(tmp_path / f"{ds.Modality}.dcm")
        ds.save_as(files[-1])
    orthanc_empty.load(files)
    return orthanc_empty


def test_orthanc_runs_alone_in_a_private_network_namespace(orthanc):
    assert in_private_netns()
    system = httpx.get(f"{orthanc.rest}/system", timeout=5).json()
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert system["Version"].startswith("1.")
    plugins = httpx.get(f"{orthanc.rest}/plugins", timeout=5).json()
    assert "dicom-web" in plugins


def test_storescu_loads_and_findscu_finds(loaded):
    ct, mr = (pydicom.dcmread(f) for f in FILES)
    assert len(loaded.studies()) == 2
    assert findscu(loaded, f"PatientID={ct.PatientID}") == [ct.StudyInstanceUID]
    assert findscu(loaded, "AccessionNumber=ACC-CT") == [ct.StudyInstanceUID]
    assert findscu(loaded, "AccessionNumber=ACC-MR") == [mr.StudyInstanceUID]
    assert sorted(findscu(loaded, "AccessionNumber=ACC-*")) == sorted([ct.StudyInstanceUID, mr.StudyInstanceUID])
    assert findscu(loaded, "AccessionNumber=NO-SUCH") == []


def test_stop_then_start_keeps_the_data(loaded):
    before = sorted(loaded.studies())
    loaded.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{loaded.rest}/system", timeout=2)
    loaded.start()
    assert sorted(loaded.studies()) == before
    assert len(findscu(loaded, "ModalitiesInStudy=MR")) == 1


def test_clear_empties_it(loaded):
    loaded.clear()
    assert loaded.studies() == []
    assert findscu(loaded) == []
