"""Builders of realistic radiology-second-opinion resources and Bundles, and shared checks.

One place for the test data of the CRUD, history, bundle, error, concurrency, core and
fhirpy tests: a Patient known by its hospital MRN, the ServiceRequest that orders the
second opinion (identified by its accession number, typed ACSN from HL7 table 0203) and
the Task that tracks the case (focus = the ServiceRequest). The search tests keep their
own data in ``tests/search_data.py``.
"""

from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

MRN_SYSTEM = "https://st-olav.example.org/fhir/sid/mrn"
ACSN_SYSTEM = "https://st-olav.example.org/fhir/sid/accession"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
LOINC = "http://loinc.org"

Json = dict[str, Any]


def patient(mrn: str = "MRN-100234", family: str = "Haugen", given: str = "Ingrid", **extra: Any) -> Json:
    return {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
                "system": MRN_SYSTEM,
                "value": mrn,
            }
        ],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": "1961-04-17",
        **extra,
    }


def mrn_query(mrn: str = "MRN-100234") -> str:
    """Search criteria finding a Patient by MRN (``identifier=system|value``)."""
    return f"identifier={MRN_SYSTEM}|{mrn}"


def service_request(subject: str, accession: str = "ACSN-2024-000871", **extra: Any) -> Json:
    """A second-opinion order: re-read a CT of the chest that another radiologist reported."""
    return {
        "resourceType": "ServiceRequest",
        "identifier": [
            {
                "type": {"coding": [{"system": V2_0203, "code": "ACSN", "display": "Accession ID"}]},
                "system": ACSN_SYSTEM,
                "value": accession,
            }
        ],
        "status": "active",
        "intent": "order",
        "priority": "routine",
        "code": {"coding": [{"system": LOINC, "code": "24627-2", "display": "CT Chest"}]},
        "subject": {"reference": subject},
        "authoredOn": "2024-03-05T09:12:00+01:00",
        "reasonCode": [{"text": "Second opinion: pulmonary nodule follow-up"}],
        **extra,
    }


def acsn_query(accession: str = "ACSN-2024-000871") -> str:
    return f"identifier={ACSN_SYSTEM}|{accession}"


def task(focus: str, patient_ref: str, **extra: Any) -> Json:
    """The case tracker: intent order, status requested, focus = the ServiceRequest."""
    return {
        "resourceType": "Task",
        "status": "requested",
        "intent": "order",
        "businessStatus": {"text": "awaiting images"},
        "focus": {"reference": focus},
        "for": {"reference": patient_ref},
        "authoredOn": "2024-03-05T09:13:00+01:00",
        **extra,
    }


def imaging_study(order: str, patient_ref: str, uid: str = "1.2.826.0.1.3680043.8.498.1") -> Json:
    """The case's images: an ImagingStudy based on the order (what the linking worker writes)."""
    return {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}],
        "status": "available",
        "subject": {"reference": patient_ref},
        "basedOn": [{"reference": order}],
        "modality": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "CT"}],
    }


#: The extension that lets a second-opinion report be final without the case's images.
NO_IMAGES_REASON = "https://overread.org/fhir/StructureDefinition/no-images-reason"


def no_images_reason(text: str = "Read on the referring hospital's viewer") -> Json:
    return {"url": NO_IMAGES_REASON, "valueString": text}


# -- Bundle entries ------------------------------------------------------------------


def post(resource: Json, full_url: str | None = None, if_none_exist: str | None = None) -> Json:
    entry: Json = {"resource": resource, "request": {"method": "POST", "url": resource["resourceType"]}}
    if full_url:
        entry["fullUrl"] = full_url
    if if_none_exist:
        entry["request"]["ifNoneExist"] = if_none_exist
    return entry


def put(url: str, resource: Json, full_url: str | None = None, if_match: str | None = None) -> Json:
    entry: Json = {"resource": resource, "request": {"method": "PUT", "url": url}}
    if full_url:
        entry["fullUrl"] = full_url
    if if_match:
        entry["request"]["ifMatch"] = if_match
    return entry


def delete(url: str) -> Json:
    return {"request": {"method": "DELETE", "url": url}}


def get(url: str) -> Json:
    return {"request": {"method": "GET", "url": url}}


def bundle(kind: str, *entries: Json) -> Json:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def case_transaction(mrn: str = "MRN-100234", accession: str = "ACSN-2024-000871") -> Json:
    """A whole new case in one transaction, linked by ``urn:uuid:`` references.

    The Patient is a conditional create on its MRN, so a second order for the same
    person reuses the Patient.
    """
    p, sr = "urn:uuid:6f1c2a8e-0c3b-4a57-9d51-1f0b8f1e2a01", "urn:uuid:6f1c2a8e-0c3b-4a57-9d51-1f0b8f1e2a02"
    return bundle(
        "transaction",
        post(patient(mrn), p, if_none_exist=mrn_query(mrn)),
        post(service_request(p, accession), sr),
        post(task(sr, p)),
    )


# -- checks ------------------------------------------------------------------------


def assert_outcome(response: Any, status: int) -> Json:
    """The response is an OperationOutcome error with this status, and no stack trace leaked."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    body: Json = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    assert body["issue"] and all(i["severity"] in ("error", "fatal") for i in body["issue"]), body
    assert all(i["code"] and i.get("diagnostics") for i in body["issue"]), body
    return body


def http_date(value: str) -> datetime:
    """An HTTP-date header (Last-Modified) as an aware UTC datetime."""
    return parsedate_to_datetime(value).astimezone(UTC)


def location_id(location: str) -> tuple[str, str, str]:
    """``…/fhir/Patient/123/_history/1`` → (Patient, 123, 1)."""
    parts = urlsplit(location).path.rstrip("/").split("/")
    assert parts[-2] == "_history", location
    return parts[-4], parts[-3], parts[-1]
