"""Search index rows of one resource (R4 §3.1.1.5 search parameter types).

Each search parameter's FHIRPath expression is evaluated on the resource and every value
becomes rows of the index table of the parameter's type, normalised the way the search
compares them (strings case-folded without accents, dates as UTC ranges, references split
into type and id).
"""

import re
import unicodedata
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

from fhir_server import dates
from fhir_server.schema import (
    Base,
    DateIndex,
    NumberIndex,
    QuantityIndex,
    ReferenceIndex,
    StringIndex,
    TokenIndex,
    UriIndex,
)
from fhir_server.search_params import SearchParam, registry

Row = tuple[type[Base], dict[str, Any]]

CONTACT_SYSTEMS = {"phone", "fax", "email", "pager", "url", "sms", "other"}
_LITERAL_REF = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")
MAX_LEN = 255
#: Parts of HumanName and Address that are no text: the string parameters name and address
#: search "any of the string fields" (search-parameters: individual-address, Patient-name),
#: and a code like "official" or "home" (use, type) or an element id is none of them.
_NOT_TEXT = frozenset({"use", "type", "id"})


def normalize(text: str) -> str:
    """Case-folded and without accents: what string search compares (R4 §3.1.1.5.6)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def split_reference(reference: str) -> tuple[str | None, str | None]:
    """("Patient", "123") from "Patient/123", ".../fhir/Patient/123/_history/2" and the like."""
    m = _LITERAL_REF.search(reference)
    return (m[1], m[2]) if m else (None, None)


def index_rows(resource_type: str, resource: dict[str, Any]) -> Iterator[Row]:
    present = _element_names(resource)
    for param in registry()[resource_type].values():
        if not param.expression:
            continue
        if param.roots is not None and param.roots.isdisjoint(present):
            continue  # even a walk that finds nothing costs more than this test
        for value in param.evaluate(resource):
            yield from _rows(param, value)


def _element_names(resource: dict[str, Any]) -> set[str]:
    """The resource's keys and their camelCase prefixes: a choice element's name ("deceased")
    is a prefix of its key ("deceasedBoolean"), and a parameter's roots are element names."""
    names = set(resource)
    for key in resource:
        names.update(key[: m.start()] for m in _CAMEL.finditer(key, 1))
    return names


_CAMEL = re.compile(r"[A-Z]")


def _rows(param: SearchParam, value: Any) -> Iterator[Row]:
    p = param.code
    match param.type:
        case "token":
            for system, code in _tokens(value):
                yield TokenIndex, {"param": p, "system": _cut(system), "code": _cut(code)}
        case "string":
            for text in _strings(value):
                yield StringIndex, {"param": p, "value": _cut(text), "norm": _cut(normalize(text))}
        case "reference":
            ref = value.get("reference") if isinstance(value, dict) else value
            if isinstance(ref, str) and not ref.startswith("#"):
                # Only a relative reference is known to be to this server; an absolute one is
                # kept whole (the index cannot know the base the server is reached by).
                target_type, target_id = (None, None) if ":" in ref else split_reference(ref)
                url = ref if target_type is None else None
                yield (
                    ReferenceIndex,
                    {"param": p, "target_type": target_type, "target_id": target_id, "url": url},
                )
        case "date":
            for low, high in _ranges(value):
                yield DateIndex, {"param": p, "low": low, "high": high}
        case "number":
            if isinstance(value, int | float | Decimal) and not isinstance(value, bool):
                yield NumberIndex, {"param": p, "value": float(value)}
        case "uri":
            if isinstance(value, str):
                yield UriIndex, {"param": p, "value": value[:512]}
        case "quantity":
            if isinstance(value, dict) and "value" in value:
                code = value.get("code") or value.get("unit")
                yield QuantityIndex, {
                    "param": p, "value": float(value["value"]), "system": value.get("system"), "code": code,
                }  # fmt: skip


def _tokens(value: Any) -> Iterator[tuple[str | None, str | None]]:
    if isinstance(value, bool):
        yield None, "true" if value else "false"
    elif isinstance(value, str | int):
        yield None, str(value)
    elif isinstance(value, dict):
        if "coding" in value or "text" in value:  # CodeableConcept
            for coding in value.get("coding", []):
                yield from _tokens(coding)
        elif "value" in value:  # Identifier, or ContactPoint whose system is no URI
            system = value.get("system")
            yield (None if system in CONTACT_SYSTEMS else system), str(value["value"])
        elif "code" in value:  # Coding
            yield value.get("system"), value["code"]


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):  # HumanName, Address: every textual part is searchable
        for key, part in value.items():
            if key in _NOT_TEXT:
                continue
            if isinstance(part, str):
                yield part
            elif isinstance(part, list):
                yield from (s for s in part if isinstance(s, str))


def _ranges(value: Any) -> Iterator[tuple[Any, Any]]:
    try:
        if isinstance(value, str):
            yield dates.parse_range(value)
        elif isinstance(value, dict) and ("start" in value or "end" in value):  # Period
            low = dates.parse_range(value["start"])[0] if "start" in value else dates.MIN
            high = dates.parse_range(value["end"])[1] if "end" in value else dates.MAX
            yield low, high
    except ValueError:
        return


def _cut(text: str | None) -> str | None:
    return text[:MAX_LEN] if text is not None else None
