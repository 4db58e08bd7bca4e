"""DICOM TLS (PS3.15 B.9) and the calling AE allow-list of our Storage SCP, with DCMTK's echoscu and
storescu (``+tls``) as the peers; our SCU over TLS against the sample PACS (pynetdicom's TLS SCP)."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_bridge.dimse import DimseClient, Peer
from dicom_bridge.errors import PacsUnavailable
from dicom_bridge.image_store import ImageStore
from dicom_bridge.query import StudyQuery
from dicom_bridge.sample_pacs import SamplePacs
from dicom_bridge.storage_scp import StorageScp
from fhir_server.executor import for_database
from overread.app import imaging
from overread.config import OverreadConfig
from overread.settings import Settings
from overread.tls import ServerTls, client_context, server_context
from tests.certificates import Certificates, make
from tests.test_storage_scp import AE_TITLE, saved


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_scp(certs: Certificates, tmp_path: Path) -> Iterator[StorageScp]:
    """Our Storage SCP over mutual TLS, admitting the calling AE RIS from loopback only."""
    cfg = OverreadConfig.model_validate({"dicom": {"allow": [{"ae_title": "RIS", "addresses": ["127.0.0.0/8"]}]}})
    tls = server_context(certs.server.cert, certs.server.key, certs.ca)
    with StorageScp(AE_TITLE, "127.0.0.1", 0, ImageStore(tmp_path / "store"), tls=tls, admits=cfg.dicom.admits) as scp:
        yield scp


def dcmtk(tool: str, port: int, *options: str, files: tuple[Path, ...] = ()) -> subprocess.CompletedProcess[str]:
    command = [tool, *options, "-aec", AE_TITLE, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def tls_options(certs: Certificates, *, calling: str = "RIS") -> tuple[str, ...]:
    """DCMTK's authenticated TLS (BCP 195 non-downgrading profile, its default) with our test CA."""
    return ("-aet", calling, "+tls", str(certs.client.key), str(certs.client.cert), "+cf", str(certs.ca))


def test_echoscu_and_storescu_over_tls_are_served(tls_scp, certs, tmp_path):
    echo = dcmtk("echoscu", tls_scp.port, *tls_options(certs))
    assert echo.returncode == 0, echo.stderr
    path, ds = saved(tmp_path, "CT_small.dcm")
    store = dcmtk("storescu", tls_scp.port, *tls_options(certs), files=(path,))
    assert store.returncode == 0, store.stderr
    assert tls_scp.store.count(ds.StudyInstanceUID) == 1


def test_without_tls_or_without_a_client_certificate_nothing_is_served(tls_scp, certs):
    plain = dcmtk("echoscu", tls_scp.port, "-aet", "RIS")
    anonymous = dcmtk("echoscu", tls_scp.port, "-aet", "RIS", "+tla", "+cf", str(certs.ca))
    assert plain.returncode != 0 and anonymous.returncode != 0


def test_an_unknown_calling_ae_is_rejected_permanently(tls_scp, certs, caplog):
    result = dcmtk("echoscu", tls_scp.port, *tls_options(certs, calling="INTRUDER"))
    assert result.returncode != 0
    assert "Rejected Permanent" in result.stderr and "Calling AE Title Not Recognized" in result.stderr
    assert "DICOM association of INTRUDER from 127.0.0.1" in caplog.text


def test_an_allowed_calling_ae_from_another_address_is_rejected(tmp_path):
    cfg = OverreadConfig.model_validate({"dicom": {"allow": [{"ae_title": "RIS", "addresses": ["10.0.0.0/8"]}]}})
    with StorageScp(AE_TITLE, "127.0.0.1", 0, ImageStore(tmp_path), admits=cfg.dicom.admits) as scp:
        refused = dcmtk("echoscu", scp.port, "-aet", "RIS")
    assert "Calling AE Title Not Recognized" in refused.stderr
    assert cfg.dicom.admits("RIS", "::ffff:10.1.2.3") and not cfg.dicom.admits("RISX", "10.1.2.3")


# -- our SCU over TLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_pacs(certs: Certificates) -> Iterator[SamplePacs]:
    with SamplePacs(tls=server_context(certs.server.cert, certs.server.key, certs.ca)) as running:
        yield running


def test_our_scu_finds_and_gets_over_mutual_tls(tls_pacs, certs, tmp_path):
    tls = client_context(certs.ca, certs.client.cert, certs.client.key)
    client = DimseClient(Peer(tls_pacs.ae_title, "127.0.0.1", tls_pacs.port, tls), "OVERREAD", timeout=10)
    (study,) = client.find(StudyQuery(accession="ACC-SAMPLE-MR"))
    sop_classes = {str(i.SOPClassUID) for s in study.series for i in s.instances}
    store = ImageStore(tmp_path)
    assert client.get(str(study.dataset.StudyInstanceUID), store, sop_classes) == 2


def test_our_scu_without_the_peers_ca_does_not_associate(tls_pacs, certs, tmp_path):
    untrusting = client_context(None, certs.client.cert, certs.client.key)  # the system's CAs only
    client = DimseClient(Peer(tls_pacs.ae_title, "127.0.0.1", tls_pacs.port, untrusting), "OVERREAD", timeout=10)
    with pytest.raises(PacsUnavailable):
        client.find(StudyQuery(accession="ACC-SAMPLE-MR"))
    with pytest.raises(PacsUnavailable):
        client.get("1.2.3", ImageStore(tmp_path), {"1.2.840.10008.5.1.4.1.1.4"})


def test_overread_serves_dicom_tls_and_its_allow_list_from_settings_and_config(db, certs, tmp_path):
    settings = Settings(
        database_url=db.url,
        dicom_port=0,
        image_store=tmp_path / "images",
        dicom_tls=ServerTls(cert=certs.server.cert, key=certs.server.key, client_ca=certs.ca),
    )
    cfg = OverreadConfig.model_validate({"dicom": {"allow": [{"ae_title": "RIS"}]}})
    with imaging(settings, for_database(db), cfg) as (_, scp):
        allowed = dcmtk("echoscu", scp.port, *tls_options(certs))
        unknown = dcmtk("echoscu", scp.port, *tls_options(certs, calling="CT99"))
    assert allowed.returncode == 0, allowed.stderr
    assert "Calling AE Title Not Recognized" in unknown.stderr
