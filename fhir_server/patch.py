"""The patch interaction (R4 http.html#patch) with JSON Patch documents (RFC 6902).

``PATCH [base]/[type]/[id]`` (or ``[type]?[criteria]``, conditional) with
``Content-Type: application/json-patch+json``; in a batch or transaction the document is the
base64 ``data`` of a Binary entry (R4 http.html#transaction). A JSON object instead of an array
is a JSON Merge Patch (RFC 7386): what fhirpy's ``resource.patch(...)`` sends. The patched resource goes
through the one write path as an update (validation, hooks, a new version), so a patch that
would leave an invalid resource is refused like such an update (422). ``If-Match`` guards
against lost updates (412); without it the resource is read and written under its lock, so
two concurrent patches both apply, one after the other. FHIRPath Patch (a Parameters body)
is not supported: 415.
"""

import base64
import binascii
from typing import Any

import jsonpatch
import jsonpointer
import orjson

from fhir_server.errors import error
from fhir_server.limits import DEFAULT, check_json
from fhir_server.repository import Repository, Stored

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"


def document(body: Any) -> list[dict[str, Any]] | dict[str, Any]:
    """The JSON Patch operations of a request body (the array itself, or a Binary that carries
    it), or the object of a JSON Merge Patch."""
    if isinstance(body, dict) and body.get("resourceType") == "Binary":
        if body.get("contentType") != JSON_PATCH:
            raise error(415, "not-supported", f"A patch Binary must have contentType {JSON_PATCH}")
        data = body.get("data", "")
        try:
            if not isinstance(data, str):
                raise ValueError("Binary.data must be a string")
            body = orjson.loads(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as exc:
            raise error(400, "structure", f"The Binary's data is not a base64 JSON Patch document: {exc}") from None
        check_json(body, DEFAULT, "The patch document")
    if isinstance(body, dict) and body.get("resourceType") == "Parameters":
        raise error(415, "not-supported", f"FHIRPath Patch is not supported; send a JSON Patch ({JSON_PATCH})")
    if isinstance(body, dict):
        return body
    if not isinstance(body, list) or not all(isinstance(op, dict) for op in body):
        raise error(400, "structure", "A JSON Patch document is an array of operations (RFC 6902)")
    return body


def patch(repo: Repository, resource_type: str, resource_id: str, body: Any, if_match: str | None) -> Stored:
    """Apply ``body`` to the current version of the resource and store the result as its next version."""
    operations = document(body)
    repo.lock(f"{resource_type}/{resource_id}")  # read, patch and write as one step
    current = repo.read(resource_type, resource_id)
    if isinstance(operations, dict):
        return _stored(repo, current, merged(current.resource, operations), if_match)
    try:
        patched = jsonpatch.JsonPatch(operations).apply(current.resource)
    except jsonpatch.JsonPatchTestFailed as exc:
        raise error(409, "conflict", f"A test operation of the patch failed: {exc}") from None
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise error(422, "processing", f"The patch cannot be applied: {exc}") from None
    return _stored(repo, current, patched, if_match)


def merged(target: Any, patch: Any) -> Any:
    """RFC 7386 section 2: objects merge member by member, ``null`` removes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, value in patch.items():
        if value is None:
            result.pop(name, None)
        else:
            result[name] = merged(result.get(name), value)
    return result


def _stored(repo: Repository, current: Stored, patched: Any, if_match: str | None) -> Stored:
    if not isinstance(patched, dict) or (patched.get("resourceType"), patched.get("id")) != (current.type, current.id):
        raise error(422, "processing", "A patch may not change a resource's type or id")
    stored, _ = repo.update(current.type, current.id, patched, if_match)
    return stored
