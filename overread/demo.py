"""``overread demo``: one second-opinion case, end to end, on the embedded defaults.

Today: an order arrives as a FHIR transaction (Organization, Practitioner, Patient,
ServiceRequest and the Task that tracks the case) and is read back with a chained search;
a second order for the same patient arrives as HL7 ORM^O01 over MLLP and is acknowledged
after it is stored. The image-linking worker then finds the first order's study on the
bundled sample PACS (a pynetdicom Q/R SCP serving pydicom's own test files), links the
ImagingStudy and retrieves it by C-MOVE into our Storage SCP; the second order's study is
on no PACS until the modality pushes it (C-STORE), which links that case at once. Rerunning
adds nothing (conditional creates; the resent HL7 message gets its first ACK back; the
pushed study keeps its UIDs). Later steps (the report) extend this script.
"""

import asyncio
import json
import time
from importlib.resources import files
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE

from cases.task import IMAGES_AVAILABLE, IMAGES_PENDING
from dicom_bridge.sample_pacs import DEMO_ACCESSION, DEMO_PATIENT, SAMPLE_ISSUER, SamplePacs, sample_path
from dicom_bridge.tuning import ASSOCIATION_HANDLERS
from fhir_server import dates
from fhir_server.db import Database
from fhir_server.executor import Executor, for_database
from hl7_bridge.ack import acknowledge
from hl7_bridge.mllp import send, serving_in_thread
from mappings.v2 import parse
from overread.app import create_app, mllp_listener, workers
from overread.config import Destination, Hl7, Linking, OverreadConfig, PacsPeer
from overread.migrate import upgrade
from overread.server import running
from overread.settings import Settings, get_settings

ORM = "samples/second-opinion-order.hl7"
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
MRN_SYSTEM = "urn:oid:2.16.840.1.113883.3.72.5.9.1.2"
MRN = f"{MRN_SYSTEM}|{DEMO_PATIENT}"
#: The sample studies' IssuerOfPatientID is the demo hospital's MRN system: the patient match links them.
ISSUERS = {SAMPLE_ISSUER: MRN_SYSTEM}
CONFORMANCE = "https://overread.org/fhir"


