"""`overread serve` as a user runs it: one process, the FHIR API, the MLLP intake and the DICOM side together."""

import subprocess
import time
from pathlib import Path

import httpx
import pytest

from dicom_bridge.sample_pacs import SamplePacs, sample_path
from testbed.ports import free_port
from tests.hl7_golden import DCM4CHE
from tests.processes import OVERREAD, fhir_base, serve_env, start_serve


@pytest.mark.slow
def test_an_order_sent_over_mllp_becomes_a_case_with_its_images_linked_and_retrieved(tmp_path: Path):
    dicom_port = free_port()
    # The source PACS holds the study the OMI^O23 fixture orders (IPC-1 accession "AccessionNumber"), of
    # its patient (PID-3 PID_1^^^ADT1: PatientID with its issuer, mapped to the same identifier system).
    patient = {"PatientID": "PID_1", "IssuerOfPatientID": "ADT1"}
    pacs = SamplePacs(files=[(sample_path("CT_small.dcm"), {"AccessionNumber": "AccessionNumber", **patient})])
    pacs.destinations["OVERREAD"] = ("127.0.0.1", dicom_port)
    pacs.start()
    config = tmp_path / "overread.yaml"
    peer = f"{{name: source, ae_title: {pacs.ae_title}, host: 127.0.0.1, port: {pacs.port}, retrieve: c-move}}"
    issuers = "{ADT1: 'urn:overread:assigning-authority:ADT1'}"
    config.write_text(f"pacs:\n  - {peer}\nlinking:\n  issuers: {issuers}\n")
    env = serve_env(f"sqlite:///{tmp_path / 'serve.db'}", tmp_path, config, dicom_port=str(dicom_port))
    server = start_serve(env)
    try:
        base = fhir_base(env)
        order = DCM4CHE / "OMI_O23-ImagingOrder.hl7"
        sent = subprocess.run(
            [*OVERREAD, "hl7", "send", str(order), "--port", env["OVERREAD_MLLP_PORT"]],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.splitlines()[1] == "MSA|AA|1001125"
        found = httpx.get(f"{base}/Task", params={"_include": "Task:focus"}, timeout=10).json()
        types = sorted(e["resource"]["resourceType"] for e in found["entry"])
        assert (found["total"], types) == (1, ["ServiceRequest", "Task"])
        task = next(e["resource"] for e in found["entry"] if e["resource"]["resourceType"] == "Task")
        deadline = time.monotonic() + 30
        while task.get("businessStatus", {}).get("coding", [{}])[0].get("code") != "images-available":
            assert time.monotonic() < deadline, f"not linked: {task}"
            time.sleep(0.2)
            task = httpx.get(f"{base}/Task/{task['id']}", timeout=10).json()
        (study,) = [e["resource"] for e in httpx.get(f"{base}/ImagingStudy", timeout=10).json()["entry"]]
        assert study["basedOn"] == [task["focus"]]
        assert len(list((tmp_path / "images").glob("*/*/*.dcm"))) == study["numberOfInstances"] == 1
    finally:
        server.terminate()
        server.wait(20)
        pacs.stop()
