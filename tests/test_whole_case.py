"""A whole second-opinion case through real sockets, in one test, on ``overread serve``:

an OMI^O23 in over MLLP (python-hl7's client) → the ImagingStudy linked from a real PACS (Orthanc,
loaded by DCMTK's storescu) and retrieved by C-MOVE → a final report with a major discrepancy posted
over FHIR → the ORU^R01 at the EHR's receiver (python-hl7's server) → the Task completed → the
Subscription's notification at its HTTP endpoint. Orthanc needs the private network namespace.
"""

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import hl7.client
import httpx
import pytest
from pydicom import dcmread

from dicom_bridge.sample_pacs import sample_path
from testbed.orthanc import Modalities, Orthanc
from testbed.ports import free_port
from tests.conftest import FHIR_JSON
from tests.hl7_golden import OMI
from tests.peers import HttpReceiver, Receiver
from tests.processes import fhir_base, serve_env, start_serve

pytestmark = pytest.mark.orthanc

DICOM_PORT = free_port()  # our Storage SCP, known to Orthanc as the move destination OVERREAD
DISCREPANCY = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"


@pytest.fixture(scope="module")
def orthanc_modalities() -> Modalities:
    return {"overread": ["OVERREAD", "127.0.0.1", DICOM_PORT]}


@pytest.fixture
def server(database_url: str, orthanc: Orthanc, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``overread serve`` with Orthanc as its PACS and the two receivers as its destinations."""
    ct = dcmread(sample_path("CT_small.dcm"))
    ct.AccessionNumber = "AccessionNumber"  # IPC-1 of the OMI^O23 fixture
    ct.PatientID, ct.IssuerOfPatientID = "PID_1", "ADT1"  # its PID-3, the issuer mapped in the config below
    ct.save_as(tmp_path / "ct.dcm")
    orthanc.clear()
    orthanc.load([tmp_path / "ct.dcm"])
    with ExitStack() as cleanup:  # whatever started is stopped, even when a later step fails
        ehr = Receiver().start()
        cleanup.callback(ehr.close)
        hook = HttpReceiver().start()
        cleanup.callback(hook.stop)
        config = tmp_path / "overread.yaml"
        config.write_text(
            f"pacs:\n  - {{name: orthanc, ae_title: ORTHANC, host: 127.0.0.1, port: {orthanc.dicom_port}}}\n"
            "linking: {first_retry_seconds: 0.2, issuers: {ADT1: 'urn:overread:assigning-authority:ADT1'}}\n"
            f"hl7:\n  destinations:\n    - {{name: ehr, host: 127.0.0.1, port: {ehr.port}, ack_timeout_seconds: 5}}\n"
            "  delivery: {first_retry_seconds: 0.2, poll_seconds: 0.05}\n"
            f"subscriptions: {{first_retry_seconds: 0.2, allowed_endpoints: ['{hook.url}']}}\n"
        )
        env = serve_env(database_url, tmp_path, config, dicom_port=str(DICOM_PORT))
        process = start_serve(env)
        cleanup.callback(process.wait, 20)
        cleanup.callback(process.terminate)
        yield {
            "fhir": fhir_base(env),
            "mllp": int(env["OVERREAD_MLLP_PORT"]),
            "ehr": ehr,
            "hook": hook,
            "images": tmp_path / "images",
        }


def test_order_in_images_linked_report_out_case_completed_subscriber_notified(server: dict[str, Any]) -> None:
    fhir, hook, ehr = server["fhir"], server["hook"], server["ehr"]
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "the referrer's inbox",
        "criteria": "DiagnosticReport?status=final",
        "channel": {"type": "rest-hook", "endpoint": hook.url, "payload": "application/fhir+json"},
    }
    sub_id = httpx.post(f"{fhir}/Subscription", json=subscription, headers=FHIR_JSON).json()["id"]
    _until(lambda: _get(f"{fhir}/Subscription/{sub_id}")["status"] == "active", "no handshake")

    client = hl7.client.MLLPClient("127.0.0.1", server["mllp"])
    try:
        ack = client.send_message(OMI.decode("latin-1"))
    finally:
        client.close()
    assert b"MSA|AA|1001125" in ack

    def case() -> dict[str, Any]:
        return _get(f"{fhir}/Task")["entry"][0]["resource"]

    _until(lambda: case().get("businessStatus", {}).get("coding", [{}])[0].get("code") == "images-available")
    task = case()
    (study,) = [e["resource"] for e in _get(f"{fhir}/ImagingStudy")["entry"]]
    assert study["basedOn"] == [task["focus"]] and study["numberOfInstances"] == 1
    assert len(list(server["images"].glob("*/*/*.dcm"))) == 1  # retrieved by C-MOVE into our store

    order = _get(f"{fhir}/{task['focus']['reference']}")
    report = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "basedOn": [task["focus"]],
        "subject": order["subject"],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4"}]},
        "imagingStudy": [{"reference": f"ImagingStudy/{study['id']}"}],
        "resultsInterpreter": [{"display": "Dr Second Reader"}],
        "conclusion": "Missed 9 mm nodule in the right lower lobe.",
        "conclusionCode": [{"coding": [{"system": DISCREPANCY, "code": "major"}]}],
    }
    posted = httpx.post(f"{fhir}/DiagnosticReport", json=report, headers=FHIR_JSON)
    assert posted.status_code == 201, posted.text

    _until(lambda: case()["status"] == "completed", "the final report did not complete the case")
    _until(lambda: len(ehr.accepted) == 1, "no ORU^R01 at the receiver")
    oru = ehr.accepted[0]
    disc = next(obx for obx in oru.segments("OBX") if str(obx[3]).startswith("DISC"))
    assert str(disc[5]) == "major^Major discrepancy^99OVRD" and str(oru.segment("OBR")[25]) == "F"
    _until(lambda: any(r.method == "PUT" for r in hook.requests), "no Subscription notification")
    notified = next(r for r in hook.requests if r.method == "PUT")
    assert notified.resource["id"] == posted.json()["id"] and notified.path.endswith(f"/{posted.json()['id']}")


def _get(url: str) -> Any:
    try:
        response = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def _until(condition: Callable[[], bool], why: str = "timed out", seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            if condition():
                return
        except (TypeError, KeyError, IndexError):
            pass  # not there yet
        assert time.monotonic() < deadline, why
        time.sleep(0.1)
