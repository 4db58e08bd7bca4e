"""The CapabilityStatement (R4 capabilitystatement.html), generated from what the code does.

Types come from ``validation.SUPPORTED_TYPES``, search parameters from the registry the
indexer and the search use, profiles (``supportedProfile``) from conformance/'s StructureDefinitions
that validation enforces, so /metadata cannot claim what the server does not do.
"""

from functools import cache
from typing import Any

from fhir_server import dates, operations, profiles
from fhir_server.search_params import registry
from fhir_server.validation import SUPPORTED_TYPES

INTERACTIONS = [
    "read",
    "vread",
    "update",
    "patch",
    "delete",
    "history-instance",
    "history-type",
    "create",
    "search-type",
]
CONTROL_PARAMS = ["_count", "_sort", "_include", "_revinclude", "_summary", "_total", "_elements"]


@cache
def _resources() -> list[dict[str, Any]]:
    resources = []
    for rtype in SUPPORTED_TYPES:
        params = registry()[rtype]
        searches = [
            {"name": p.code, "type": p.type, "definition": p.url} for p in sorted(params.values(), key=lambda p: p.code)
        ]
        reference_params = sorted(p.code for p in params.values() if p.type == "reference")
        resources.append(
            {
                "type": rtype,
                "profile": f"http://hl7.org/fhir/StructureDefinition/{rtype}",
                "interaction": [{"code": code} for code in INTERACTIONS],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalRead": "not-match",
                "conditionalUpdate": True,
                "conditionalDelete": "single",
                "referencePolicy": ["literal", "logical"],
                "searchInclude": [f"{rtype}:{code}" for code in reference_params],
                "searchRevInclude": ["*"],
                "searchParam": searches,
                **({"supportedProfile": sp} if (sp := profiles.supported(rtype)) else {}),
                **({"operation": ops} if (ops := operations.capability(rtype)) else {}),
            }
        )
    return resources


def statement(base: str) -> dict[str, Any]:
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": dates.instant(dates.now())[:10],
        "publisher": "Overread",
        "kind": "instance",
        "software": {"name": "Overread", "version": "0.1.0"},
        "implementation": {"description": "Overread second-opinion interoperability server", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": "Search control parameters: "
                + ", ".join(CONTROL_PARAMS)
                + "; reverse chaining with _has:Type:reference:parameter (R4 search.html#has)",
                "resource": _resources(),
                "interaction": [
                    {"code": "transaction"},
                    {"code": "batch"},
                    {"code": "search-system", "documentation": "_type and the parameters common to the types searched"},
                    {"code": "history-system"},
                ],
            }
        ],
    }
