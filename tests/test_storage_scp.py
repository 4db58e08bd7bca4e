"""Our Storage SCP (dicom_bridge.storage_scp on dicom_bridge.upper_layer) against real peers:
DCMTK's storescu and echoscu, and pynetdicom as an SCU; raw sockets only for what no peer
would send (garbage, broken PDUs)."""

import contextlib
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.events import EventHandlerType
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification

from dicom_bridge import command_set
from dicom_bridge.command_set import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from dicom_bridge.image_store import ImageStore
from dicom_bridge.storage_scp import Limits, StorageScp
from dicom_bridge.tuning import reactor_keeps_its_pause
from dicom_bridge.upper_layer import ABORT, ASSOCIATE_RJ, Messages, ProtocolError, data_pdus, pdu

AE_TITLE = "OVERREAD"
VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


class Scp:
    """A running StorageScp whose wake-ups are recorded; ``woken`` waits for the next."""

    def __init__(self, store: ImageStore, **options: object) -> None:
        self.calls: list[set[tuple[str, str]]] = []
        self._called = threading.Condition()
        self.scp = StorageScp(AE_TITLE, "127.0.0.1", 0, store, self._received, **options).start()  # type: ignore[arg-type]
        self.port, self.store = self.scp.port, store

    def _received(self, studies: set[tuple[str, str]]) -> None:
        with self._called:
            self.calls.append(studies)
            self._called.notify_all()

    def woken(self, count: int = 1) -> list[set[tuple[str, str]]]:
        with self._called:
            assert self._called.wait_for(lambda: len(self.calls) >= count, timeout=10), self.calls
            return self.calls


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    running = Scp(ImageStore(tmp_path / "store"))
    yield running
    running.scp.stop()


def sample(name: str, accession: str = "ACC-SCP") -> Dataset:
    """pydicom's sample ``name`` with new UIDs and ``accession``."""
    ds = pydicom.dcmread(str(get_testdata_file(name)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    return ds


def saved(tmp_path: Path, name: str, accession: str = "ACC-SCP") -> tuple[Path, Dataset]:
    """:func:`sample` saved in the syntax it came in; its path and the dataset read back."""
    ds = sample(name, accession)
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, pydicom.dcmread(path)


def stored(store: ImageStore, ds: Dataset) -> Dataset:
    return pydicom.dcmread(store.path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))


def elements(ds: Dataset) -> list[tuple[int, object]]:
    """Every element's value, decoded; storescu drops Data Set Trailing Padding (PS3.10 7.2), so do we."""
    ds.decode()
    return [(e.tag, e.value) for e in ds if e.tag != 0xFFFCFFFC]


def dcmtk(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), capture_output=True, text=True, timeout=60)


def associate(
    port: int,
    *contexts: object,
    source: str = "127.0.0.1",
    evt_handlers: Sequence[EventHandlerType] = (),
    **options: object,
):
    """An association from ``source`` with ``contexts`` (storage and verification), ``options`` set on the AE."""
    ae = AE("SCU")
    for context in contexts or (CTImageStorage, MRImageStorage, VERIFICATION):
        ae.add_requested_context(context)  # type: ignore[arg-type]
    for name, value in options.items():
        setattr(ae, name, value)
    # pynetdicom as it comes, but for its reactor's race (dicom_bridge.tuning)
    handlers: list[EventHandlerType] = [(evt.EVT_CONN_OPEN, reactor_keeps_its_pause), *evt_handlers]
    return ae.associate("127.0.0.1", port, ae_title=AE_TITLE, evt_handlers=handlers, bind_address=(source, 0))


def test_echoscu_is_answered(scp):
    result = dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(scp.port))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("name", "options", "syntax"),
    [
        ("CT_small.dcm", [], ExplicitVRLittleEndian),  # as it is
        ("MR_small.dcm", ["-xi"], "1.2.840.10008.1.2"),  # implicit VR: what the header walk reads too
        ("MR_small_bigendian.dcm", ["-xb"], "1.2.840.10008.1.2.2"),  # big endian: pydicom reads the header
        ("CT_small.dcm", ["-xd"], DeflatedExplicitVRLittleEndian),  # deflated: pydicom reads the header
        ("CT_small.dcm", ["--max-send-pdu", "4096"], ExplicitVRLittleEndian),  # many PDUs, many PDVs
    ],
)
def test_storescu_instances_are_kept_as_sent_in_every_syntax(scp, tmp_path, name, options, syntax):
    path, original = saved(tmp_path, name)
    result = dcmtk("storescu", *options, "-aec", AE_TITLE, "127.0.0.1", str(scp.port), str(path))
    assert result.returncode == 0, result.stderr
    kept = stored(scp.store, original)
    assert kept.file_meta.TransferSyntaxUID == syntax
    assert kept.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert elements(kept) == elements(original)
    assert scp.woken() == [{(original.StudyInstanceUID, "ACC-SCP")}]


