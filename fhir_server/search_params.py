"""The search parameters the server indexes and understands.

Definitions are the official R4 SearchParameter resources (conformance/search-parameters.json),
restricted to the types served, then Overread's own (conformance/search-parameters-overread.json,
e.g. Task ``due``). Each definition is compiled once per resource type into a
fhirpathpy function over that type's part of the expression.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fhirpathpy import compile as fhirpath_compile
from fhirpathpy.models import models
from pydantic import BaseModel

import conformance
from fhir_server.validation import SUPPORTED_TYPES, elements, model

#: Overread's own search parameters, beside the official R4 ones.
OVERREAD_PARAMS = "search-parameters-overread.json"
#: Parameters on the resource table itself, not in an index table.
COLUMN_PARAMS = {"_id": "token", "_lastUpdated": "date"}

# fhirpathpy does not implement resolve(); a reference "is" a type when its
# literal reference names that type, which is all the index can know anyway.
_RESOLVE_IS = re.compile(r"resolve\(\)\s+is\s+([A-Z][A-Za-z]+)")


@dataclass(frozen=True)
class SearchParam:
    code: str
    type: str
    url: str
    expression: str = ""
    targets: tuple[str, ...] = ()
    #: The top-level elements the expression starts from (``Observation.effective`` → "effective",
    #: which matches effectiveDateTime too), or None when it is not that simple. A resource
    #: with none of them cannot have a value, and the indexer skips evaluating it.
    roots: frozenset[str] | None = None
    evaluate: Callable[[dict[str, Any]], list[Any]] = field(default=lambda _: [], compare=False)


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression on its top-level ``|`` operators."""
    parts, depth, start, quoted = [], 0, 0, False
    for i, ch in enumerate(expression):
        if ch == "'":
            quoted = not quoted
        elif quoted:
            continue
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


def _for_type(expression: str, resource_type: str) -> str:
    """The part of a multi-type expression that applies to one resource type."""
    expression = expression.replace("Resource.", f"{resource_type}.")
    mine = [p for p in split_union(expression) if p.lstrip("(").startswith(f"{resource_type}.")]
    return " | ".join(mine)


_ROOT = re.compile(r"^\(*([A-Z][A-Za-z]+)\.([a-z][A-Za-z]*)")
# Functions and operators that answer something even on an empty collection
# (``Patient.deceased.exists() and Patient.deceased != false`` is false, not empty).
_NOT_EMPTY_ON_EMPTY = re.compile(r"\b(exists|empty|count|not|iif|all\w*|any\w*|and|or|xor|implies)\b|!=")


def _roots(expression: str, resource_type: str) -> frozenset[str] | None:
    roots = set()
    for part in split_union(expression):
        m = _ROOT.match(part)
        if m is None or m[1] != resource_type or _NOT_EMPTY_ON_EMPTY.search(part):
            return None
        roots.add(m[2])
    return frozenset(roots)


_PLAIN = re.compile(r"^[A-Z][A-Za-z]+(\.[a-z][A-Za-z]*)+$")
#: ``(Observation.value as Quantity)``, maybe followed by element names: ``(... as CodeableConcept).text``.
_CAST = re.compile(r"^\((?P<path>[^()]+) as (?P<type>[A-Za-z]+)\)(?P<rest>(?:\.[a-z][A-Za-z]*)*)$")
#: A trailing filter on one element's literal value, or on what a reference points to.
_WHERE = re.compile(
    r"^(?P<path>.+?)\.where\("
    r"(?:(?P<key>[a-z][A-Za-z]*)\s*=\s*'(?P<value>[^'\\]*)'|resolve\(\) is (?P<target>[A-Z][A-Za-z]+))"
    r"\)$"
)

Walk = Callable[[dict[str, Any]], list[Any]]


def _json_steps(part: str) -> list[tuple[str, ...]] | None:
    """The JSON names each step of a path may have, checked against the R4 model; None if not that simple.

    A choice element gives all its JSON names (``ServiceRequest.occurrence``: occurrenceDateTime,
    occurrencePeriod, occurrenceTiming), a cast one of them (``(Patient.deceased as dateTime)``:
    deceasedDateTime). Only one of a choice's names can be present in a resource.
    """
    cast = _CAST.match(part)
    path = cast["path"] if cast else part
    if not _PLAIN.match(path):
        return None
    resource_type, *names = path.split(".")
    tail = cast["rest"].split(".")[1:] if cast else []
    kind: Any = model(resource_type)
    steps: list[tuple[str, ...]] = []
    for index, name in enumerate([*names, *tail]):
        fields = elements(kind) if isinstance(kind, type) and issubclass(kind, BaseModel) else {}
        if cast and index == len(names) - 1:
            choices: tuple[str, ...] = (name + cast["type"][0].upper() + cast["type"][1:],)
        elif name in fields:
            choices = (name,)
        else:
            choices = tuple(k for k in fields if k.startswith(name) and k[len(name) : len(name) + 1].isupper())
        if not choices or any(c not in fields for c in choices):
            return None
        if len(choices) > 1 and index < len(names) + len(tail) - 1:
            return None  # a step after an uncast choice would depend on which type is present
        kind = fields[choices[0]].kind
        steps.append(choices)
    return steps


