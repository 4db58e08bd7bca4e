"""``POST [base]/ServiceRequest/[id]/$link-imaging`` (R4 operations.html): look for the order's images again.

It queues the order's image-linking job again now, e.g. after the study reached the PACS or a
PACS peer was fixed. The job runs in the background (``dicom_bridge.linking``), so the answer is
202 Accepted; the case's Task.businessStatus tells how it went. With a Parameters body naming a
study (``studyInstanceUid``, or ``imagingStudy`` a reference) it is an operator's confirmation
that the study is the order's although its patient did not match: ``reason`` (why) and
``operator`` (who: a reference, or a name) are then required, and the link writes an AuditEvent
(docs/image-linking.md, "Confirming a study"). ``overread.app`` registers it with
``fhir_server.operations``.
"""

from typing import Any

from cases import task
from fhir_server.errors import error, information
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.operations import Operation, parameters
from fhir_server.repository import Repository


def link_imaging(repo: Repository, req: FhirRequest, order_id: str) -> FhirResponse:
    """The operation: relink (``cases.task.relink``), with the confirmation the body carries, if any."""
    confirmation = _confirmation(repo, req.body)
    task.relink(repo, order_id, confirmation)
    what = f" linking study {confirmation.study_uid} as confirmed" if confirmation else ""
    return FhirResponse(202, information(f"An image-linking job for ServiceRequest/{order_id}{what} is queued"))


def _confirmation(repo: Repository, body: Any) -> task.Confirmation | None:
    """The confirmation a ``$link-imaging`` Parameters body carries, if it names a study (400 if half of one)."""
    if body is None:
        return None
    if not isinstance(body, dict) or body.get("resourceType") != "Parameters":
        raise error(400, "structure", "$link-imaging takes no body or a Parameters resource")
    values = {p.get("name"): p for p in parameters(body)}
    study_uid = _string(values.get("studyInstanceUid"))
    if (reference := values.get("imagingStudy")) is not None:
        study_uid = _study_uid(repo, str(reference.get("valueReference", {}).get("reference", "")))
    reason, operator = _string(values.get("reason")), values.get("operator", {})
    if not study_uid:
        if reason or operator:
            raise error(400, "required", "A confirmation names the study: studyInstanceUid or imagingStudy")
        return None
    reference = operator.get("valueReference")
    named = {"display": name} if (name := _string(operator)) else None
    who = (
        reference if isinstance(reference, dict) and (reference.get("reference") or reference.get("display")) else named
    )
    if not reason:
        raise error(400, "required", "Confirming a study needs a reason (parameter 'reason')", "reason")
    if not who:
        raise error(400, "required", "Confirming a study needs the operator (parameter 'operator')", "operator")
    return task.Confirmation(study_uid.removeprefix("urn:oid:"), reason, who)


def _string(parameter: dict[str, Any] | None) -> str:
    value = next((v for k, v in (parameter or {}).items() if k in ("valueString", "valueOid", "valueId")), "")
    return str(value).strip()


def _study_uid(repo: Repository, reference: str) -> str:
    kind, _, rid = reference.partition("/")
    found = repo.current(kind, rid) if kind == "ImagingStudy" and rid else None
    if found is None or found.content is None:
        raise error(400, "not-found", f"imagingStudy {reference!r} is not an ImagingStudy here", "imagingStudy")
    uids = [i["value"] for i in found.resource.get("identifier", []) if i.get("system") == "urn:dicom:uid"]
    return str(uids[0]) if uids else ""


#: The operation as ``fhir_server.operations.register`` takes it.
OPERATION = Operation(link_imaging, "https://overread.org/fhir/OperationDefinition/ServiceRequest-link-imaging")
