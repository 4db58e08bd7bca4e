"""The FHIR operations this server implements (R4 operations.html), by type and name.

``POST [base]/ServiceRequest/[id]/$link-imaging``: queue the order's image-linking job
again now, e.g. after the study reached the PACS or a PACS peer was fixed. The job runs
in the background (``dicom_bridge.linking``), so the answer is 202 Accepted; the case's
Task.businessStatus tells how it went.
"""

from collections.abc import Callable

from fhir_server import cases
from fhir_server.errors import error, information
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.repository import Repository

Operation = Callable[[Repository, FhirRequest, str], FhirResponse]
BASE = "https://overread.org/fhir/OperationDefinition"


def link_imaging(repo: Repository, req: FhirRequest, order_id: str) -> FhirResponse:
    cases.relink(repo, order_id)
    return FhirResponse(202, information(f"An image-linking job for ServiceRequest/{order_id} is queued"))


#: (resource type, operation name without "$") → the instance-level operation.
INSTANCE: dict[tuple[str, str], Operation] = {("ServiceRequest", "link-imaging"): link_imaging}


def instance(repo: Repository, req: FhirRequest, rtype: str, rid: str, name: str) -> FhirResponse:
    operation = INSTANCE.get((rtype, name.removeprefix("$")))
    if operation is None or req.method != "POST":
        raise error(
            404 if operation is None else 405,
            "not-supported",
            f"{req.method} {rtype}/[id]/{name} is not an operation here",
        )
    return operation(repo, req, rid)


def capability(rtype: str) -> list[dict[str, str]]:
    """The CapabilityStatement's ``rest.resource.operation`` entries of ``rtype``."""
    return [{"name": name, "definition": f"{BASE}/{t}-{name}"} for t, name in INSTANCE if t == rtype]
