"""Gather what an ORU^R01 is made of (``mappings.oru_r01.OruContext``) from the store, or from a JSON file.

``load_context`` reads the DiagnosticReport at its current version (or a given one) and resolves its basedOn
ServiceRequest, subject Patient, resultsInterpreter[0] Practitioner, result Observations and the
Encounter (the report's, else the order's). References may be relative (``Type/id``, with or without
``/_history/n``), absolute URLs ending so, or ``#id`` into the report's ``contained``. The patient
may also be a logical reference (R4 §2.3.0 references.html#logical: ``Reference.identifier``), the
report's subject or else the order's: it is the Patient with that identifier when there is exactly
one, else a Patient made of the identifier alone, so PID-3 carries it. The order and the patient
are required (a ``FhirError`` 422 / the repository's 404 / 410 otherwise); the interpreter, findings
and encounter are left out when they cannot be resolved.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fhir_server.errors import FhirError, error
from fhir_server.repository import Repository
from mappings.oru_r01 import Envelope, OruContext

Json = dict[str, Any]


def load_context(repo: Repository, report_id: str, version: int | None = None) -> OruContext:
    """The ORU context of ``DiagnosticReport/<report_id>``: its current version, else ``version``.

    A deleted report is an error (404/410) even when ``version`` is given. The other resources are
    those the report version references, as they are now.
    """
    report = repo.read("DiagnosticReport", report_id).resource
    if version is not None and str(report.get("meta", {}).get("versionId")) != str(version):
        report = repo.vread("DiagnosticReport", report_id, version).resource
    order = _first(repo, report, report.get("basedOn") or [], "ServiceRequest")
    if order is None:
        raise error(422, "incomplete", f"DiagnosticReport/{report_id} is not basedOn a ServiceRequest", "basedOn")
    patient = _patient(repo, report, order)
    if patient is None:
        raise error(422, "incomplete", f"DiagnosticReport/{report_id} has no Patient subject", "subject")
    interpreter = _first(repo, report, (report.get("resultsInterpreter") or [])[:1], "Practitioner")
    findings = tuple(
        found
        for ref in report.get("result") or []
        if (found := _resolve(repo, report, ref, "Observation", required=False)) is not None
    )
    holder = report if report.get("encounter") else order  # where a ``#id`` reference is contained
    encounter_ref = holder.get("encounter")
    encounter = _resolve(repo, holder, encounter_ref, "Encounter", required=False) if encounter_ref else None
    requester = _requester(repo, order)
    return OruContext(report, order, patient, interpreter, findings, encounter, requester)


def context_from_json(data: Json) -> tuple[OruContext, Envelope | None]:
    """A context (and envelope, when the file has one) from JSON shaped like ``tests/golden/oru/*.json``."""
    context = OruContext(
        report=data["report"],
        order=data["order"],
        patient=data["patient"],
        interpreter=data.get("interpreter"),
        findings=tuple(data.get("findings") or ()),
        encounter=data.get("encounter"),
        requester=data.get("requester"),
    )
    env: Json | None = data.get("envelope")
    if env is None:
        return context, None
    envelope = Envelope(
        **{k: v for k, v in env.items() if k != "timestamp"},
        timestamp=datetime.fromisoformat(str(env["timestamp"])),
    )
    return context, envelope


def _patient(repo: Repository, report: Json, order: Json) -> Json | None:
    """The report's subject Patient, else the order's; a logical reference by its identifier."""
    holder = report if report.get("subject") else order
    ref: Json = holder.get("subject") or {}
    if ref.get("reference"):
        return _resolve(repo, holder, ref, "Patient", required=True)
    identifier: Json = ref.get("identifier") or {}
    if ref.get("type", "Patient") != "Patient" or not identifier.get("value"):
        return None
    token = f"{identifier.get('system', '')}|{identifier['value']}"
    found = repo.search("Patient", [("identifier", token), ("_count", "2")])
    # Two Patients with one identifier: neither is surely the one; the identifier itself is.
    return found[0].resource if len(found) == 1 else {"resourceType": "Patient", "identifier": [identifier]}


def _requester(repo: Repository, order: Json) -> Json | None:
    """The order's requesting Practitioner, through its PractitionerRole when the order named its facility."""
    ref: Json = order.get("requester") or {}
    role = _resolve(repo, order, ref, "PractitionerRole", required=False)
    if role is None:
        return _resolve(repo, order, ref, "Practitioner", required=False)
    return _resolve(repo, role, role.get("practitioner") or {}, "Practitioner", required=False)


def _first(repo: Repository, holder: Json, refs: list[Json], rtype: str) -> Json | None:
    for ref in refs:
        found = _resolve(repo, holder, ref, rtype, required=rtype == "ServiceRequest")
        if found is not None:
            return found
    return None


def _resolve(repo: Repository, holder: Json, ref: Json, rtype: str, *, required: bool) -> Json | None:
    """The resource ``ref`` points to when it is a ``rtype``: contained, or read from the store."""
    reference = str(ref.get("reference") or "")
    if reference.startswith("#"):
        contained: list[Json] = holder.get("contained") or []
        return next(
            (c for c in contained if c.get("id") == reference[1:] and c.get("resourceType") == rtype),
            None,
        )
    parts = reference.split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    if len(parts) < 2 or parts[-2] != rtype or not parts[-1]:
        return None
    try:
        return repo.read(rtype, parts[-1]).resource
    except FhirError:
        if required:
            raise
        return None