def _simple(part: str) -> Walk | None:
    """A dictionary walk for one part of an expression (paths, choices, casts, one ``where``), else None."""
    where = _WHERE.match(part)
    steps = _json_steps(where["path"] if where else part)
    if steps is None:
        return None
    if where is None:
        return lambda resource: _walk(resource, steps)
    if where["target"]:
        pattern = re.compile(rf"(^|/){where['target']}/[^/]+(/_history/[^/]+)?$", re.DOTALL)

        def refers(value: Any) -> bool:
            reference = value.get("reference") if isinstance(value, dict) else None
            return isinstance(reference, str) and pattern.search(reference) is not None

        return lambda resource: [v for v in _walk(resource, steps) if refers(v)]
    key, literal = where["key"], where["value"]
    return lambda resource: [v for v in _walk(resource, steps) if isinstance(v, dict) and v.get(key) == literal]


def _walk(resource: dict[str, Any], steps: list[tuple[str, ...]]) -> list[Any]:
    """What FHIRPath gives for a path: every value along it, lists flattened."""
    values: list[Any] = [resource]
    for names in steps:
        found: list[Any] = []
        for value in values:
            if not isinstance(value, dict):
                continue
            for name in names:
                child = value.get(name)
                if isinstance(child, list):
                    found.extend(child)
                elif child is not None:
                    found.append(child)
        values = found
    return values


def _compile(expression: str) -> Walk:
    """Compile an expression to dictionary walks when every part is simple, else with fhirpathpy.

    Nearly all search parameters are simple (``Patient.identifier``, ``Patient.name.family``,
    ``Patient.telecom.where(system='phone')``, ``Encounter.subject.where(resolve() is Patient)``,
    ``(Observation.value as Quantity)``); fhirpathpy spends tens of microseconds on each even
    when it finds nothing, and indexing was the largest part of a create.
    tests/test_search_params.py checks both give the same values.
    """
    if expression == _DECEASED:
        return _deceased
    walks = [_simple(part) for part in split_union(expression)]
    if all(walk is not None for walk in walks):
        found = [walk for walk in walks if walk is not None]
        return lambda resource: [value for walk in found for value in walk(resource)]
    return _fhirpath(expression)


#: The one R4 search parameter of our types that is boolean logic, on every Patient write.
_DECEASED = "Patient.deceased.exists() and Patient.deceased != false"


def _deceased(resource: dict[str, Any]) -> list[Any]:
    """``_DECEASED``: false without deceased[x], else whether it is other than ``false`` (a date is true)."""
    if "deceasedBoolean" in resource:
        return [resource["deceasedBoolean"] is not False]
    return ["deceasedDateTime" in resource]


def _fhirpath(expression: str) -> Callable[[dict[str, Any]], list[Any]]:
    expression = _RESOLVE_IS.sub(r"reference.matches('(^|/)\1/[^/]+(/_history/[^/]+)?$')", expression)
    fn = fhirpath_compile(expression, models["r4"])
    return lambda resource: fn(resource, {})


@cache
def registry() -> dict[str, dict[str, SearchParam]]:
    """Search parameters by resource type, then by code."""
    params: dict[str, dict[str, SearchParam]] = {t: {} for t in SUPPORTED_TYPES}
    entries = [*conformance.load("search-parameters.json")["entry"], *conformance.load(OVERREAD_PARAMS)["entry"]]
    for entry in entries:
        sp = entry["resource"]
        if sp["type"] in ("composite", "special"):
            continue
        bases = SUPPORTED_TYPES if "Resource" in sp["base"] else [b for b in sp["base"] if b in params]
        for base in bases:
            if sp["code"] in COLUMN_PARAMS:
                params[base][sp["code"]] = SearchParam(sp["code"], sp["type"], sp["url"])
                continue
            expression = _for_type(sp.get("expression", ""), base)
            if not expression:
                continue
            params[base][sp["code"]] = SearchParam(
                code=sp["code"],
                type=sp["type"],
                url=sp["url"],
                expression=expression,
                targets=tuple(sp.get("target", ())),
                roots=_roots(expression, base),
                evaluate=_compile(expression),
            )
    return params
