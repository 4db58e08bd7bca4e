"""The FHIR operations this server implements (R4 operations.html), by type and name.

Instance-level operations of one resource type (``INSTANCE``) come from the application, which
registers them at start-up (``register``; ``$link-imaging`` is the second-opinion case's).

``[base]/[type]/$validate`` and ``[base]/[type]/[id]/$validate`` (R4 resource-operation-validate):
the structural rules of the type and the profiles the resource claims or must conform to
(``fhir_server.profiles``), plus the ``profile`` parameter's; 200 with an OperationOutcome
(information "valid", or every issue). It never writes. The body is the resource or a
Parameters with ``resource`` (and ``profile``, ``mode``); ``?profile=`` and ``?mode=`` work too.
The instance level validates the stored resource when no body is given; ``mode=delete``
is always valid here (nothing in this server refuses a delete).
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fhir_server import profiles
from fhir_server.errors import FhirError, Issue, error, information, operation_outcome
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.repository import Repository


@dataclass(frozen=True)
class Operation:
    """An instance-level operation: ``run(repo, request, id)``, and the canonical url of its OperationDefinition."""

    run: Callable[[Repository, FhirRequest, str], FhirResponse]
    definition: str


#: (resource type, operation name without "$") → the instance-level operation (``register``).
INSTANCE: dict[tuple[str, str], Operation] = {}


def register(rtype: str, name: str, operation: Operation) -> None:
    """Serve ``POST [base]/[rtype]/[id]/$[name]`` in this process (the application does, at start-up)."""
    INSTANCE[(rtype, name)] = operation


VALIDATE = "http://hl7.org/fhir/OperationDefinition/Resource-validate"
MODES = ("create", "update", "delete", "profile")


def validate(repo: Repository, req: FhirRequest, rtype: str, rid: str | None) -> FhirResponse:
    """``$validate``: every issue of the resource, as a 200 OperationOutcome; nothing is written."""
    resource, wanted, mode = _validate_input(req)
    if mode is not None and mode not in MODES:
        raise error(400, "invalid", f"mode {mode!r} is not one of {', '.join(MODES)}", "mode")
    if rid is not None and mode == "delete":  # R4: the content, if any, is not looked at
        return FhirResponse(200, information(f"{rtype}/{rid} may be deleted", "informational"))
    if resource is None and rid is not None:
        resource = repo.read(rtype, rid).resource
    if not isinstance(resource, dict):
        raise error(400, "structure", "$validate needs a resource: the body, or a Parameters with 'resource'")
    if resource.get("resourceType") != rtype:
        raise error(400, "invalid", f"Expected a {rtype} but the resource is a {resource.get('resourceType')}")
    if rid is not None and mode in ("update", None) and resource.get("id", rid) != rid:
        raise error(400, "invalid", f"The resource's id {resource.get('id')!r} is not {rid!r}", "id")
    from fhir_server.validation import check_structure  # validation imports profiles, not us

    try:
        check_structure(resource)  # the type's rules; then, as a write would, the profiles and their coding
    except FhirError as exc:
        issues: list[Issue] = exc.issues
    else:
        issues = profiles.check(resource, wanted, repo)
    if not issues:
        return FhirResponse(200, information("valid", "informational"))
    unique = list(dict.fromkeys(issues))
    return FhirResponse(200, operation_outcome(unique))


def parameters(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A Parameters resource's ``parameter`` list (R4 parameters.html: 0..* BackboneElement), else 400."""
    found = body.get("parameter", [])
    if not isinstance(found, list) or not all(isinstance(p, dict) for p in found):
        raise error(400, "structure", "Parameters.parameter must be an array of objects", "Parameters.parameter")
    return found


def _validate_input(req: FhirRequest) -> tuple[Any, list[str], str | None]:
    """(resource, profiles, mode) from the query and the body (a resource, or a Parameters)."""
    wanted = [v for k, v in req.params if k == "profile"]
    mode = next((v for k, v in req.params if k == "mode"), None)
    body = req.body
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        resource = None
        for parameter in parameters(body):
            name = parameter.get("name")
            if name == "resource":
                resource = parameter.get("resource")
            elif name == "profile":
                wanted.append(parameter.get("valueUri") or parameter.get("valueCanonical") or "")
            elif name == "mode":
                mode = parameter.get("valueCode")
        return resource, wanted, mode
    return body, wanted, mode


#: Operations on every type, at type and instance level, and the methods they answer.
EVERY_TYPE: dict[str, tuple[str, ...]] = {"validate": ("POST", "GET")}


def instance(repo: Repository, req: FhirRequest, rtype: str, rid: str, name: str) -> FhirResponse:
    if name.removeprefix("$") in EVERY_TYPE:
        return type_level(repo, req, rtype, name, rid)
    operation = INSTANCE.get((rtype, name.removeprefix("$")))
    if operation is None or req.method != "POST":
        raise error(
            404 if operation is None else 405,
            "not-supported",
            f"{req.method} {rtype}/[id]/{name} is not an operation here",
        )
    return operation.run(repo, req, rid)


def type_level(repo: Repository, req: FhirRequest, rtype: str, name: str, rid: str | None = None) -> FhirResponse:
    """``[base]/[type]/$name`` (and ``[base]/[type]/[id]/$name``): the operations on every type (``$validate``)."""
    methods = EVERY_TYPE.get(name.removeprefix("$"))
    if methods is None or req.method not in methods:
        at = rtype if rid is None else f"{rtype}/[id]"
        raise error(
            404 if methods is None else 405, "not-supported", f"{req.method} {at}/{name} is not an operation here"
        )
    return validate(repo, req, rtype, rid)


def capability(rtype: str) -> list[dict[str, str]]:
    """The CapabilityStatement's ``rest.resource.operation`` entries of ``rtype``."""
    own = [{"name": name, "definition": op.definition} for (t, name), op in INSTANCE.items() if t == rtype]
    return [*own, {"name": "validate", "definition": VALIDATE}]
