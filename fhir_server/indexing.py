"""Search index rows of one resource (R4 §3.1.1.5 search parameter types).

Each search parameter's FHIRPath expression is evaluated on the resource and every value
becomes rows of the index table of the parameter's type, normalised the way the search
compares them (strings case-folded without accents, dates as UTC ranges, references split
into type and id). A string, token or URI value is kept whole: its first ``KEY`` characters
in the indexed column, the rest beside it (``split``).
"""

import re
import unicodedata
from collections.abc import Iterator
from decimal import Decimal
from typing import Any, overload

from fhir_server import dates
from fhir_server.schema import (
    KEY,
    URI_KEY,
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


@overload
def split(text: str, key: int = KEY) -> tuple[str, str]: ...
@overload
def split(text: None, key: int = KEY) -> tuple[None, str]: ...
@overload
def split(text: str | None, key: int = KEY) -> tuple[str | None, str]: ...
def split(text: str | None, key: int = KEY) -> tuple[str | None, str]:
    """A value as the index holds it: its first ``key`` characters (the B-tree's column) and the
    rest ("" for most values), so that the whole value is compared while lookups stay indexed."""
    return (None, "") if text is None else (text[:key], text[key:])


def index_rows(resource_type: str, resource: dict[str, Any], base: str = "") -> Iterator[Row]:
    """The index rows of ``resource``; ``base`` is this server's FHIR base: a reference under it is local."""
    present = _element_names(resource)
    for param in registry()[resource_type].values():
        if not param.expression:
            continue
        if param.roots is not None and param.roots.isdisjoint(present):
            continue  # even a walk that finds nothing costs more than this test
        for value in param.evaluate(resource):
            yield from _rows(param, value, base)


def _element_names(resource: dict[str, Any]) -> set[str]:
    """The resource's keys and their camelCase prefixes: a choice element's name ("deceased")
    is a prefix of its key ("deceasedBoolean"), and a parameter's roots are element names."""
    names = set(resource)
    for key in resource:
        names.update(key[: m.start()] for m in _CAMEL.finditer(key, 1))
    return names


_CAMEL = re.compile(r"[A-Z]")


def _rows(param: SearchParam, value: Any, base: str) -> Iterator[Row]:
    p = param.code
    match param.type:
        case "token":
            for system, code in _tokens(value):
                (system, system_rest), (code, code_rest) = split(system), split(code)
                yield TokenIndex, {"param": p, "system": system, "system_rest": system_rest,
                                   "code": code, "code_rest": code_rest}  # fmt: skip
        case "string":
            for text in _strings(value):
                (text, text_rest), (norm, norm_rest) = split(text), split(normalize(text))
                yield StringIndex, {"param": p, "value": text, "value_rest": text_rest,
                                    "norm": norm, "norm_rest": norm_rest}  # fmt: skip
        case "reference":
            ref = value.get("reference") if isinstance(value, dict) else value
            if isinstance(ref, str) and not ref.startswith("#"):
                # A relative reference is to this server, and so is an absolute one under its base
                # (R4 references.html#literal); any other absolute one is kept whole.
                local = ref.removeprefix(f"{base}/") if base else ref
                target_type, target_id = (None, None) if ":" in local else split_reference(local)
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
                uri, rest = split(value, URI_KEY)
                yield UriIndex, {"param": p, "value": uri, "value_rest": rest}
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
