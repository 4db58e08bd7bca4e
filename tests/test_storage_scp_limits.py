"""The Storage SCP's limits (docs/reliability.md, "DICOM"): idle connections are not associations and
are closed (ARTIM, PS3.8 9.1.5; the oldest first past a cap), a data set is held in memory only up to
a budget, the image store keeps a free-space floor. Real peers (DCMTK's storescu and echoscu,
pynetdicom) for what a peer does; raw sockets for what none would (connect and say nothing, send an
A-ASSOCIATE-RQ a byte at a time, stop a data set midway)."""

import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import build_context, evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from dicom_bridge import command_set
from dicom_bridge.command_set import OUT_OF_RESOURCES, SUCCESS
from dicom_bridge.image_store import ImageStore, StoreFull
from dicom_bridge.storage_scp import Limits
from dicom_bridge.upper_layer import (
    ABORT,
    ASSOCIATE_AC,
    P_DATA_TF,
    Budget,
    Messages,
    accepted,
    command_pdu,
    pdu,
    read_pdu,
    request,
)
from overread.settings import Settings
from tests.test_storage_scp import AE_TITLE, VERIFICATION, Scp, associate, dcmtk, sample, saved, stored

IDLE = 40  # more than the 32 associations the SCP takes at once
#: Generous: a bound for a loaded machine, not a latency claim.
WAIT = 20.0


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Scp]]:
    """Starts a Storage SCP with the limits given (the defaults otherwise); stopped at the end."""
    started: list[Scp] = []

    def start_(**limits: object) -> Scp:
        started.append(Scp(ImageStore(tmp_path / "store"), limits=Limits(**limits)))  # type: ignore[arg-type]
        return started[-1]

    yield start_
    for scp in started:
        scp.scp.stop()


@pytest.fixture
def idle() -> Iterator[Callable[[int, int], list[socket.socket]]]:
    """Opens connections to a port that send nothing; all closed at the end."""
    opened: list[socket.socket] = []

    def open_(port: int, count: int) -> list[socket.socket]:
        new = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
        opened.extend(new)
        return new

    yield open_
    for sock in opened:
        sock.close()