def run(settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    db = Database(settings.database_url)
    upgrade(db.engine)
    order = json.loads(files("overread").joinpath("samples/second-opinion-order.json").read_text())
    print(f"Overread demo on {db.engine.url.render_as_string(hide_password=True)}")
    executor = for_database(db)
    with (
        running(create_app(settings, db, executor=executor)) as root,
        httpx.Client(base_url=f"{root}/fhir", headers=FHIR_JSON) as fhir,
    ):
        print(f"server up at {root}/fhir (FHIR {fhir.get('metadata').json()['fhirVersion']})\n")
        print("1. The order arrives as a FHIR transaction Bundle (conditional creates: rerunning adds nothing)")
        response = fhir.post("", json=order)
        response.raise_for_status()
        for entry in response.json()["entry"]:
            location = entry["response"]["location"].removeprefix(f"{root}/fhir/")
            print(f"   {entry['response']['status']:<12} {location}")

        print("\n2. The case, found by the patient's MRN (chained search, _include of the order)")
        found = fhir.get("Task", params={"patient.identifier": MRN, "_include": "Task:focus"}).json()
        for entry in found.get("entry", []):
            _describe(entry["resource"])
        task = next(e["resource"] for e in found["entry"] if e["resource"]["resourceType"] == "Task")

        print("\n3. A second order arrives from the hospital's EHR as HL7 ORM^O01 over MLLP")
        ack = asyncio.run(_send_over_mllp(settings, executor, files("overread").joinpath(ORM).read_bytes()))
        print("   ACK: " + ack.decode().replace("\r", "\n        ").rstrip())
        print("   The same patient (matched by MRN across both doors) now has these cases:")
        found = fhir.get("Task", params={"patient.identifier": MRN, "_include": "Task:focus"}).json()
        for entry in found.get("entry", []):
            _describe(entry["resource"])
        orders = [e["resource"] for e in found["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]

        print("\n4. Images: the linking worker asks the source PACS (the bundled sample PACS) for each order")
        received: list[bytes] = []
        with SamplePacs() as pacs, serving_in_thread(_ehr(received)) as ehr_port:
            peer = PacsPeer(name="sample", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, retrieve="c-move")
            ehr = Destination(name="ehr", host="127.0.0.1", port=ehr_port, ack_timeout_seconds=10)
            cfg = OverreadConfig(pacs=[peer], linking=Linking(issuers=ISSUERS), hl7=Hl7(destinations=[ehr]))
            with workers(settings.model_copy(update={"dicom_port": 0}), executor, cfg) as scp:
                pacs.destinations[settings.dicom_ae_title] = ("127.0.0.1", scp.port)
                print(
                    f"   sample PACS {pacs.ae_title} on 127.0.0.1:{pacs.port}, our Storage SCP on 127.0.0.1:{scp.port}"
                )
                on_pacs, missing = sorted(orders, key=lambda o: _accession(o) != DEMO_ACCESSION)
                _wait(fhir, on_pacs, IMAGES_AVAILABLE)
                _wait(fhir, missing, IMAGES_PENDING, IMAGES_AVAILABLE)  # the latter on a rerun
                _show_cases(fhir, orders)
                print("\n5. The modality pushes the second order's study to our Storage SCP (C-STORE)")
                _push(settings.dicom_ae_title, scp.port, _accession(missing))
                _wait(fhir, missing, IMAGES_AVAILABLE)
                _show_cases(fhir, orders)
                for study in fhir.get("ImagingStudy", params={"subject.identifier": MRN}).json().get("entry", []):
                    _describe(study["resource"])
                print(f"   image store: {settings.image_store.resolve()}")

                print("\n6. The second reader's report: final, major discrepancy (RADPEER 2b)")
                report, created = _report(fhir, on_pacs)
                _wait(fhir, on_pacs, "completed", field="status")
                deadline = time.monotonic() + 20
                while created and not received and time.monotonic() < deadline:
                    time.sleep(0.1)
                task = _case(fhir, on_pacs["id"])
                print(f"   DiagnosticReport/{report['id']}: {report['status']}, {report['conclusion']}")
                output = task["output"][0]["valueReference"]
                print(f"   Task/{task['id']}: status {task['status']}, output {output}, businessStatus {_status(task)}")
                if not created:
                    print(
                        "   (sent to the EHR by an earlier run: each report version goes out once; GET /hl7/outbound)"
                    )
                for message in received[-1:]:
                    print(f"   The EHR's MLLP receiver (127.0.0.1:{ehr_port}) got the ORU^R01 and answered AA:")
                    print("      " + message.decode().replace("\r", "\n      ").rstrip())

    db.dispose()
    print("\nLook at it yourself: `make serve`, then")
    for path in (f"Task/{task['id']}", f"Task?patient.identifier={MRN}&_include=Task:focus", "metadata"):
        url = f"{_public_root(settings)}/fhir/{path}".replace("|", "%7C")
        print(f"   curl -s '{url}'")
    return 0


async def _send_over_mllp(settings: Settings, executor: Executor, message: bytes) -> bytes:
    """Start the MLLP intake on a free port, send ``message`` as a sender would, return the ACK."""
    # Files hold segments one per line; on the wire each ends in CR.
    wire = b"\r".join(message.splitlines()) + b"\r"
    async with mllp_listener(settings.model_copy(update={"mllp_port": 0}), executor) as mllp:
        return await send("127.0.0.1", mllp.port, wire)


def _case(fhir: httpx.Client, order_id: str) -> dict[str, Any]:
    return dict(fhir.get("Task", params={"focus": f"ServiceRequest/{order_id}"}).json()["entry"][0]["resource"])


def _status(task: dict[str, Any]) -> str:
    return str(task.get("businessStatus", {}).get("coding", [{}])[0].get("code", "none yet"))


def _wait(
    fhir: httpx.Client, order: dict[str, Any], *codes: str, field: str = "businessStatus", timeout: float = 20
) -> None:
    """The workers run in the background: wait until the order's case reaches one of ``codes``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = _case(fhir, order["id"])
        if (_status(task) if field == "businessStatus" else task.get(field)) in codes:
            return
        time.sleep(0.1)


def _report(fhir: httpx.Client, order: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Post the second reader's final report on ``order`` (conditional: a rerun posts none)."""
    reader = {
        "resourceType": "Practitioner",
        "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": "1942587604"}],
        "name": [{"family": "Lindgren", "given": ["Maja"], "prefix": ["Dr"]}],
    }
    npi = "identifier=http://hl7.org/fhir/sid/us-npi|1942587604"
    practitioner = fhir.post("Practitioner", json=reader, headers={"If-None-Exist": npi}).json()
    (study,) = fhir.get("ImagingStudy", params={"basedon": f"ServiceRequest/{order['id']}"}).json()["entry"]
    report = {
        "resourceType": "DiagnosticReport",
        "identifier": [{"system": "https://overread.org/fhir/demo-report", "value": order["id"]}],
        "basedOn": [{"reference": f"ServiceRequest/{order['id']}"}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}]},
        "subject": order["subject"],
        "issued": "2026-11-28T10:30:00+01:00",
        "resultsInterpreter": [{"reference": f"Practitioner/{practitioner['id']}"}],
        "imagingStudy": [{"reference": f"ImagingStudy/{study['resource']['id']}"}],
        "conclusion": "Spiculated 14 mm right upper lobe nodule, not a benign granuloma: biopsy advised.",
        "conclusionCode": [
            {"coding": [{"system": f"{CONFORMANCE}/CodeSystem/second-opinion-discrepancy", "code": "major"}]},
            {"coding": [{"system": f"{CONFORMANCE}/CodeSystem/radpeer", "code": "2b"}]},
        ],
    }
    criteria = f"identifier=https://overread.org/fhir/demo-report|{order['id']}"
    response = fhir.post("DiagnosticReport", json=report, headers={"If-None-Exist": criteria})
    response.raise_for_status()
    return dict(response.json()), response.status_code == 201


