"""``DimseClient.get``: C-GET on our own upper layer, against the bundled sample PACS (a pynetdicom
Q/R SCP) and against peers that refuse it. Orthanc: tests/test_linking_orthanc.py."""

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_bridge.dimse import DimseClient, Peer
from dicom_bridge.errors import PacsError, PacsUnavailable, RetrieveFailed
from dicom_bridge.image_store import ImageStore
from dicom_bridge.query import StudyQuery
from dicom_bridge.sample_pacs import SamplePacs
from dicom_bridge.storage_scp import StorageScp
from testbed.ports import free_port


@pytest.fixture(scope="module")
def pacs() -> Iterator[SamplePacs]:
    with SamplePacs() as running:
        yield running


def client(pacs: SamplePacs, port: int | None = None) -> DimseClient:
    return DimseClient(Peer(pacs.ae_title, "127.0.0.1", port or pacs.port), "OVERREAD", timeout=10)


def mr_study(pacs: SamplePacs) -> tuple[str, set[str]]:
    """The two-instance MR study of the sample PACS: its UID and SOP classes, as a query finds them."""
    (study,) = client(pacs).find(StudyQuery(accession="ACC-SAMPLE-MR"))
    return str(study.dataset.StudyInstanceUID), {str(i.SOPClassUID) for s in study.series for i in s.instances}


def test_c_get_brings_the_study_as_the_pacs_sent_it(pacs, tmp_path):
    study_uid, sop_classes = mr_study(pacs)
    store = ImageStore(tmp_path)
    assert client(pacs).get(study_uid, store, sop_classes) == 2
    assert store.count(study_uid) == 2
    sent = {str(i.header.SOPInstanceUID): i.dataset() for i in pacs.instances if i.uid("STUDY") == study_uid}
    for path in (tmp_path / study_uid).glob("*/*.dcm"):
        kept = pydicom.dcmread(path)
        original = sent[kept.SOPInstanceUID]
        assert kept.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert [(e.tag, e.value) for e in kept] == [(e.tag, e.value) for e in original]


def test_c_get_of_a_study_the_pacs_lacks_brings_nothing(pacs, tmp_path):
    assert client(pacs).get("1.2.3.4.5.6.7", ImageStore(tmp_path), {"1.2.840.10008.5.1.4.1.1.4"}) == 0


def test_instances_we_cannot_keep_fail_the_retrieve(pacs, tmp_path):
    study_uid, sop_classes = mr_study(pacs)
    blocked = tmp_path / "a-file"
    blocked.write_text("no image store can be made here")
    # Each C-STORE is answered 0xA700; with none delivered, pynetdicom's SCP ends "out of resources" 0xA702.
    with pytest.raises(RetrieveFailed, match="C-GET failed: status 0xA702"):
        client(pacs).get(study_uid, ImageStore(blocked), sop_classes)


def test_a_pacs_that_is_down_is_unavailable(pacs, tmp_path):
    with pytest.raises(PacsUnavailable, match=r"C-GET: SAMPLEPACS at 127\.0\.0\.1"):
        client(pacs, free_port()).get("1.2.3", ImageStore(tmp_path), {"1.2.840.10008.5.1.4.1.1.4"})


def test_a_pacs_that_rejects_us_is_unavailable(tmp_path):
    with SamplePacs() as picky:
        picky.ae.require_calling_aet = ["SOMEONE-ELSE"]
        with pytest.raises(PacsUnavailable, match="rejected the association"):
            client(picky).get("1.2.3", ImageStore(tmp_path), {"1.2.840.10008.5.1.4.1.1.4"})


def test_a_peer_without_c_get_says_so(tmp_path: Path):
    with StorageScp("ONLYSTORE", "127.0.0.1", 0, ImageStore(tmp_path)) as scp:
        peer = DimseClient(Peer("ONLYSTORE", "127.0.0.1", scp.port), "OVERREAD", timeout=10)
        with pytest.raises(PacsError, match="does not accept Study Root C-GET"):
            peer.get("1.2.3", ImageStore(tmp_path), {"1.2.840.10008.5.1.4.1.1.4"})
