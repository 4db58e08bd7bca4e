"""The bundled sample PACS (dicom_bridge.sample_pacs), checked with DCMTK as the independent peer.

findscu, movescu and getscu are SCUs (they listen on nothing); the C-MOVE destination is a
pynetdicom Storage SCP on 127.0.0.1, except in ``test_move_to_dcmtk_storescp``: storescp 3.6.7
cannot be told to listen on 127.0.0.1 only, so that test runs with the Orthanc tests, in the
private network namespace of ``tests/run``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association

from dicom_bridge.matching import match_value, matches
from dicom_bridge.sample_pacs import (
    DEMO_ACCESSION,
    STUDY_FIND,
    STUDY_GET,
    STUDY_MOVE,
    VERIFICATION,
    SamplePacs,
    sample_path,
)
from dicom_bridge.tuning import ASSOCIATION_HANDLERS, DUL_POLL, nodelay, reactor_keeps_its_pause
from testbed.orthanc import in_private_netns
from testbed.ports import free_port

CT_STUDY = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
MR_STUDY = "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457"
RT_STUDY = "1.2.999.999.99.9.9999.8888"
CR_STUDY = "1.3.51.0.7.11986030739.15242.20106.39861.48967.23056.44420"
MR_SERIES = "1.3.6.1.4.1.5962.1.3.4.1.20040826185059.5457"
SR_SERIES = "1.2.276.0.7230010.3.1.3.1787205428.166.1117461927.11"
STORAGE_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.2",  # CT
    "1.2.840.10008.5.1.4.1.1.4",  # MR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.1",  # CR
]
dcmtk = pytest.mark.skipif(shutil.which("findscu") is None, reason="DCMTK is not installed")


@pytest.fixture(scope="module")
def pacs() -> Iterator[SamplePacs]:
    with SamplePacs() as running:
        yield running


# -- peers --------------------------------------------------------------------------------------------


def dcmtk_run(tool: str, port: int, *args: str, keys: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [tool, "-v", "-S", "-aet", tool.upper(), "-aec", "SAMPLEPACS", *args]
    for keyword, value in keys.items():
        command += ["-k", f"{keyword}={value}"]
    return subprocess.run([*command, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=30)


def findscu(port: int, folder: Path, **keys: str) -> list[Dataset]:
    """The answers findscu extracts (-X) for a Study Root query with ``keys``."""
    folder.mkdir()
    done = dcmtk_run("findscu", port, "-X", "-od", str(folder), keys=keys)
    assert done.returncode == 0, done.stderr
    return [pydicom.dcmread(path) for path in sorted(folder.glob("rsp*.dcm"))]


@contextmanager
def scu(port: int) -> Iterator[Association]:
    """A pynetdicom association for every service, offering the Storage SCP role for C-GET."""
    ae = AE("PYSCU")
    for uid in (VERIFICATION, STUDY_FIND, STUDY_MOVE, STUDY_GET, *STORAGE_CLASSES):
        ae.add_requested_context(uid)
    roles: list[Any] = [build_role(uid, scp_role=True) for uid in STORAGE_CLASSES]
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    handlers = [*ASSOCIATION_HANDLERS, (evt.EVT_C_STORE, on_store)]
    assoc = ae.associate("127.0.0.1", port, ae_title="SAMPLEPACS", ext_neg=roles, evt_handlers=handlers)
    assert assoc.is_established
    assoc.received = received  # type: ignore[attr-defined]
    try:
        yield assoc
    finally:
        assoc.release()


@contextmanager
def store_scp(ae_title: str = "DEST") -> Iterator[SimpleNamespace]:
    """A pynetdicom Storage SCP on 127.0.0.1 (a C-MOVE destination); ``.received`` the datasets."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title)
    for uid in STORAGE_CLASSES:
        ae.add_supported_context(uid)
    server = ae.start_server(
        ("127.0.0.1", 0), block=False, evt_handlers=[*ASSOCIATION_HANDLERS, (evt.EVT_C_STORE, on_store)]
    )
    assert server is not None and server.socket is not None
    try:
        yield SimpleNamespace(ae_title=ae_title, port=server.server_address[1], received=received)
    finally:
        server.socket.shutdown(socket.SHUT_RDWR)  # wakes socketserver now, not at its next 0.5 s poll
        server.shutdown()