def test_one_association_brings_several_studies_and_wakes_once_with_all(scp, tmp_path):
    first, a = saved(tmp_path, "CT_small.dcm", "ACC-A")
    second, b = saved(tmp_path, "MR_small.dcm", "ACC-B")
    result = dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(scp.port), str(first), str(second))
    assert result.returncode == 0, result.stderr
    assert scp.woken() == [{(a.StudyInstanceUID, "ACC-A"), (b.StudyInstanceUID, "ACC-B")}]
    assert scp.store.count(a.StudyInstanceUID) == scp.store.count(b.StudyInstanceUID) == 1


def test_a_large_instance_in_pdus_of_the_maximum_we_announce(scp):
    ds = sample("CT_small.dcm")
    ds.Rows, ds.Columns = 2048, 2048  # 8 MiB of pixels: two PDUs of our 4 MiB maximum and a rest
    ds.PixelData = bytes(range(256)) * (2048 * 2048 * 2 // 256)
    assoc = associate(scp.port)
    assert assoc.acceptor.maximum_length == 1 << 22
    assert assoc.send_c_store(ds).Status == SUCCESS
    assoc.release()
    assert stored(scp.store, ds).PixelData == ds.PixelData


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")  # the bad UID is the point
def test_a_store_that_fails_is_a_failure_status_and_the_association_goes_on(tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("the image store cannot be created here")
    running = Scp(ImageStore(blocked))
    try:
        ds = sample("CT_small.dcm")
        assoc = associate(running.port)
        assert assoc.send_c_store(ds).Status == OUT_OF_RESOURCES
        bad = sample("CT_small.dcm")
        bad.SOPInstanceUID = "../../etc"  # not a UID: never a path
        assert assoc.send_c_store(bad).Status == CANNOT_UNDERSTAND
        assert assoc.send_c_echo().Status == SUCCESS
        assoc.release()
        assert assoc.is_released
    finally:
        running.scp.stop()


def test_only_storage_and_verification_are_accepted(scp):
    assoc = associate(scp.port, CTImageStorage, STUDY_ROOT_FIND, "1.2.3.4.5.6")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    assert accepted == {CTImageStorage, "1.2.3.4.5.6"}  # a private SOP class is storage to us
    assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == [STUDY_ROOT_FIND]
    assoc.release()


def test_associations_over_the_limit_are_rejected_transiently(tmp_path):
    """The second association is told "rejected transient, local limit exceeded" (PS3.8 9.3.4).

    DCMTK's echoscu asks for it: pynetdicom as a requestor reports a rejection that arrives before
    its own thread looks at the connection as a failure to connect (its ACSE checks
    ``_is_connected`` after the reader has already closed the socket on the A-ASSOCIATE-RJ)."""
    running = Scp(ImageStore(tmp_path), limits=Limits(max_associations=1))
    try:
        first = associate(running.port)
        assert first.is_established
        second = dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(running.port))
        assert second.returncode != 0
        assert "Result: Rejected Transient, Source: Service Provider (Presentation Related)" in second.stderr
        assert "Reason: Local Limit Exceeded" in second.stderr, second.stderr
        first.release()
    finally:
        running.scp.stop()


def test_an_aborted_association_still_wakes_the_studies_it_brought(scp):
    ds = sample("CT_small.dcm", "ACC-ABORT")
    assoc = associate(scp.port)
    assert assoc.send_c_store(ds).Status == SUCCESS
    assoc.abort()
    assert scp.woken() == [{(ds.StudyInstanceUID, "ACC-ABORT")}]


def test_stop_ends_the_open_associations(tmp_path):
    running = Scp(ImageStore(tmp_path))
    assoc = associate(running.port, network_timeout=5)
    ds = sample("CT_small.dcm", "ACC-STOP")
    assert assoc.send_c_store(ds).Status == SUCCESS
    running.scp.stop()
    assert running.woken() == [{(ds.StudyInstanceUID, "ACC-STOP")}]


def associate_rq(application_context: str = "1.2.840.10008.3.1.1.1") -> bytes:
    """An A-ASSOCIATE-RQ PDU as pynetdicom encodes it, proposing C-ECHO."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = application_context
    primitive.calling_ae_title, primitive.called_ae_title = "RAW", AE_TITLE
    primitive.presentation_context_definition_list = [build_context(VERIFICATION)]
    primitive.presentation_context_definition_list[0].context_id = 1
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    uid = ImplementationClassUIDNotification()
    uid.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [length, uid]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(primitive)
    return rq.encode()


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        with contextlib.suppress(OSError):  # the SCP may have answered and closed already (ENOTCONN)
            sock.shutdown(socket.SHUT_WR)  # all there is: a PDU cut short ends here, not at a timeout
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize(
    ("data", "answer"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", struct.pack(">B1xI4B", ABORT, 4, 0, 0, 2, 1)),  # not a PDU
        (pdu(4, b"\x00\x00\x00\x02\x01\x03"), struct.pack(">B1xI4B", ABORT, 4, 0, 0, 2, 2)),  # data first
        (associate_rq("1.2.3.4"), struct.pack(">B1xI4B", ASSOCIATE_RJ, 4, 0, 1, 1, 2)),  # not DICOM's context
        (associate_rq()[:40], struct.pack(">B1xI4B", ABORT, 4, 0, 0, 2, 1)),  # cut short
    ],
    ids=["garbage", "p-data-before-associate", "unknown-application-context", "truncated"],
)
def test_what_is_not_dicom_is_refused_and_the_scp_serves_the_next_peer(scp, data, answer):
    assert raw(scp.port, data) == answer
    assert associate(scp.port).send_c_echo().Status == SUCCESS


def store_rq() -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1) as pynetdicom encodes it."""
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 7, 0
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = CTImageStorage, "1.2.3"
    primitive.DataSet = BytesIO(b"abcd")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)  # type: ignore[return-value]