def closed_by_scp(sock: socket.socket) -> bool:
    """Waits (up to the socket's timeout) for the SCP to close ``sock``; False if it said something."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_idle_connections_are_not_associations(start, idle, tmp_path):
    running = start()
    idle(running.port, IDLE)
    assert dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(running.port)).returncode == 0
    path, original = saved(tmp_path, "CT_small.dcm")
    result = dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(running.port), str(path))
    assert result.returncode == 0, result.stderr
    assert stored(running.store, original).SOPInstanceUID == original.SOPInstanceUID


def test_a_connection_that_sends_no_associate_rq_is_closed(start, idle):
    running = start(associate_timeout=0.2)
    (sock,) = idle(running.port, 1)
    assert closed_by_scp(sock)
    assert associate(running.port).send_c_echo().Status == SUCCESS


def test_an_associate_rq_sent_a_byte_at_a_time_meets_one_deadline(start, idle):
    """A socket timeout counts per read: a byte every 50 ms would never meet a 0.5 s one."""
    running = start(associate_timeout=0.5)
    (sock,) = idle(running.port, 1)
    sock.settimeout(0.05)  # the pace of the bytes, and how long each waits for the SCP to close
    rq = associate_rq_bytes()
    for sent in range(len(rq)):
        try:
            sock.sendall(rq[sent : sent + 1])
            if sock.recv(1) == b"":
                break
        except TimeoutError:
            continue
        except OSError:  # reset: closed
            break
    else:
        pytest.fail("the SCP waited for the whole A-ASSOCIATE-RQ")
    assert sent < len(rq) - 1


def test_past_the_cap_of_waiting_connections_the_oldest_is_closed(start, idle):
    running = start(max_pending=4, associate_timeout=60)
    sockets = idle(running.port, IDLE)
    assert dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(running.port)).returncode == 0
    # echoscu's connection was the 41st waiting one: it closed the 37th, and 3 still wait.
    assert all(closed_by_scp(sock) for sock in sockets[: IDLE - 3])
    assert select.select(sockets[IDLE - 3 :], [], [], 0)[0] == []


def test_every_store_succeeds_while_idle_connections_come_and_go(start, tmp_path):
    """40 idle connections kept open (each one the SCP closes is opened again) while storescu stores."""
    running = start(associate_timeout=0.5)
    stop, reopened = threading.Event(), threading.Event()
    counts = {"closed": 0}

    def keep_idle() -> None:
        sockets = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(IDLE)]
        while not stop.is_set():
            for gone in select.select(sockets, [], [], 0.1)[0]:
                gone.close()
                sockets[sockets.index(gone)] = socket.create_connection(("127.0.0.1", running.port))
                counts["closed"] += 1
            if counts["closed"] >= IDLE:
                reopened.set()
        for sock in sockets:
            sock.close()

    thread = threading.Thread(target=keep_idle, daemon=True)
    thread.start()
    try:
        assert reopened.wait(30)  # the first 40 were closed by the ARTIM and replaced
        files = [saved(tmp_path, "CT_small.dcm", f"ACC-{n}") for n in range(8)]
        for path, _ in files:
            result = dcmtk("storescu", "-aec", AE_TITLE, "127.0.0.1", str(running.port), str(path))
            assert result.returncode == 0, result.stderr
        assert thread.is_alive()
    finally:
        stop.set()
        thread.join(10)
    for _, original in files:
        assert stored(running.store, original).SOPInstanceUID == original.SOPInstanceUID


def test_settings_set_the_scps_limits():
    settings = Settings(
        dicom_max_associations=3,
        dicom_max_pending=4,
        dicom_associate_timeout=5,
        dicom_idle_timeout=6,
        dicom_max_data_set_bytes=7,
        dicom_max_buffered_bytes=8,
        dicom_max_associations_per_address=9,
        dicom_max_association_time=10,
    )
    assert settings.dicom_limits() == Limits(3, 4, 5.0, 6.0, 7, 8, 9, 10.0)
    assert Settings().dicom_limits() == Limits()


# Associations per peer address, and in time.


def test_one_address_holds_only_its_share_of_the_associations(start):
    running = start(max_associations_per_address=2)
    held = [associate(running.port) for _ in range(2)]
    assert all(assoc.is_established for assoc in held)
    refused = dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(running.port))
    assert refused.returncode != 0 and "Reason: Local Limit Exceeded" in refused.stderr, refused.stderr
    other = associate(running.port, source="127.0.0.2")  # another host still gets in
    assert other.is_established and other.send_c_echo().Status == SUCCESS
    other.release()
    held.pop().release()
    assert dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(running.port)).returncode == 0  # room again
    held.pop().release()


def test_an_association_past_its_time_is_aborted_however_busy(start, caplog):
    running = start(max_association_time=0.5)
    aborted = threading.Event()
    assoc = associate(running.port, evt_handlers=[(evt.EVT_ABORTED, lambda _: aborted.set())])
    # A C-ECHO every 50 ms: never idle; only the association's time ends it.
    deadline = time.monotonic() + WAIT
    while assoc.is_established and time.monotonic() < deadline:
        assoc.send_c_echo()
        aborted.wait(0.05)
    assert aborted.wait(WAIT) and assoc.is_aborted
    wait_for(lambda: not running.scp._associations)
    assert [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()] == [
        f"DICOM association of SCU from 127.0.0.1:{assoc.local['port']} aborted: open for 0.5 s"
    ]
    assert dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(running.port)).returncode == 0


def test_an_association_past_its_time_is_aborted_inside_a_pdu(start):
    """A PDU sent a byte every 50 ms: a socket timeout, which counts per read, would never end it."""
    running = start(max_association_time=0.5)
    scu = RawScu(running.port)
    scu.sock.sendall(data_pdu(b"x" * 1000, last=False)[:10])
    deadline = time.monotonic() + WAIT
    while not select.select([scu.sock], [], [], 0.05)[0] and time.monotonic() < deadline:
        scu.sock.sendall(b"x")
    scu.sock.settimeout(WAIT)
    answer = read_pdu(scu.stream)
    assert answer is not None and answer[0] == ABORT
    scu.close()


# Data sets held while they arrive.


def large(pixels: int) -> Dataset:
    ds = sample("CT_small.dcm")
    ds.Rows, ds.Columns = 256, pixels // 512
    ds.PixelData = bytes(range(256)) * (pixels // 256)
    return ds


def test_a_data_set_over_its_limit_fails_with_out_of_resources_and_the_association_goes_on(start):
    running = start(max_data_set=128 << 10)
    assoc = associate(running.port)
    too_large = large(1 << 20)
    assert assoc.send_c_store(too_large).Status == OUT_OF_RESOURCES
    small = sample("CT_small.dcm")
    assert assoc.send_c_store(small).Status == SUCCESS
    assoc.release()
    assert not running.store.path(
        too_large.StudyInstanceUID, too_large.SeriesInstanceUID, too_large.SOPInstanceUID
    ).exists()
    assert stored(running.store, small).SOPInstanceUID == small.SOPInstanceUID
    assert running.scp.budget.used == 0


def store_command(ds: Dataset) -> bytes:
    primitive = C_STORE()
    primitive.MessageID, primitive.Priority = 1, 0
    primitive.AffectedSOPClassUID, primitive.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    primitive.DataSet = BytesIO(b"")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return encode(message.command_set, True, True)  # type: ignore[return-value]


def data_pdu(fragment: bytes, last: bool) -> bytes:
    return pdu(P_DATA_TF, (len(fragment) + 2).to_bytes(4, "big") + bytes((1, 0x02 if last else 0x00)) + fragment)


class RawScu:
    """A requestor on a bare socket, to stop a data set midway: what no peer does when asked."""

    def __init__(self, port: int) -> None:
        storage, echo = build_context(CTImageStorage, [ExplicitVRLittleEndian]), build_context(VERIFICATION)
        storage.context_id, echo.context_id = 1, 3
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.sendall(request("RAW", AE_TITLE, [storage, echo], []))
        self.stream = self.sock.makefile("rb")
        answer = read_pdu(self.stream)
        assert answer is not None and answer[0] == ASSOCIATE_AC
        accepted(answer[1], [storage, echo])

    def begin(self, ds: Dataset) -> None:
        self.sock.sendall(command_pdu(1, store_command(ds)))

    def send(self, fragment: bytes, last: bool = False) -> None:
        self.sock.sendall(data_pdu(fragment, last))

    def status(self) -> int:
        answer = read_pdu(self.stream)
        assert answer is not None and answer[0] == P_DATA_TF
        status = command_set.decode(answer[1][6:]).status
        assert status is not None
        return status

    def close(self) -> None:
        self.sock.close()


def encoded(ds: Dataset) -> bytes:
    return encode(ds, False, True)  # type: ignore[return-value]


def wait_for(condition: Callable[[], bool]) -> None:
    """What the SCP's thread does is seen only in its state: look until it holds (10 s at most)."""
    end = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < end, "the SCP did not get there"
        time.sleep(0.01)


