"""``overread demo``: one second-opinion case, end to end, on the embedded defaults.

Today the case goes as far as the FHIR store reaches: the order arrives as a FHIR
transaction (Organization, Practitioner, Patient, ServiceRequest and the Task that tracks
the case), is read back with a chained search, and the URLs to look at are printed.
Later steps (HL7 intake, image linking, the report) extend this script.
"""

import json
from importlib.resources import files
from typing import Any

import httpx

from fhir_server.db import Database
from overread.app import create_app
from overread.migrate import upgrade
from overread.server import running
from overread.settings import Settings, get_settings

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

    db.dispose()
    print("\nLook at it yourself: `make serve`, then")
    for path in (f"Task/{task['id']}", f"Task?patient.identifier={MRN}&_include=Task:focus", "metadata"):
        url = f"{_public_root(settings)}/fhir/{path}".replace("|", "%7C")
        print(f"   curl -s '{url}'")
    return 0


def _describe(resource: dict[str, Any]) -> None:
    match resource["resourceType"]:
        case "Task":
            print(f"   Task/{resource['id']}: status {resource['status']}, {resource.get('description', '')}")
        case "ServiceRequest":
            ids = ", ".join(i["value"] for i in resource.get("identifier", []))
            print(f"   ServiceRequest/{resource['id']}: {resource['code']['text']} ({ids}), {resource['priority']}")


def _public_root(settings: Settings) -> str:
    return settings.public_base_url.removesuffix("/fhir") or f"http://{settings.http_host}:{settings.http_port}"
