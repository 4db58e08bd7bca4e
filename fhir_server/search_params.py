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


def _plain_steps(part: str) -> tuple[str, ...] | None:
    """The element names of a plain path such as ``Patient.name.family``, else None.

    Plain means: only element names, each an element of the R4 model under that very JSON
    name (a choice element such as ``Observation.effective`` is not: its JSON names are
    effectiveDateTime, effectivePeriod ...).
    """
    if not _PLAIN.match(part):
        return None
    resource_type, *steps = part.split(".")
    kind: Any = model(resource_type)
    for step in steps:
        element = elements(kind).get(step) if isinstance(kind, type) and issubclass(kind, BaseModel) else None
        if element is None:
            return None
        kind = element.kind
    return tuple(steps)


def _walk(resource: dict[str, Any], paths: list[tuple[str, ...]]) -> list[Any]:
    """What FHIRPath gives for plain paths: every value along them, lists flattened."""
    out: list[Any] = []
    for steps in paths:
        values: list[Any] = [resource]
        for step in steps:
            found: list[Any] = []
            for value in values:
                child = value.get(step) if isinstance(value, dict) else None
                if isinstance(child, list):
                    found.extend(child)
                elif child is not None:
                    found.append(child)
            values = found
        out.extend(values)
    return out


def _compile(expression: str) -> Callable[[dict[str, Any]], list[Any]]:
    """Compile an expression with fhirpathpy, or to a dictionary walk when all of it is plain paths.

    Most search parameters are plain paths (``Patient.identifier``, ``Patient.name.family``);
    fhirpathpy spends some 10 µs on each even when it finds nothing, and indexing was the
    largest part of a create. tests/test_search_params.py checks both give the same values.
    """
    plain = [_plain_steps(part) for part in split_union(expression)]
    if all(steps is not None for steps in plain):
        paths = [steps for steps in plain if steps is not None]
        return lambda resource: _walk(resource, paths)
    return _fhirpath(expression)


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
