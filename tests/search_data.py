"""Radiology test data and search helpers shared by the ``tests/test_search_*`` modules.

Builders return plain R4 JSON with the ids the tests assert on. ``radiology()`` is one small
but realistic store: patients with accented names, orders typed with HL7 table 0203
identifiers (ACSN, PLAC) and LOINC / RadLex codes, the Tasks that track the cases, the
ImagingStudies found on the PACS, the second-opinion DiagnosticReports and their findings.
Read-only search tests load it once per module and database (``module_client``).
"""

import shutil
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi.testclient import TestClient

from fhir_server.db import Database
from overread.app import create_app
from overread.settings import Settings
from tests.conftest import FHIR_JSON

Resource = dict[str, Any]

LOINC = "http://loinc.org"
RADLEX = "http://www.radlex.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
MRN = "http://hospital.example.org/mrn"
OTHER_MRN = "http://other-hospital.example.org/mrn"
ACCESSION = "http://hospital.example.org/accession"
PLACER = "http://ehr.example.org/orders"
DISCREPANCY = "https://overread.org/fhir/CodeSystem/second-opinion-discrepancy"
RADPEER = "https://overread.org/fhir/CodeSystem/radpeer"
CASE_STATUS = "https://overread.org/fhir/CodeSystem/case-status"
ORIGIN = "https://overread.org/fhir/CodeSystem/order-origin"
EXTERNAL_PATIENT = "https://other-hospital.example.org/fhir/Patient/ext-42"


# -- builders ----------------------------------------------------------------------


def ref(target: str) -> Resource:
    return {"reference": target}


def coding(system: str | None, code: str, display: str | None = None) -> Resource:
    c: Resource = {"code": code}
    if system is not None:
        c["system"] = system
    if display:
        c["display"] = display
    return c


def concept(*codings: Resource, text: str | None = None) -> Resource:
    cc: Resource = {"coding": list(codings)}
    if text:
        cc["text"] = text
    return cc


def typed_identifier(type_code: str, system: str, value: str) -> Resource:
    """An identifier typed from HL7 table 0203 (ACSN accession, PLAC placer, MR record number)."""
    return {"type": concept(coding(V2_0203, type_code)), "system": system, "value": value}


def patient(pid: str, family: str, given: list[str], **extra: Any) -> Resource:
    name = {"use": "official", "family": family, "given": given}
    return {"resourceType": "Patient", "id": pid, "name": [name], **extra}


def practitioner(pid: str, family: str, given: str) -> Resource:
    return {"resourceType": "Practitioner", "id": pid, "name": [{"family": family, "given": [given]}]}


def endpoint(eid: str, address: str) -> Resource:
    return {
        "resourceType": "Endpoint",
        "id": eid,
        "status": "active",
        "connectionType": coding("http://terminology.hl7.org/CodeSystem/endpoint-connection-type", "dicom-wado-rs"),
        "payloadType": [concept(coding(DCM, "1.2.840.10008.5.1.4.1.1.2"))],
        "address": address,
    }


def service_request(
    sid: str, subject: str, code: Resource, accession: str, status: str = "active", **extra: Any
) -> Resource:
    return {
        "resourceType": "ServiceRequest",
        "id": sid,
        "identifier": [typed_identifier("ACSN", ACCESSION, accession)],
        "status": status,
        "intent": "order",
        "category": [concept(coding(SNOMED, "363679005", "Imaging"))],
        "code": code,
        "subject": ref(subject),
        **extra,
    }


def task(tid: str, focus: str, patient_ref: str, status: str = "requested", **extra: Any) -> Resource:
    return {
        "resourceType": "Task",
        "id": tid,
        "status": status,
        "intent": "order",
        "focus": ref(focus),
        "for": ref(patient_ref),
        **extra,
    }


