"""Structural validation of every write with the fhir.resources R4B models.

The R4B models accept R4 (4.0.1) JSON for the types served here; the package's default
(R5) models would reject it.
"""

import re
import types
import typing
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import BaseModel, ValidationError

from fhir_server import profiles
from fhir_server.errors import FhirError, Issue, error
from fhir_server.lookup import Lookup

SUPPORTED_TYPES = (
    "Patient", "Practitioner", "PractitionerRole", "Organization", "Endpoint", "Coverage", "Encounter",
    "ServiceRequest", "Task", "ImagingStudy", "DiagnosticReport", "Observation", "DocumentReference",
    "Binary", "Communication", "Subscription", "AuditEvent", "Provenance", "CodeSystem", "ValueSet",
    "ConceptMap", "StructureDefinition", "SearchParameter", "OperationDefinition",
    "Condition", "AllergyIntolerance",  # an order's diagnoses (DG1) and the patient's allergies (AL1)
    "Location",  # where the patient is: PV1-3 and the other PV1/PV2 locations of an order
)  # fmt: skip

ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")


@cache
def model(resource_type: str) -> type[BaseModel]:
    return get_fhir_model_class(resource_type)


def check_type(resource_type: str) -> None:
    if resource_type not in SUPPORTED_TYPES:
        raise error(404, "not-supported", f"Resource type {resource_type!r} is not supported by this server")


def check_id(resource_id: object) -> None:
    """R4 datatypes.html#id, less "." and "..": URL dot-segments (RFC 3986 §5.2.4) name no resource.
    Any JSON value may come from a body (a conditional update takes the body's id)."""
    if not isinstance(resource_id, str) or not ID.fullmatch(resource_id) or resource_id in (".", ".."):
        raise error(400, "invalid", f"{resource_id!r} is not a valid resource id (R4 datatypes §id)")


def validate(resource: Any, resource_type: str | None = None, store: Lookup | None = None) -> dict[str, Any]:
    """Return the resource if it is a valid R4 resource of a supported type, else raise.

    400 when the body is not a resource of the expected type at all, 422 when it is one
    but breaks the rules of its type (unknown elements, wrong datatypes, cardinality) or of
    the profiles it must conform to (``fhir_server.profiles``, with the rules the application
    registered there). ``store`` (the repository writing it) is what those rules may read.
    """
    checked = check_structure(resource, resource_type)
    unmet = profiles.check(checked, (), store)
    if unmet:
        raise FhirError(422, unmet)
    return checked


def check_structure(resource: Any, resource_type: str | None = None) -> dict[str, Any]:
    """``resource`` if it is an R4 resource of a supported type (and ``resource_type``, if given), else raise."""
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
    # The models coerce ("active": "yes" → True, "multipleBirthInteger": "2" → 2) but the
    # server stores and serves the JSON it was given, so the JSON types must be right too.
    wrong = _json_type_issues(model(actual), resource, actual, [])
    if wrong:
        raise FhirError(422, wrong)
    return resource


def _issue(resource_type: str, err: Any) -> Issue:
    path = resource_type
    for part in err.get("loc", ()):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "__root__":
            path += f".{part}"
    return Issue("invalid" if err.get("type") != "extra_forbidden" else "structure", err["msg"], expression=(path,))


# -- JSON representation of primitive types (R4 json.html#primitive) -----------------------

#: What each primitive type must be in JSON: boolean → true/false; integer, positiveInt,
#: unsignedInt and decimal → a number; every other primitive → a string.
_JSON_KINDS: dict[type, tuple[str, tuple[type, ...]]] = {
    bool: ("boolean", (bool,)),
    int: ("integer", (int,)),
    Decimal: ("number", (int, float)),
    str: ("string", (str,)),
    bytes: ("string", (str,)),
    date: ("string", (str,)),
    datetime: ("string", (str,)),
    time: ("string", (str,)),
}


