"""Structural validation of every write with the fhir.resources R4B models.

The R4B models accept R4 (4.0.1) JSON for the types served here; the package's default
(R5) models would reject it.
"""

import re
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel, ValidationError

from fhir_server.errors import FhirError, Issue, error

SUPPORTED_TYPES = (
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Endpoint", "Coverage", "Encounter",
    "ServiceRequest", "Task", "ImagingStudy", "DiagnosticReport", "Observation", "DocumentReference",
    "Binary", "Communication", "Subscription", "AuditEvent", "Provenance", "CodeSystem", "ValueSet",
    "ConceptMap", "StructureDefinition", "SearchParameter", "OperationDefinition",
)  # fmt: skip

ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@cache
def model(resource_type: str) -> type[BaseModel]:
    return get_fhir_model_class(resource_type)


def check_type(resource_type: str) -> None:
    if resource_type not in SUPPORTED_TYPES:
        raise error(404, "not-supported", f"Resource type {resource_type!r} is not supported by this server")


def check_id(resource_id: str) -> None:
    if not ID.match(resource_id):
        raise error(400, "invalid", f"{resource_id!r} is not a valid resource id (R4 datatypes §id)")


def validate(resource: Any, resource_type: str | None = None) -> dict[str, Any]:
    """Return the resource if it is a valid R4 resource of a supported type, else raise.

    400 when the body is not a resource of the expected type at all, 422 when it is one
    but breaks the rules of its type (unknown elements, wrong datatypes, cardinality).
    """
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise error(400, "structure", "The body must be a JSON object with a resourceType")
    actual = resource["resourceType"]
    if resource_type is not None and actual != resource_type:
        raise error(400, "invalid", f"Expected a {resource_type} but the body is a {actual}", "resourceType")
    check_type(actual)
    if "id" in resource:
        if not isinstance(resource["id"], str):
            raise error(400, "invalid", "Resource.id must be a string", f"{actual}.id")
        check_id(resource["id"])
    try:
        model(actual).model_validate(resource)
    except ValidationError as exc:
        raise FhirError(422, [_issue(actual, e) for e in exc.errors()]) from None
    return resource


def _issue(resource_type: str, err: Any) -> Issue:
    path = resource_type
    for part in err.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "__root__":
            path += f".{part}"
    return Issue(
        "invalid" if err.get("type") != "extra_forbidden" else "structure", err["msg"], expression=(path,)
    )