def test_fragments_without_the_last_bit_are_dropped_past_the_limit(start):
    running = start(max_data_set=256 << 10)
    scu = RawScu(running.port)
    try:
        ds = sample("CT_small.dcm")
        scu.begin(ds)
        for _ in range(64):  # 4 MiB, 16 times the limit
            scu.send(bytes(64 << 10))
        wait_for(lambda: running.scp.budget.used == 0)  # past the limit it held nothing more
        scu.send(b"", last=True)
        assert scu.status() == OUT_OF_RESOURCES
    finally:
        scu.close()
    assert associate(running.port).send_c_echo().Status == SUCCESS


def test_all_associations_share_one_budget(start):
    """While one association holds 120 KiB of a data set, another's 39 KiB instance is refused."""
    running = start(max_buffered=144 << 10)
    first, second = large(128 << 10), sample("CT_small.dcm", "ACC-SECOND")
    first.AccessionNumber = "ACC-FIRST"
    data = encoded(first)
    scu = RawScu(running.port)
    try:
        scu.begin(first)
        scu.send(data[: 120 << 10])
        wait_for(lambda: running.scp.budget.used == 120 << 10)
        assoc = associate(running.port)
        assert assoc.send_c_store(second).Status == OUT_OF_RESOURCES
        scu.send(data[120 << 10 :], last=True)
        assert scu.status() == SUCCESS
        assert assoc.send_c_store(second).Status == SUCCESS  # the first's bytes are free again
        assoc.release()
    finally:
        scu.close()
    assert stored(running.store, first).AccessionNumber == "ACC-FIRST"
    assert stored(running.store, second).AccessionNumber == "ACC-SECOND"
    wait_for(lambda: running.scp.budget.used == 0)


