"""ACKs (hl7_bridge/ack.py), checked by another library's parser (python-hl7), and `overread hl7 send`."""

import socket
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import hl7
import pytest

from hl7_bridge.ack import ack_code, acknowledge
from mappings.errors import MappingError
from mappings.orders import map_message
from mappings.v2 import parse
from tests.hl7_golden import DCM4CHE, GOLDEN, mllp_listening

NOW = datetime(2026, 11, 28, 15, 30, 0)
OMI = DCM4CHE / "OMI_O23-ImagingOrder.hl7"


def _ack(message_file: Path, error: MappingError | None = None) -> hl7.Message:
    raw = acknowledge(parse(message_file.read_bytes()), error, control_id="ACK-1", now=NOW)
    return hl7.parse(raw.decode("utf-8"))


def _mapping_error(message_file: Path) -> MappingError:
    with pytest.raises(MappingError) as caught:
        map_message(parse(message_file.read_bytes()))
    return caught.value


def test_aa_mirrors_the_sender_and_echoes_the_control_id():
    ack = _ack(OMI)
    msh, msa = ack.segment("MSH"), ack.segment("MSA")
    assert (str(msh[3]), str(msh[4]), str(msh[5]), str(msh[6])) == (
        "MESA_IM", "XYZ_IMAGE_MANAGER", "MESA_OF", "XYZ_RADIOLOGY",
    )  # fmt: skip
    assert str(msh[9]) == "ACK^O23^ACK" and str(msh[10]) == "ACK-1" and str(msh[7]) == "20261128153000"
    assert (str(msa[1]), str(msa[2])) == ("AA", str(parse(OMI.read_bytes()).msh.field(10).value))
    assert "ERR" not in [str(s[0]) for s in ack]


def test_ae_names_the_missing_field_with_its_table_0357_code():
    message = GOLDEN / "orm_missing_pid3.hl7"
    ack = _ack(message, _mapping_error(message))
    assert str(ack.segment("MSA")[1]) == "AE"
    err = ack.segment("ERR")
    assert str(err[2]) == "PID^1^3"
    assert str(err[3]) == "101^Required field missing^HL70357"
    assert str(err[4]) == "E" and str(err[8]) == "Patient identifier list is missing"


def test_an_unsupported_message_type_is_rejected():
    message = DCM4CHE / "OMG_O19-GeneralClinicalOrder-Eyecare.hl7"
    ack = _ack(message, _mapping_error(message))
    assert str(ack.segment("MSA")[1]) == "AR"
    assert str(ack.segment("ERR")[3][0][0]) == "200"


def test_unreadable_input_is_rejected_with_no_control_id_to_echo():
    raw = acknowledge(None, MappingError(100, "MSH", "not an HL7 v2 message"), control_id="ACK-2", now=NOW)
    ack = hl7.parse(raw.decode())
    assert (str(ack.segment("MSA")[1]), str(ack.segment("MSA")[2])) == ("AR", "")


def test_enhanced_mode_answers_with_commit_codes():
    text = OMI.read_bytes().decode("utf-8").replace("\r\n", "\r").replace("\n", "\r")
    msh, rest = text.split("\r", 1)
    fields = msh.split("|")
    fields += [""] * (17 - len(fields))
    fields[14], fields[15] = "AL", "NE"  # MSH-15 accept ack: always; MSH-16 application ack: never
    enhanced = parse(("|".join(fields) + "\r" + rest).encode("utf-8"))
    assert ack_code(enhanced, None) == "CA"
    assert ack_code(enhanced, MappingError(101, "PID-3", "missing")) == "CE"
    assert ack_code(enhanced, MappingError(200, "MSH-9", "unsupported")) == "CR"


def test_error_text_is_escaped_with_the_message_delimiters():
    error = MappingError(102, "OBR-7", "bad | time ^ here & \\ there\nnext line")
    ack = hl7.parse(acknowledge(parse(OMI.read_bytes()), error, control_id="X", now=NOW).decode())
    assert len(ack.segment("ERR")) == 9  # the delimiters in the text did not split ERR-8
    text = ack.unescape(str(ack.segment("ERR")[8])).replace("\r", "\n")  # python-hl7 reads \.br\ as CR
    assert text == "bad | time ^ here & \\ there\nnext line"


@pytest.fixture
def ack_server() -> Iterator[int]:
    """A real MLLP listener on 127.0.0.1 that answers every message with our ACK."""

    async def answer(message: bytes) -> bytes:
        try:
            parsed = parse(message)
        except MappingError as exc:
            return acknowledge(None, exc, control_id="S", now=datetime.now())
        return acknowledge(parsed, None, control_id="S", now=datetime.now())

    with mllp_listening(answer) as port:
        yield port


@pytest.mark.slow
def test_overread_hl7_send_prints_the_ack(ack_server):
    command = [sys.executable, "-m", "overread.cli", "hl7", "send", str(OMI), "--port", str(ack_server)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("MSH|^~\\&|MESA_IM|XYZ_IMAGE_MANAGER|MESA_OF|XYZ_RADIOLOGY|")
    assert lines[1] == f"MSA|AA|{parse(OMI.read_bytes()).msh.field(10).value}"


@pytest.mark.slow
def test_overread_hl7_send_says_when_nobody_listens():
    with socket.socket() as probe:  # a port nobody listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "overread.cli", "hl7", "send", str(OMI), "--port", str(port)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert f"no ACK from 127.0.0.1:{port}" in result.stderr