def imaging_study(
    iid: str, subject: str, based_on: str, study_uid: str, modalities: list[str], **extra: Any
) -> Resource:
    series = [
        {"uid": f"{study_uid}.{n}", "number": n, "modality": coding(DCM, m)} for n, m in enumerate(modalities, start=1)
    ]
    return {
        "resourceType": "ImagingStudy",
        "id": iid,
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}],
        "status": "available",
        "subject": ref(subject),
        "basedOn": [ref(based_on)],
        "series": series,
        **extra,
    }


def diagnostic_report(
    did: str, subject: str, based_on: str, discrepancy: str, status: str = "final", **extra: Any
) -> Resource:
    return {
        "resourceType": "DiagnosticReport",
        "id": did,
        "basedOn": [ref(based_on)],
        "status": status,
        "code": concept(coding(LOINC, "18748-4", "Diagnostic imaging study")),
        "subject": ref(subject),
        "conclusionCode": [concept(coding(DISCREPANCY, discrepancy))],
        "conclusion": f"Second-opinion read: {discrepancy}",
        **extra,
    }


def observation(oid: str, subject: str, value: float, unit: str, **extra: Any) -> Resource:
    return {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": concept(coding(LOINC, "21889-1", "Size Tumor")),
        "subject": ref(subject),
        "valueQuantity": {"value": value, "unit": unit, "system": UCUM, "code": unit},
        **extra,
    }


CT_CHEST = concept(coding(LOINC, "24627-2", "CT Chest"), coding(RADLEX, "RPID16", "CT CHEST WO IV CONTRAST"))
XR_CHEST = concept(coding(LOINC, "36643-5", "XR Chest 2 Views"))
MR_BRAIN = concept(coding(RADLEX, "RPID145", "MR BRAIN WO IV CONTRAST"), coding(None, "LOCAL-MRB"))