def test_messages_hold_no_more_than_their_budget():
    budget = Budget(per_message=100, total=1000)
    messages = Messages({1: (CTImageStorage, ExplicitVRLittleEndian)}, budget)
    command = store_command(sample("CT_small.dcm"))
    assert list(messages.feed(command_pdu(1, command)[6:])) == []
    for _ in range(10):
        assert list(messages.feed(data_pdu(bytes(40), last=False)[6:])) == []
        assert messages.buffered <= 100 and budget.used <= 100
    (message,) = messages.feed(data_pdu(b"", last=True)[6:])
    assert message.too_large and message.data is None
    assert budget.used == 0


# The image store's floor.


def test_a_store_below_the_free_space_floor_fails_with_out_of_resources(tmp_path):
    store = ImageStore(tmp_path / "store", min_free=1 << 62)  # more than any disk has
    running = Scp(store)
    try:
        assoc = associate(running.port)
        ds = sample("CT_small.dcm")
        assert assoc.send_c_store(ds).Status == OUT_OF_RESOURCES
        assert assoc.send_c_echo().Status == SUCCESS
        assoc.release()
    finally:
        running.scp.stop()
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.dcm"))
    with pytest.raises(StoreFull, match="keeps 4611686018427387904 bytes free"):
        store.write(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, b"x")
    assert ImageStore(tmp_path / "store", min_free=1 << 20).write("1.2", "1.2.3", "1.2.3.4", b"x").read_bytes() == b"x"


def associate_rq_bytes() -> bytes:
    storage = build_context(CTImageStorage)
    storage.context_id = 1
    return request("TRICKLE", AE_TITLE, [storage], [])


# Out of file descriptors.

STARVED_SCP = """
import logging, os, resource, sys
from pathlib import Path
from dicom_bridge.image_store import ImageStore
from dicom_bridge.storage_scp import Limits, StorageScp, _Server

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
accepts = 0
get_request = _Server.get_request

def counted(self):
    global accepts
    accepts += 1
    return get_request(self)

_Server.get_request = counted
scp = StorageScp("OVERREAD", "127.0.0.1", 0, ImageStore(Path(sys.argv[1])), limits=Limits(max_pending=1000)).start()
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
print(scp.port, flush=True)
for _ in sys.stdin:
    print(accepts, flush=True)
"""


@pytest.mark.slow
def test_out_of_file_descriptors_the_scp_pauses_says_so_once_and_recovers(tmp_path, idle):
    """A process at its descriptor limit: accept() fails while connections wait; no busy loop, no flood."""
    child = subprocess.Popen(
        [sys.executable, "-c", STARVED_SCP, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        port = int(child.stdout.readline())
        sockets = idle(port, 20)  # 8 descriptors left: the rest wait in the listen queue
        assert select.select([child.stderr], [], [], 10)[0], "no word of the failing accept()"
        assert "cannot accept a connection" in child.stderr.readline()

        def accepts() -> int:
            child.stdin.write("\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            return int(child.stdout.readline())  # type: ignore[union-attr]

        before = accepts()
        time.sleep(1)  # a window to count accept() calls in: a busy loop makes thousands
        assert accepts() - before <= 20
        for sock in sockets:
            sock.close()
        result = dcmtk("echoscu", "-aec", AE_TITLE, "127.0.0.1", str(port))
        assert result.returncode == 0, result.stderr
    finally:
        child.kill()
        _, errors = child.communicate(timeout=10)
    assert "accepts connections again" in errors
    assert errors.count("cannot accept") <= 2  # once per time it ran out (the queue's rush may be another)
