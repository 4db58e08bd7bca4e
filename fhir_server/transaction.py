"""A transaction Bundle from a door that is not HTTP (HL7 intake, workers): R4 http.html#transaction.

Its entries run through the same RESTful interactions as the HTTP API's (``fhir_server.router``),
in the caller's database transaction, so the bridges need neither the router nor a base URL of ours.
"""

from typing import Any

from fhir_server import bundle
from fhir_server.errors import error
from fhir_server.repository import Repository
from fhir_server.router import handle


def transaction(repo: Repository, body: dict[str, Any], base: str, *, savepoint: bool = True) -> dict[str, Any]:
    """Run the transaction Bundle ``body`` all or nothing; its transaction-response Bundle.

    ``base`` resolves the entries' absolute URLs; a failing entry raises its ``FhirError``.
    ``savepoint=False``: the caller rolls back its own savepoint on any exception (``bundle.process``).
    """
    if body.get("type") != "transaction":
        raise error(400, "invalid", f"Bundle.type must be transaction, not {body.get('type')!r}", "Bundle.type")
    return bundle.process(body, repo, base, handle, savepoint=savepoint)