def query(level: str = "", **keys: str) -> Dataset:
    ds = Dataset()
    if level:
        ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def find(assoc: Association, identifier: Dataset) -> tuple[list[Dataset], Dataset]:
    """The pending answers and the final status of one C-FIND."""
    responses = list(assoc.send_c_find(identifier, STUDY_FIND))
    *pending, (final, _) = responses
    assert all(status.Status == 0xFF00 for status, _ in pending)
    return [answer for _, answer in pending if answer is not None], final


# -- C-ECHO and C-FIND ----------------------------------------------------------------------------------


@dcmtk
def test_echoscu(pacs):
    done = subprocess.run(["echoscu", "-aec", "SAMPLEPACS", "127.0.0.1", str(pacs.port)], capture_output=True)
    assert done.returncode == 0, done.stderr


@dcmtk
def test_study_find_by_accession_answers_once_with_only_the_keys_asked(pacs, tmp_path):
    keys = {"AccessionNumber": DEMO_ACCESSION, "StudyInstanceUID": "", "ModalitiesInStudy": ""}
    keys |= {"NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "", "PatientName": ""}
    [answer] = findscu(pacs.port, tmp_path / "find", QueryRetrieveLevel="STUDY", **keys)
    assert answer.StudyInstanceUID == CT_STUDY
    assert answer.AccessionNumber == DEMO_ACCESSION
    assert (answer.NumberOfStudyRelatedSeries, answer.NumberOfStudyRelatedInstances) == (1, 1)
    assert answer.ModalitiesInStudy == "CT"
    assert answer.PatientName == "CompressedSamples^CT1"
    returned = {element.keyword for element in answer}
    assert returned == {*keys, "QueryRetrieveLevel", "SpecificCharacterSet"}


@dcmtk
def test_two_series_study_is_one_study_level_answer(pacs, tmp_path):
    [answer] = findscu(
        pacs.port,
        tmp_path / "find",
        QueryRetrieveLevel="STUDY",
        StudyInstanceUID=MR_STUDY,
        ModalitiesInStudy="",
        NumberOfStudyRelatedSeries="",
        NumberOfStudyRelatedInstances="",
    )
    assert list(answer.ModalitiesInStudy) == ["MR", "SR"]
    assert (answer.NumberOfStudyRelatedSeries, answer.NumberOfStudyRelatedInstances) == (2, 2)
    assert "SpecificCharacterSet" not in answer  # MR_small.dcm has none: the default repertoire


@dcmtk
def test_series_and_image_level(pacs, tmp_path):
    series = findscu(
        pacs.port,
        tmp_path / "series",
        QueryRetrieveLevel="SERIES",
        StudyInstanceUID=MR_STUDY,
        SeriesInstanceUID="",
        Modality="",
        NumberOfSeriesRelatedInstances="",
    )
    assert {(s.SeriesInstanceUID, s.Modality, s.NumberOfSeriesRelatedInstances) for s in series} == {
        (MR_SERIES, "MR", 1),
        (SR_SERIES, "SR", 1),
    }
    [image] = findscu(
        pacs.port,
        tmp_path / "image",
        QueryRetrieveLevel="IMAGE",
        StudyInstanceUID=MR_STUDY,
        SeriesInstanceUID=SR_SERIES,
        SOPInstanceUID="",
        SOPClassUID="",
        InstanceNumber="",
    )
    assert image.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.11"
    assert image.SOPInstanceUID == "1.2.276.0.7230010.3.1.4.1787205428.166.1117461927.10"
    assert image.InstanceNumber == 1


@pytest.mark.parametrize(
    ("keys", "studies"),
    [
        ({"PatientName": "CompressedSamples*"}, {CT_STUDY, MR_STUDY}),
        ({"PatientName": "compressedsamples^?t1"}, {CT_STUDY}),  # PN: case-insensitive
        ({"PatientID": "?MR?"}, {MR_STUDY}),
        ({"AccessionNumber": "ACC-*"}, {CT_STUDY, MR_STUDY, RT_STUDY}),
        ({"AccessionNumber": "*"}, {CT_STUDY, MR_STUDY, RT_STUDY, CR_STUDY}),
        ({"StudyDate": "20040101-20041231"}, {CT_STUDY, MR_STUDY}),
        ({"StudyDate": "-20031231"}, {RT_STUDY}),
        ({"StudyDate": "20050101-"}, {CR_STUDY}),
        ({"StudyDate": "20040119"}, {CT_STUDY}),
        ({"StudyDate": "20040119", "StudyTime": "0700-0800"}, {CT_STUDY}),
        ({"StudyTime": "-07"}, {CT_STUDY}),
        ({"ModalitiesInStudy": "SR"}, {MR_STUDY}),
        ({"ModalitiesInStudy": "CT\\SR"}, {CT_STUDY, MR_STUDY}),
        ({"StudyInstanceUID": f"{CT_STUDY}\\{RT_STUDY}\\1.2.3"}, {CT_STUDY, RT_STUDY}),
        ({"PatientID": "NO-SUCH"}, set()),
        ({"StudyDescription": "MR*"}, {MR_STUDY}),  # absent on the other studies: no match
    ],
)
def test_study_matching(pacs, keys, studies):
    with scu(pacs.port) as assoc:
        answers, final = find(assoc, query("STUDY", **{"StudyInstanceUID": "", **keys}))
    assert final.Status == 0x0000
    assert sorted(a.StudyInstanceUID for a in answers) == sorted(studies)  # each study once


@dcmtk
def test_specific_character_set_of_the_match(pacs, tmp_path):
    [answer] = findscu(pacs.port, tmp_path / "find", QueryRetrieveLevel="STUDY", ModalitiesInStudy="CR", PatientName="")
    assert list(answer.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert str(answer.PatientName) == "やまだ^たろう"


# -- C-MOVE -------------------------------------------------------------------------------------------


@dcmtk
def test_movescu_delivers_the_study(pacs):
    with store_scp() as dest:
        pacs.destinations[dest.ae_title] = ("127.0.0.1", dest.port)
        keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": MR_STUDY}
        done = dcmtk_run("movescu", pacs.port, "-aem", dest.ae_title, keys=keys)
    assert done.returncode == 0, done.stderr
    assert "Received Final Move Response (Success)" in done.stderr
    assert sorted(ds.Modality for ds in dest.received) == ["MR", "SR"]
    assert {ds.AccessionNumber for ds in dest.received} == {"ACC-SAMPLE-MR"}  # the overrides travel
    assert "PixelData" in next(ds for ds in dest.received if ds.Modality == "MR")


@pytest.mark.parametrize(
    ("keys", "count"),
    [
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": f"{MR_STUDY}\\{CT_STUDY}"}, 3),
        ({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": MR_STUDY, "SeriesInstanceUID": SR_SERIES}, 1),
        ({"QueryRetrieveLevel": "SERIES", "SeriesInstanceUID": SR_SERIES}, 1),  # upper unique key optional
        ({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "1.2.3.4"}, 0),
    ],
)
def test_move_counts_sub_operations(pacs, keys, count):
    with store_scp() as dest, scu(pacs.port) as assoc:
        pacs.destinations[dest.ae_title] = ("127.0.0.1", dest.port)
        responses = list(assoc.send_c_move(query(**keys), dest.ae_title, STUDY_MOVE))
    final = responses[-1][0]
    assert final.Status == 0x0000
    assert (final.NumberOfCompletedSuboperations, final.NumberOfFailedSuboperations) == (count, 0)
    assert len(dest.received) == count
    assert len(responses) == count + 1  # a Pending response for each sub-operation


@dcmtk
def test_move_to_an_unknown_destination_is_0xA801(pacs):
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": CT_STUDY}
    done = dcmtk_run("movescu", pacs.port, "-aem", "NOBODY", keys=keys)
    assert "MoveDestinationUnknown" in done.stderr
    with scu(pacs.port) as assoc:
        [(status, _)] = list(assoc.send_c_move(query(**keys), "NOBODY", STUDY_MOVE))
        assert status.Status == 0xA801
        assert assoc.send_c_echo().Status == 0x0000


@pytest.mark.orthanc
@dcmtk
def test_move_to_dcmtk_storescp(pacs, tmp_path):
    """storescp listens on every interface: only in the private network namespace (tests/run)."""
    if not in_private_netns():
        pytest.skip("storescp cannot bind 127.0.0.1 only: runs in tests/run's private network namespace")
    folder = tmp_path / "received"
    folder.mkdir()
    port = free_port()
    storescp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(folder), str(port)])
    try:
        deadline = time.monotonic() + 10
        while subprocess.run(["echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)]).returncode != 0:
            assert storescp.poll() is None and time.monotonic() < deadline, "storescp did not start"
            time.sleep(0.05)
        pacs.destinations["STORESCP"] = ("127.0.0.1", port)
        with scu(pacs.port) as assoc:
            identifier = query("STUDY", StudyInstanceUID=f"{CT_STUDY}\\{MR_STUDY}")
            final = list(assoc.send_c_move(identifier, "STORESCP", STUDY_MOVE))[-1][0]
    finally:
        storescp.terminate()
        storescp.wait(10)
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 3)
    assert len(list(folder.iterdir())) == 3


# -- C-GET --------------------------------------------------------------------------------------------


@dcmtk
def test_getscu_receives_the_study(pacs, tmp_path):
    folder = tmp_path / "got"
    folder.mkdir()
    keys = {"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": MR_STUDY}
    done = dcmtk_run("getscu", pacs.port, "-od", str(folder), keys=keys)
    assert done.returncode == 0, done.stderr
    assert "Number of Completed Suboperations : 2" in done.stderr
    received = [pydicom.dcmread(path) for path in folder.iterdir()]
    assert sorted(ds.SOPInstanceUID for ds in received) == sorted(
        str(i.header.SOPInstanceUID) for i in pacs.instances if i.header.StudyInstanceUID == MR_STUDY
    )


def test_get_with_pynetdicom_converts_implicit_vr(pacs):
    with scu(pacs.port) as assoc:
        responses = list(assoc.send_c_get(query("STUDY", StudyInstanceUID=RT_STUDY), STUDY_GET))
        received = assoc.received  # type: ignore[attr-defined]
    assert responses[-1][0].Status == 0x0000
    assert responses[-1][0].NumberOfCompletedSuboperations == 1
    [rtdose] = received
    assert rtdose.Modality == "RTDOSE"
    assert rtdose.AccessionNumber == "ACC-SAMPLE-RT"


# -- refusals -----------------------------------------------------------------------------------------


def test_bad_identifiers_get_failure_statuses_and_the_association_stays(pacs):
    with store_scp() as dest, scu(pacs.port) as assoc:
        pacs.destinations[dest.ae_title] = ("127.0.0.1", dest.port)
        _, final = find(assoc, query("PATIENT", PatientID=""))
        assert (final.Status, final.ErrorComment) == (0xA900, "Unsupported Query/Retrieve Level 'PATIENT'")
        _, final = find(assoc, query(PatientID=""))  # no Query/Retrieve Level at all
        assert final.Status == 0xA900
        [(status, _)] = list(assoc.send_c_move(query("STUDY", AccessionNumber=DEMO_ACCESSION), "DEST", STUDY_MOVE))
        assert status.Status == 0xA900
        assert "StudyInstanceUID is required" in status.ErrorComment
        [(status, _)] = list(assoc.send_c_get(query("IMAGE", StudyInstanceUID=CT_STUDY), STUDY_GET))
        assert status.Status == 0xA900
        assert assoc.send_c_echo().Status == 0x0000
        answers, final = find(assoc, query("STUDY", AccessionNumber=DEMO_ACCESSION))
        assert (len(answers), final.Status) == (1, 0x0000)
    assert dest.received == []


def test_a_handler_exception_is_a_failure_status(monkeypatch, caplog):
    with SamplePacs(files=[]) as pacs, scu(pacs.port) as assoc:
        monkeypatch.setattr(pacs, "find", lambda identifier: 1 / 0)
        _, final = find(assoc, query("STUDY", PatientID=""))
        assert final.Status == 0xC000
        assert "ZeroDivisionError" in final.ErrorComment
        assert assoc.send_c_echo().Status == 0x0000
    assert [r.levelname for r in caplog.records if r.name == "dicom_bridge.sample_pacs"] == ["WARNING"]


# -- content ------------------------------------------------------------------------------------------


def test_a_study_arriving_late():
    with SamplePacs(files=[]) as pacs, scu(pacs.port) as assoc:
        late = query("STUDY", AccessionNumber="ACC-LATE", StudyInstanceUID="", NumberOfStudyRelatedInstances="")
        assert find(assoc, late)[0] == []
        pacs.add(
            get_testdata_file("MR_small.dcm", download=False),
            AccessionNumber="ACC-LATE",
            StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
            SeriesInstanceUID="1.2.826.0.1.3680043.8.498.2",
            SOPInstanceUID="1.2.826.0.1.3680043.8.498.3",
        )
        [answer] = find(assoc, late)[0]
        assert (answer.StudyInstanceUID, answer.NumberOfStudyRelatedInstances) == ("1.2.826.0.1.3680043.8.498.1", 1)
        got = list(assoc.send_c_get(query("STUDY", StudyInstanceUID="1.2.826.0.1.3680043.8.498.1"), STUDY_GET))
        assert got[-1][0].Status == 0x0000
        [first, *_] = assoc.received  # type: ignore[attr-defined]
        assert (first.AccessionNumber, first.SOPInstanceUID) == ("ACC-LATE", "1.2.826.0.1.3680043.8.498.3")


def test_in_memory_datasets_and_readding_replaces():
    ds = pydicom.dcmread(sample_path("CT_small.dcm"))
    del ds.file_meta  # a Dataset made in code has no file meta: sent as Explicit VR Little Endian
    pacs = SamplePacs(files=[(ds, {"PatientID": "P1"})])
    pacs.add(ds, PatientID="P2")  # same SOP Instance UID: replaces
    assert [str(i.header.PatientID) for i in pacs.instances] == ["P2"]
    assert ds.PatientID == "1CT1"  # the caller's Dataset is left alone
    with pacs, scu(pacs.port) as assoc:
        list(assoc.send_c_get(query("IMAGE", SOPInstanceUID=ds.SOPInstanceUID), STUDY_GET))
        [got] = assoc.received  # type: ignore[attr-defined]
    assert got.PatientID == "P2"
    assert got.PixelData == ds.PixelData


def test_sample_files_are_bundled_not_downloaded():
    pacs = SamplePacs()
    assert len(pacs.instances) == 5
    assert {str(i.header.Modality) for i in pacs.instances} == {"CT", "MR", "SR", "RTDOSE", "CR"}
    with pytest.raises(FileNotFoundError):
        sample_path("no-such-file.dcm")


def test_c_store_adds_an_instance():
    ct = pydicom.dcmread(sample_path("CT_small.dcm"))
    with SamplePacs(files=[]) as pacs, scu_titled(pacs.port, "SAMPLEPACS", ct.SOPClassUID) as assoc:
        assert assoc.send_c_store(ct).Status == 0x0000
        assert [str(i.header.SOPInstanceUID) for i in pacs.instances] == [ct.SOPInstanceUID]


# -- pieces -------------------------------------------------------------------------------------------


def test_port_zero_picks_a_free_port_and_stop_frees_it():
    pacs = SamplePacs(files=[]).start()
    port = pacs.port
    assert port > 0
    pacs.stop()
    with pytest.raises(RuntimeError):
        _ = pacs.port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_low_latency_handlers_set_the_dul_poll_of_both_ends(pacs):
    with scu_titled(pacs.port, pacs.ae_title) as assoc:
        assert assoc.dul._run_loop_delay == DUL_POLL
        assert [a.dul._run_loop_delay for a in pacs.ae.active_associations] == [DUL_POLL]


class DawdlingCheckpoint(threading.Event):
    """A reactor checkpoint that lingers, still "paused", after letting the reactor through: the race, made wide."""

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        time.sleep(0.02)
        return passed


def test_the_reactor_leaves_a_response_to_its_caller(pacs):
    # Without reactor_keeps_its_pause the first echo times out: the reactor takes its response.
    ae = AE("PYSCU")
    ae.add_requested_context(VERIFICATION)
    ae.dimse_timeout = 2
    assoc = ae.associate("127.0.0.1", pacs.port, ae_title=pacs.ae_title, evt_handlers=ASSOCIATION_HANDLERS)
    assert assoc.is_established
    take = assoc.dimse.get_msg

    def a_caller_slow_to_take_its_response(block: bool = False) -> Any:
        if block:
            time.sleep(0.05)
        return take(block)

    assoc.dimse.get_msg = a_caller_slow_to_take_its_response  # type: ignore[method-assign]
    checkpoint = DawdlingCheckpoint()
    checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
    try:
        assert [assoc.send_c_echo().get("Status") for _ in range(5)] == [0x0000] * 5
    finally:
        assoc.release()


def test_a_reactor_without_the_checkpoint_is_left_alone():
    def take(block: bool = False) -> tuple[None, None]:
        return None, None

    assoc = SimpleNamespace(dimse=SimpleNamespace(get_msg=take))  # no _reactor_checkpoint: not pynetdicom 3.0
    reactor_keeps_its_pause(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    assert assoc.dimse.get_msg is take


def test_nodelay_sets_tcp_nodelay():
    with socket.socket() as sock:
        event = SimpleNamespace(assoc=SimpleNamespace(dul=SimpleNamespace(socket=SimpleNamespace(socket=sock))))
        nodelay(event)  # type: ignore[arg-type]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


@pytest.mark.parametrize(
    ("vr", "query_value", "stored", "expected"),
    [
        ("DA", "20260101-", "20260101", True),
        ("DA", "20260101-", "20251231", False),
        ("DA", "-20260131", "20260131", True),
        ("DA", "20260101-20260131", "20260201", False),
        ("DA", "20260115", "2026.01.15", True),  # ACR-NEMA style date
        ("TM", "10-12", "125959.5", True),  # the upper bound "12" runs to 12:59:59.999999
        ("TM", "10-12", "130000", False),
        ("TM", "1030", "10:30:00", True),
        ("DT", "20260101-20260102", "20260102120000+0100", True),
        ("LO", "a?c*", "abcdef", True),
        ("LO", "a?c*", "ABCDEF", False),  # case-sensitive but for PN
        ("PN", "DOE^J*", "Doe^John", True),
        ("PN", "山田^太郎", "Yamada^Tarou=山田^太郎", True),  # any component group
        ("IS", "1", "1", True),
        ("DS", "1.50", "1.5", True),
        ("UI", "1.2.3", "1.2.3.4", False),
        ("CS", "A.B", "AxB", False),  # regex characters are literal
    ],
)
def test_match_value(vr, query_value, stored, expected):
    assert match_value(vr, query_value, stored) is expected


def test_matches_universal_and_missing():
    assert matches(DataElement("PatientID", "LO", ""), None)  # universal: even when absent
    assert not matches(DataElement("PatientID", "LO", "X"), None)
    assert matches(DataElement("ReferencedStudySequence", "SQ", []), None)


@pytest.mark.slow
def test_command_line(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "dicom_bridge.sample_pacs", "--port", str(port), "--ae", "CLIPACS"]
    process = subprocess.Popen([*command, "--destination", "X=127.0.0.1:1"], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert f"CLIPACS on 127.0.0.1:{port}: 4 studies" in process.stdout.readline()
        with scu_titled(port, "CLIPACS") as assoc:
            assert assoc.send_c_echo().Status == 0x0000
    finally:
        process.terminate()
        process.wait(10)
    bad = subprocess.run([*command, "--destination", "X"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "is not AE=HOST:PORT" in bad.stderr


@contextmanager
def scu_titled(port: int, called: str, *contexts: str) -> Iterator[Association]:
    ae = AE("PYSCU")
    for uid in (VERIFICATION, *contexts):
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=ASSOCIATION_HANDLERS)
    assert assoc.is_established
    try:
        yield assoc
    finally:
        assoc.release()


def test_a_lone_asterisk_is_universal_matching_even_for_an_absent_attribute():
    # PS3.4 C.2.2.2.4: a value of "*" only is equivalent to universal matching (C.2.2.2.3).
    assert matches(DataElement("PatientName", "PN", "*"), None)
    assert matches(DataElement("AccessionNumber", "SH", "**"), DataElement("AccessionNumber", "SH", ""))
    assert not matches(DataElement("AccessionNumber", "SH", "A*"), None)