def test_command_sets_read_pynetdicoms_requests_and_answer_in_its_terms():
    request = command_set.decode(store_rq())
    assert (request.field, request.message_id, request.has_data) == (0x0001, 7, True)
    assert (request.sop_class, request.sop_instance) == (CTImageStorage, "1.2.3")
    answer = decode(BytesIO(command_set.response(request, OUT_OF_RESOURCES)), True, True)
    assert answer.CommandGroupLength == len(command_set.response(request, 0)) - 12
    assert (answer.CommandField, answer.MessageIDBeingRespondedTo, answer.Status) == (0x8001, 7, OUT_OF_RESOURCES)
    assert (answer.AffectedSOPClassUID, answer.AffectedSOPInstanceUID) == (CTImageStorage, "1.2.3")
    assert answer.CommandDataSetType == 0x0101
    with pytest.raises(ValueError, match="not a DIMSE command set"):
        command_set.decode(store_rq()[:-3])


def pdv(control: int, fragment: bytes, context_id: int = 1) -> bytes:
    return struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment


def test_messages_reassemble_fragments_and_refuse_broken_pdvs():
    command = store_rq()
    messages = Messages({1: (CTImageStorage, ExplicitVRLittleEndian)})
    assert list(messages.feed(pdv(1, command[:10]) + pdv(3, command[10:]) + pdv(0, b"ab"))) == []
    (message,) = messages.feed(pdv(2, b"cd"))
    assert (message.command.sop_instance, message.data) == ("1.2.3", b"abcd")
    broken = {
        "data set without a command": pdv(2, b"data"),
        "PDV longer than its PDU": struct.pack(">IBB", 99, 1, 3),
        "PDV header cut short": pdv(3, command)[:5],
        "context never accepted": pdv(3, command, context_id=7),
        "command set that is not one": pdv(3, command[:-3]),
        "command before the data set of the last": pdv(3, command) + pdv(3, command),
    }
    for what, body in broken.items():
        with pytest.raises(ProtocolError):
            list(Messages({1: (CTImageStorage, ExplicitVRLittleEndian)}).feed(body))
            pytest.fail(what)


@pytest.mark.parametrize("max_pdu", [0, 7, 16, 1 << 22])
def test_data_pdus_fit_the_peers_maximum_and_reassemble(max_pdu):
    data = bytes(range(256)) * 3
    messages = Messages({1: (CTImageStorage, ExplicitVRLittleEndian)})
    assert list(messages.feed(pdv(3, store_rq()))) == []
    pdus = list(data_pdus(1, data, max_pdu))
    assert all(len(p) - 6 <= max_pdu for p in pdus) if max_pdu else len(pdus) == 1
    assembled = [m for p in pdus for m in messages.feed(p[6:])]
    assert [m.data for m in assembled] == [data]
