"""``overread demo``: one second-opinion case, end to end, on the embedded defaults.

Today: an order arrives as a FHIR transaction (Organization, Practitioner, Patient,
ServiceRequest and the Task that tracks the case) and is read back with a chained search;
a second order for the same patient arrives as HL7 ORM^O01 over MLLP and is acknowledged
after it is stored; the patient's cases and the URLs to look at are printed. Rerunning adds
nothing (conditional creates; the resent HL7 message gets its first ACK back). Later steps
(image linking, the report) extend this script.
"""

import asyncio
import json
from importlib.resources import files
from typing import Any

import httpx

from fhir_server.db import Database
from hl7_bridge.mllp import send
from overread.app import create_app, mllp_listener
from overread.migrate import upgrade
from overread.server import running
from overread.settings import Settings, get_settings

ORM = "samples/second-opinion-order.hl7"
FHIR_JSON = {"content-type": "application/fhir+json", "accept": "application/fhir+json"}
MRN = "urn:oid:2.16.840.1.113883.3.72.5.9.1.2|MRN-004211"


def run(settings: Settings | None = None) -> int:
    settings = settings or get_settings()
    db = Database(settings.database_url)
    upgrade(db.engine)
    order = json.loads(files("overread").joinpath("samples/second-opinion-order.json").read_text())
    print(f"Overread demo on {db.engine.url.render_as_string(hide_password=True)}")
    with running(create_app(settings, db)) as root, httpx.Client(base_url=f"{root}/fhir", headers=FHIR_JSON) as fhir:
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
        ack = asyncio.run(_send_over_mllp(settings, db, files("overread").joinpath(ORM).read_bytes()))
        print("   ACK: " + ack.decode().replace("\r", "\n        ").rstrip())
        print("   The same patient (matched by MRN across both doors) now has these cases:")
        found = fhir.get("Task", params={"patient.identifier": MRN, "_include": "Task:focus"}).json()
        for entry in found.get("entry", []):
            _describe(entry["resource"])

    db.dispose()
    print("\nLook at it yourself: `make serve`, then")
    for path in (f"Task/{task['id']}", f"Task?patient.identifier={MRN}&_include=Task:focus", "metadata"):
        url = f"{_public_root(settings)}/fhir/{path}".replace("|", "%7C")
        print(f"   curl -s '{url}'")
    return 0


async def _send_over_mllp(settings: Settings, db: Database, message: bytes) -> bytes:
    """Start the MLLP intake on a free port, send ``message`` as a sender would, return the ACK."""
    # Files hold segments one per line; on the wire each ends in CR.
    wire = b"\r".join(message.splitlines()) + b"\r"
    async with mllp_listener(settings.model_copy(update={"mllp_port": 0}), db) as mllp:
        return await send("127.0.0.1", mllp.port, wire)


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


def _public_root(settings: Settings) -> str:
    return settings.public_base_url.removesuffix("/fhir") or f"http://{settings.http_host}:{settings.http_port}"