def _ehr(received: list[bytes]) -> Any:
    """The referrer's EHR: an MLLP receiver that keeps each message and answers AA."""

    async def handle(message: bytes) -> bytes:
        received.append(message)
        return acknowledge(parse(message), None, control_id=f"EHR{len(received)}", now=dates.now())

    return handle


def _show_cases(fhir: httpx.Client, orders: list[dict[str, Any]]) -> None:
    for order in orders:
        task = _case(fhir, order["id"])
        reason = f" ({task['statusReason']['text']})" if "statusReason" in task else ""
        print(f"   {_accession(order)}: Task/{task['id']} businessStatus {_status(task)}{reason}")


def _accession(order: dict[str, Any]) -> str:
    typed = (i for i in order["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN")
    return str(next(typed)["value"])


def _push(ae_title: str, port: int, accession: str) -> None:
    """Send a CT study for ``accession`` as a modality would: C-STORE, UIDs fixed so reruns resend it."""
    ds = dcmread(sample_path("CT_small.dcm"))
    ds.AccessionNumber, ds.PatientID, ds.IssuerOfPatientID = accession, DEMO_PATIENT, SAMPLE_ISSUER
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(ds, keyword, generate_uid(entropy_srcs=["overread demo", accession, keyword]))
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ae = AE("MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title, evt_handlers=ASSOCIATION_HANDLERS)
    if assoc.is_established:
        status = assoc.send_c_store(ds)
        assoc.release()
        print(f"   C-STORE {accession}: status 0x{int(status.Status):04X}")


def _describe(resource: dict[str, Any]) -> None:
    match resource["resourceType"]:
        case "Task":
            about = f", {resource['description']}" if "description" in resource else ""
            print(f"   Task/{resource['id']}: status {resource['status']}{about}")
        case "ServiceRequest":
            ids = ", ".join(i["value"] for i in resource.get("identifier", []))
            code = resource["code"]
            what = code.get("text") or code["coding"][0].get("display", code["coding"][0]["code"])
            print(f"   ServiceRequest/{resource['id']}: {what} ({ids}), {resource.get('priority', 'routine')}")
        case "ImagingStudy":
            orders = ", ".join(b["reference"] for b in resource.get("basedOn", []))
            print(
                f"   ImagingStudy/{resource['id']}: {resource['identifier'][0]['value']}, "
                f"{resource.get('numberOfSeries', 0)} series, {resource.get('numberOfInstances', 0)} instances, "
                f"based on {orders}"
            )


def _public_root(settings: Settings) -> str:
    return settings.public_base_url.removesuffix("/fhir") or f"http://{settings.http_host}:{settings.http_port}"
