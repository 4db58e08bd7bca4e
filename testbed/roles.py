"""A store of second-opinion cases of two hospitals, two reading groups and two insurers, with
clinical content a client must not see outside its compartment, and a client of each role.

Written through the API by a client without a role (a trusted back-office system). Every case
has a Patient (a name and birth date of its own), a Coverage, an order with a reason and a note,
its case Task (routed by the order's performerType), an original report, an Observation and an
ImagingStudy. The role tests check that no client sees outside its compartment (``Case.secrets``);
``bench/compartments.py`` measures what the compartments cost on the same store.
"""

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from fastapi.testclient import TestClient

from fhir_server.db import Database
from mappings.original_report import ORIGINAL_TAG
from testbed.smart_client import bearer, client_entry, es384, smart_app

KEY = es384()
ORG = "https://overread.example.org/sid/org"
MRN_SYSTEM = "https://st-olav.example.org/fhir/sid/mrn"
ACSN_SYSTEM = "https://st-olav.example.org/fhir/sid/accession"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
#: Organization id → its identifier's value.
ORGANIZATIONS = {"hosp-a": "A", "hosp-b": "B", "read-1": "R1", "read-2": "R2", "pay-1": "P1", "pay-2": "P2"}
#: client_id → (role, organization id, scopes).
CLIENTS = {
    "admin": (None, None, "system/*.cruds"),
    "ehr-a": ("ordering", "hosp-a", "system/*.cruds"),
    "ehr-b": ("ordering", "hosp-b", "system/*.cruds"),
    "reader-1": ("reader", "read-1", "system/*.cruds"),
    "reader-2": ("reader", "read-2", "system/*.cruds"),
    "insurer-1": ("insurer", "pay-1", "system/*.rs"),
    "operator": ("operator", None, "system/hl7.r"),
}
ROUTING = {"routing": [
    {"owner": {"reference": "Organization/read-1"}, "performer_type": "group-1"},
    {"owner": {"reference": "Organization/read-2"}},
]}  # fmt: skip
Json = dict[str, Any]


@dataclass
class Case:
    hospital: str
    reader: str
    payor: str
    patient: str = ""
    coverage: str = ""
    order: str = ""
    task: str = ""
    report: str = ""
    observation: str = ""
    study: str = ""
    #: The clinical text of this case: what must never reach a client outside it.
    secrets: list[str] = field(default_factory=list)


def app_client(db: Database) -> TestClient:
    entries = []
    for client_id, (role, org, scope) in CLIENTS.items():
        extra: Json = {"role": role} if role else {}
        if org:
            extra["organization"] = f"{ORG}|{ORGANIZATIONS[org]}"
        entries.append(client_entry(client_id, KEY, scope, **extra))
    client = TestClient(smart_app(db, entries, ROUTING), base_url="http://testserver")
    client.headers.update({"content-type": "application/fhir+json"})
    return client


def token(client: TestClient, client_id: str) -> dict[str, str]:
    return bearer(client, KEY, client_id, CLIENTS[client_id][2])


def load(client: TestClient, count: int = 8) -> list[Case]:
    """The organizations, and ``count`` cases spread over the hospitals, readers and payors."""
    admin = token(client, "admin")
    for rid, value in ORGANIZATIONS.items():
        org = {"resourceType": "Organization", "id": rid, "identifier": [{"system": ORG, "value": value}],
               "name": f"Organization {value}"}  # fmt: skip
        assert client.put(f"/fhir/Organization/{rid}", json=org, headers=admin).status_code == 201
    return [_case(client, admin, n) for n in range(count)]


def _case(client: TestClient, admin: dict[str, str], n: int) -> Case:
    case = Case(("hosp-a", "hosp-b")[n % 2], ("read-1", "read-2")[n // 2 % 2], ("pay-1", "pay-2")[n // 4 % 2])
    family, birth = f"Secretfamily{n:03d}", f"19{40 + n % 50}-0{1 + n % 9}-1{n % 10}"
    reason, note = f"Secret reason {n:03d}", f"Secret order note {n:03d}"
    conclusion, finding = f"Secret report text {n:03d}", f"Secret finding {n:03d}"
    case.secrets = [family, f"Secretgiven{n:03d}", birth, reason, note, conclusion, finding]

    def create(resource: Json) -> str:
        response = client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=admin)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    case.patient = create({
        "resourceType": "Patient",
        "identifier": [{"use": "usual", "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                        "system": MRN_SYSTEM, "value": f"MRN-{n}"}],
        "name": [{"family": family, "given": [f"Secretgiven{n:03d}"]}], "gender": "female", "birthDate": birth,
    })  # fmt: skip
    case.coverage = create({
        "resourceType": "Coverage", "status": "active", "beneficiary": {"reference": f"Patient/{case.patient}"},
        "payor": [{"reference": f"Organization/{case.payor}"}],
    })  # fmt: skip
    group = "group-1" if case.reader == "read-1" else "group-2"
    case.order = create({
        "resourceType": "ServiceRequest",
        "identifier": [{"type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]},
                        "system": ACSN_SYSTEM, "value": f"ACSN-{n}"}],
        "status": "active", "intent": "order", "priority": "routine",
        "code": {"coding": [{"system": "http://loinc.org", "code": "24627-2", "display": "CT Chest"}]},
        "subject": {"reference": f"Patient/{case.patient}"}, "authoredOn": "2024-03-05T09:12:00+01:00",
        "reasonCode": [{"text": reason}], "requester": {"reference": f"Organization/{case.hospital}"},
        "insurance": [{"reference": f"Coverage/{case.coverage}"}], "note": [{"text": note}],
        "performerType": {"text": group},
    })  # fmt: skip
    found = client.get(f"/fhir/Task?focus=ServiceRequest/{case.order}", headers=admin).json()
    case.task = found["entry"][0]["resource"]["id"]
    case.report = create({
        "resourceType": "DiagnosticReport", "meta": {"tag": [ORIGINAL_TAG]}, "status": "final",
        "code": {"text": "CT Chest"}, "basedOn": [{"reference": f"ServiceRequest/{case.order}"}],
        "subject": {"reference": f"Patient/{case.patient}"}, "conclusion": conclusion,
    })  # fmt: skip
    case.observation = create({
        "resourceType": "Observation", "status": "final", "code": {"text": "finding"},
        "basedOn": [{"reference": f"ServiceRequest/{case.order}"}],
        "subject": {"reference": f"Patient/{case.patient}"}, "valueString": finding,
    })  # fmt: skip
    case.study = create({
        "resourceType": "ImagingStudy", "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:1.2.3.{n}"}],
        "status": "available", "subject": {"reference": f"Patient/{case.patient}"},
        "basedOn": [{"reference": f"ServiceRequest/{case.order}"}],
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
    })  # fmt: skip
    return case


def ids(bundle: Json, rtype: str | None = None) -> set[str]:
    """The ids of the Bundle's entries (of ``rtype``)."""
    return {e["resource"]["id"] for e in bundle.get("entry", []) if rtype in (None, e["resource"]["resourceType"])}


def refs(case: Case) -> Iterator[str]:
    """``Type/id`` of every resource of the case."""
    yield from (f"Patient/{case.patient}", f"Coverage/{case.coverage}", f"ServiceRequest/{case.order}",
                f"Task/{case.task}", f"DiagnosticReport/{case.report}", f"Observation/{case.observation}",
                f"ImagingStudy/{case.study}")  # fmt: skip