def radiology() -> list[Resource]:
    """The shared store: four patients, four orders, their cases, studies, reports and findings."""
    return [
        practitioner("dr-ordering", "Weiß", "Hannah"),
        practitioner("rad-1", "Peña", "Lucía"),
        practitioner("rad-2", "Okafor", "Chidi"),
        endpoint("pacs-main", "https://pacs.example.org/dicom-web"),
        patient(
            "pat-muller", "Müller", ["Zoë", "Anna"],
            gender="female", birthDate="1970-05-14", active=True,
            identifier=[typed_identifier("MR", MRN, "MRN-1001")],
            address=[{"use": "home", "line": ["Bahnhofstraße 12, 2. OG"], "city": "Zürich", "postalCode": "8001",
                      "country": "CH"}],
            telecom=[{"system": "phone", "value": "+41 44 123 45 67"}],
            communication=[{"language": concept(coding("urn:ietf:bcp:47", "de-CH"))}],
            text={"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">Zoë Müller</div>'},
        ),
        patient(
            "pat-muller2", "Muller", ["Johann"],
            gender="male", birthDate="1970-11", active=False,
            identifier=[typed_identifier("MR", MRN, "MRN-1002")],
            address=[{"use": "work", "line": ["Steinenvorstadt 3"], "city": "Basel", "country": "CH"}],
        ),
        patient(
            "pat-obermuller", "Obermüller", ["Joanna"],
            gender="female", birthDate="1985-02-28",
            identifier=[{"value": "LEGACY-7"}, typed_identifier("MR", MRN, "MRN-1003")],
        ),
        patient(
            "pat-smith", "Smith", ["John", "Q"],
            gender="male", birthDate="2001-07-04",
            identifier=[typed_identifier("MR", MRN, "MRN-1004"), typed_identifier("MR", OTHER_MRN, "MRN-1001")],
        ),
        service_request(
            "sr-1", "Patient/pat-muller", CT_CHEST, "ACC-24-0001",
            priority="routine", authoredOn="2024-03-01T09:30:00Z", occurrenceDateTime="2024-03-04",
            requester=ref("Practitioner/dr-ordering"), performer=[ref("Practitioner/rad-1")],
            instantiatesUri=["https://overread.org/fhir/protocols/second-opinion/ct-chest"],
            identifier=[typed_identifier("ACSN", ACCESSION, "ACC-24-0001"),
                        typed_identifier("PLAC", PLACER, "PLAC-9001")],
        ),
        service_request(
            "sr-2", "Patient/pat-muller", XR_CHEST, "ACC-24-0002", status="completed",
            meta={"source": "urn:overread:hl7v2:EHR1", "tag": [coding(ORIGIN, "hl7v2")]},
            priority="stat", authoredOn="2024-03-15T23:30:00-05:00",
            occurrencePeriod={"start": "2024-03-16T08:00:00Z", "end": "2024-03-16T09:00:00Z"},
            requester=ref("Practitioner/dr-ordering"),
        ),
        service_request(
            "sr-3", "Patient/pat-muller2", MR_BRAIN, "ACC-24-0003",
            priority="urgent", authoredOn="2024-04-02", occurrencePeriod={"start": "2024-04-01"},
            requester=ref("Practitioner/dr-unknown"),
        ),
        service_request(
            "sr-4", EXTERNAL_PATIENT, CT_CHEST, "ACC-23-0999", status="revoked",
            authoredOn="2023-12-31T23:59:59Z",
        ),
        task(
            "task-1", "ServiceRequest/sr-1", "Patient/pat-muller",
            owner=ref("Practitioner/rad-1"), authoredOn="2024-03-01T09:31:00Z",
            businessStatus=concept(coding(CASE_STATUS, "awaiting-images")),
            executionPeriod={"start": "2024-03-01T09:31:00Z"},
        ),
        task(
            "task-2", "ServiceRequest/sr-2", "Patient/pat-muller", status="completed",
            owner=ref("Practitioner/rad-2"), authoredOn="2024-03-16T04:31:00Z",
            businessStatus=concept(coding(CASE_STATUS, "reported")),
            executionPeriod={"start": "2024-03-16T08:00:00Z", "end": "2024-03-17T12:00:00Z"},
        ),
        task(
            "task-3", "ServiceRequest/sr-3", "Patient/pat-muller2", status="in-progress",
            owner=ref("Practitioner/rad-1"), authoredOn="2024-04-02T10:00:00Z",
            partOf=[ref("Task/task-1")],
        ),
        imaging_study(
            "is-1", "Patient/pat-muller", "ServiceRequest/sr-1", "1.2.840.113619.2.55.3.1001", ["CT", "SR"],
            started="2024-03-04T10:15:00Z", endpoint=[ref("Endpoint/pacs-main")],
        ),
        imaging_study(
            "is-2", "Patient/pat-muller", "ServiceRequest/sr-2", "1.2.840.113619.2.55.3.1002", ["DX"],
            started="2024-03-16T08:20:00Z",
        ),
        imaging_study(
            "is-3", "Patient/pat-muller2", "ServiceRequest/sr-3", "1.2.840.113619.2.55.3.1003", ["MR"],
            started="2024-04-03T14:00:00Z", endpoint=[ref("Endpoint/pacs-main")], status="registered",
        ),
        diagnostic_report(
            "dr-1", "Patient/pat-muller", "ServiceRequest/sr-2", "major",
            conclusionCode=[concept(coding(DISCREPANCY, "major")), concept(coding(RADPEER, "3b"))],
            effectiveDateTime="2024-03-17T11:00:00Z", issued="2024-03-17T11:05:00Z",
            imagingStudy=[ref("ImagingStudy/is-2")], resultsInterpreter=[ref("Practitioner/rad-2")],
            result=[ref("Observation/obs-1")],
        ),
        diagnostic_report(
            "dr-2", "Patient/pat-muller", "ServiceRequest/sr-1", "agree", status="preliminary",
            effectiveDateTime="2024-03-05", issued="2024-03-05T16:00:00.000+01:00",
            imagingStudy=[ref("ImagingStudy/is-1")], resultsInterpreter=[ref("Practitioner/rad-1")],
        ),
        observation("obs-1", "Patient/pat-muller", 12.5, "mm"),
        observation("obs-2", "Patient/pat-muller", 100, "mm"),
        observation("obs-3", "Patient/pat-muller", 100.4, "mm"),
        observation("obs-4", "Patient/pat-muller", 99.4, "mm"),
        observation("obs-5", "Patient/pat-muller2", 0.5, "cm"),
        observation("obs-6", "Patient/pat-muller2", -10, "[hnsf'U]", code=concept(coding(LOINC, "18076-0"))),
    ]  # fmt: skip


# -- HTTP helpers --------------------------------------------------------------------


def put(client: TestClient, resource: Resource) -> Resource:
    """Store a resource under its own id (update-as-create) and return what was stored."""
    r = client.put(f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource)
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


def put_all(client: TestClient, resources: list[Resource]) -> None:
    for resource in resources:
        put(client, resource)


def search(client: TestClient, query: str, **kwargs: Any) -> Resource:
    """GET ``/fhir/{query}``; the answer must be a searchset Bundle."""
    r = client.get(f"/fhir/{query}", **kwargs)
    assert r.status_code == 200, f"{query}: {r.status_code} {r.text}"
    bundle: Resource = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset", bundle
    return bundle


def ids(bundle: Resource, mode: str = "match") -> list[str]:
    """The ids of the entries of one search mode, in Bundle order."""
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


def typed_ids(bundle: Resource, mode: str = "include") -> set[str]:
    """``Type/id`` of the entries of one search mode."""
    return {
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    }


def found(client: TestClient, query: str) -> set[str]:
    """The ids a search matches (as a set: for criteria tests where order is not the point)."""
    matched = ids(search(client, query))
    assert len(matched) == len(set(matched)), f"{query} returned duplicates: {matched}"
    return set(matched)


def link(bundle: Resource, relation: str) -> str | None:
    return next((lk["url"] for lk in bundle.get("link", []) if lk["relation"] == relation), None)


def link_params(bundle: Resource, relation: str) -> list[tuple[str, str]]:
    url = link(bundle, relation)
    assert url is not None, f"no {relation} link in {bundle.get('link')}"
    return parse_qsl(urlsplit(url).query)


def assert_outcome(response: Any, status: int) -> Resource:
    """The response is an OperationOutcome error with this status."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    outcome: Resource = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    assert outcome["issue"] and outcome["issue"][0]["severity"] in ("error", "fatal"), outcome
    return outcome


# -- a loaded store per test module ------------------------------------------------------


def module_client(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    resources: Callable[[], list[Resource]],
) -> Iterator[TestClient]:
    """A client on a database of its own (``request.param``: sqlite or postgresql), loaded once.

    For module-scoped fixtures of read-only tests: the per-test ``client`` fixture empties
    its database before every test, which would cost a reload of the store per test.
    """
    with (
        module_database(request, tmp_path_factory) as db,
        TestClient(create_app(Settings(database_url=db.url), db), base_url="http://testserver") as client,
    ):
        client.headers.update(FHIR_JSON)
        put_all(client, resources())
        yield client


@contextmanager
def module_database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """A migrated, empty database of its own for a module's store (``request.param``: sqlite or
    postgresql), until the block ends: a copy of the SQLite template, or one of the session's
    PostgreSQL databases lent (``conftest.PostgresDatabases``)."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            path = tmp_path_factory.mktemp("store") / "overread.db"
            shutil.copy(request.getfixturevalue("sqlite_template"), path)
            url = f"sqlite:///{path}"
        else:
            url = stack.enter_context(request.getfixturevalue("postgres_databases").lend())
        db = Database(url)
        stack.callback(db.dispose)
        yield db


def case_tasks() -> list[Resource]:
    """25 more cases for paging: pairs share an authoredOn (ties for sorting); every third is new."""
    statuses = ("requested", "in-progress", "completed")
    return [
        task(
            f"case-{n:02d}", "ServiceRequest/sr-1", "Patient/pat-muller", status=statuses[n % 3],
            owner=ref(f"Practitioner/rad-{n % 2 + 1}"), authoredOn=f"2024-05-{n // 2 + 1:02d}T08:00:00Z",
        )
        for n in range(25)
    ]  # fmt: skip
