"""Synthetic second-opinion cases: Patients with MRNs, ServiceRequests and Tasks.

Every case is three resources: a Patient (identifier MRN in ``MRN_SYSTEM``), a
ServiceRequest for an imaging second opinion (placer and accession identifiers,
subject = the Patient) and a Task tracking it (focus = the ServiceRequest, for = the
Patient). Ids are assigned by the loader so that references need no look-up. The data
are deterministic for a given case number, so two runs load the same store.
"""

import random
from collections.abc import Iterator
from typing import Any

MRN_SYSTEM = "urn:oid:1.2.36.146.595.217.0.1"
PLACER_SYSTEM = "https://ehr.example.org/fhir/placer-order"
ACCESSION_SYSTEM = "https://ehr.example.org/fhir/accession"
RESOURCES_PER_CASE = 3

_GIVEN = ("Anna", "Ben", "Chloé", "David", "Emma", "Farid", "Greta", "Hugo", "Inès", "Jonas", "Karin", "Luca")
_FAMILY = ("Müller", "Dubois", "Rossi", "García", "Novak", "Jensen", "Kowalski", "Smith", "Brown", "Silva")
_MODALITIES = (("CT", "CT chest"), ("MR", "MRI brain"), ("CR", "Chest X-ray"), ("US", "Abdominal US"))
_TASK_STATUS = ("requested", "accepted", "in-progress", "completed")


def mrn(case: int) -> str:
    return f"MRN{case:08d}"


def patient_id(case: int) -> str:
    return f"pat-{case:08d}"


def patient(case: int, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [
            {
                "use": "usual",
                "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
                "system": MRN_SYSTEM,
                "value": mrn(case),
            }
        ],
        "active": True,
        "name": [{"family": rng.choice(_FAMILY), "given": [rng.choice(_GIVEN)]}],
        "gender": rng.choice(("female", "male", "other", "unknown")),
        "birthDate": f"{rng.randint(1930, 2015)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "telecom": [{"system": "phone", "value": f"+41 44 {rng.randint(1000000, 9999999)}", "use": "home"}],
        "address": [{"line": [f"{rng.randint(1, 200)} Main Street"], "city": "Zürich", "postalCode": "8001"}],
    }


def service_request(case: int, rng: random.Random) -> dict[str, Any]:
    code, display = rng.choice(_MODALITIES)
    return {
        "resourceType": "ServiceRequest",
        "identifier": [
            {"system": PLACER_SYSTEM, "value": f"PLAC{case:08d}"},
            {"system": ACCESSION_SYSTEM, "value": f"ACSN{case:08d}"},
        ],
        "status": "active",
        "intent": "order",
        "category": [{"coding": [{"system": "http://snomed.info/sct", "code": "363679005"}]}],
        "priority": rng.choice(("routine", "urgent")),
        "code": {"coding": [{"system": "http://dicom.nema.org/resources/ontology/DCM", "code": code}],
                 "text": f"Second opinion: {display}"},
        "subject": {"reference": f"Patient/{patient_id(case)}"},
        "authoredOn": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:00:00Z",
    }  # fmt: skip


def task(case: int, rng: random.Random) -> dict[str, Any]:
    return {
        "resourceType": "Task",
        "identifier": [{"system": "https://overread.org/fhir/case", "value": f"CASE{case:08d}"}],
        "status": rng.choice(_TASK_STATUS),
        "intent": "order",
        "priority": "routine",
        "focus": {"reference": f"ServiceRequest/sr-{case:08d}"},
        "for": {"reference": f"Patient/{patient_id(case)}"},
        "authoredOn": f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T10:05:00Z",
        "businessStatus": {"text": "awaiting images"},
    }


def resources(start: int, stop: int) -> Iterator[tuple[str, dict[str, Any]]]:
    """(id, resource) for resource numbers ``start`` ≤ n < ``stop``: P, SR, Task, P, SR, Task…"""
    for n in range(start, stop):
        case, kind = divmod(n, RESOURCES_PER_CASE)
        rng = random.Random(n)
        if kind == 0:
            yield patient_id(case), patient(case, rng)
        elif kind == 1:
            yield f"sr-{case:08d}", service_request(case, rng)
        else:
            yield f"task-{case:08d}", task(case, rng)


def cases_in(total: int) -> int:
    """How many Patients (cases) the first ``total`` resources hold."""
    return (total + RESOURCES_PER_CASE - 1) // RESOURCES_PER_CASE