@dataclass(frozen=True)
class Element:
    #: A primitive type (bool, int, Decimal, str, date, ...) or a model class; None: unknown.
    kind: Any
    repeats: bool
    #: The codes of a required binding the models list in full, else None. The models
    #: list only the first few codes of long value sets (ending in "+"), and some lists
    #: belong to extensible bindings ("etc."): those are not checked here.
    codes: frozenset[str] | None = None


@cache
def elements(cls: type[BaseModel]) -> dict[str, Element]:
    """The elements of a model by JSON name."""
    out: dict[str, Element] = {}
    for name, info in cls.model_fields.items():
        key = info.alias or name
        if key.startswith("_") or name == "fhir_comments":
            continue  # primitive extensions (``_birthDate``) and comments: left to the model
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        enum = extra.get("enum_values")
        codes = frozenset(str(c) for c in enum) if isinstance(enum, list) else None
        out[key] = Element(*_kind(info.annotation), None if codes is None or {"+", "etc."} & codes else codes)
    return out


def _kind(annotation: Any) -> tuple[Any, bool]:
    """Unwrap Optional, Annotated and List down to a primitive type or a model class."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _kind(args[0])
    if origin is list:
        return _kind(args[0])[0], True
    if origin in (typing.Union, types.UnionType):
        kinds = [_kind(a) for a in args if a is not type(None)]
        return kinds[0] if len(kinds) == 1 else (None, False)
    klass = getattr(annotation, "_model_klass", None)  # fhir.resources' abc.<Type>Type proxies
    if isinstance(klass, str):
        return _model_by_path(klass), False
    return annotation, False


@cache
def _model_by_path(path: str) -> type[BaseModel] | None:
    name = path.rsplit(".", 1)[-1]
    if name == "Resource":
        return None  # contained / Bundle.entry.resource: resolved by the value's resourceType
    try:
        cls: type[BaseModel] = get_fhir_model_class(name)
        return cls
    except (KeyError, ValueError, AttributeError):
        return None


def _json_type_issues(cls: type[BaseModel], obj: dict[str, Any], path: str, issues: list[Issue]) -> list[Issue]:
    """Add to ``issues`` the elements of ``obj`` (a ``cls`` at ``path``) whose JSON type is wrong.

    It runs on every write, so it appends instead of yielding and names an element's path only
    when it reports it: no generator or path string per element on the write path.
    """
    fields = elements(cls)
    for key, value in obj.items():
        field = fields.get(key)
        if field is None:
            continue  # unknown elements: the model reports them
        if field.repeats and isinstance(value, list):
            for i, item in enumerate(value):
                _json_type_issue(field, item, path, key, i, issues)
        else:
            _json_type_issue(field, value, path, key, None, issues)
    return issues


def _json_type_issue(field: Element, value: Any, parent: str, key: str, i: int | None, issues: list[Issue]) -> None:
    if value is None or isinstance(value, list):
        return  # null and wrong cardinality are the model's to report
    kind = field.kind
    if isinstance(value, dict):
        if kind is None and isinstance(value.get("resourceType"), str):
            kind = _model_by_path(value["resourceType"])  # a contained or Bundle entry resource
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            _json_type_issues(kind, value, _path(parent, key, i), issues)
        return
    expected = _JSON_KINDS.get(kind)
    if expected is None:
        return
    name, types = expected
    if not isinstance(value, types) or (isinstance(value, bool) and kind is not bool):
        path = _path(parent, key, i)
        issues.append(Issue("invalid", f"{path} must be a JSON {name}, not {value!r}", expression=(path,)))
    elif field.codes is not None and value not in field.codes:
        # R4 terminologies.html#required: a code outside a required binding is an error.
        path = _path(parent, key, i)
        issues.append(
            Issue("code-invalid", f"{path}: {value!r} is not one of {sorted(field.codes)}", expression=(path,))
        )


def _path(parent: str, key: str, i: int | None) -> str:
    return f"{parent}.{key}" if i is None else f"{parent}.{key}[{i}]"
