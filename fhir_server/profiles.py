"""Profile validation driven by the StructureDefinitions of ``conformance/`` (their differentials).

Nothing here knows a profile by name: every rule comes from an ElementDefinition of a
differential —

- ``min``/``max``: cardinality, counted per parent element (``DiagnosticReport.basedOn.reference``
  is counted in each ``basedOn``); a slice counts only its members;
- slices (``sliceName``): an extension slice holds the extensions of its profile's url, any
  other slice the values that match its ``pattern[x]``/``fixed[x]``;
- ``fixed[x]`` (equal) and ``pattern[x]`` (contains);
- ``type``: on a choice element (``value[x]``) the types allowed, on a Reference the
  ``targetProfile`` resource types a literal reference may point to;
- ``binding`` of strength required to a ValueSet of ``conformance/`` (expanded from the
  CodeSystems its compose includes): a CodeableConcept needs one coding in it;
- ``constraint``: FHIRPath invariants (fhirpathpy, R4 model), evaluated on each element.

Extensions whose url is one of our extension StructureDefinitions (``compared-report``) are
checked against it wherever they appear.

Which writes are checked (``required``): a resource that claims one of our profiles in
``meta.profile``, and one that a rule the application registered (``require``) holds to one of
ours whether it claims it or not (Overread: every second-opinion report, ``cases.second_opinion``).
A profile may ask more than its differential says: the application registers those checks too
(``add_check``; Overread: the RADPEER score and the discrepancy level agree, ``cases.discrepancy``).
Both registries are process-wide and empty here: this module knows no domain.
"""

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from fhirpathpy import compile as fhirpath
from fhirpathpy.models import models

import conformance
from fhir_server.errors import Issue
from fhir_server.lookup import Lookup

BASE = "https://overread.org/fhir/"
CORE_SD = "http://hl7.org/fhir/StructureDefinition/"
#: A literal reference's type, read as ``indexing.split_reference`` reads it (importing it would be a cycle).
_REFERENCE = re.compile(r"(?:^|/)([A-Z][A-Za-z]+)/[A-Za-z0-9\-.]{1,64}(?:/_history/[^/]+)?$")

Json = dict[str, Any]
#: The profiles of ours a resource must conform to whether it claims them or not (``require``).
Requirement = Callable[[Json, Lookup | None], list[str]]
#: What a profile asks beyond its differential: the issues of a resource checked against ``urls`` (``add_check``).
Check = Callable[[Json, list[str], Lookup | None], list[Issue]]
_requirements: list[Requirement] = []
_checks: list[Check] = []


def require(requirement: Requirement) -> None:
    """Hold resources to the profiles ``requirement`` names, in this process (the application does, at start-up)."""
    if requirement not in _requirements:
        _requirements.append(requirement)


def add_check(check: Check) -> None:
    """Run ``check`` with the profiles of every resource checked, in this process (at start-up)."""
    if check not in _checks:
        _checks.append(check)


# -- the artifacts ------------------------------------------------------------------


@cache
def artifacts() -> tuple[Json, ...]:
    """Every conformance resource of ``conformance/`` that the server publishes (our canonical base)."""
    found = (conformance.load(p.name) for p in sorted(conformance.HERE.glob("*.json")))
    return tuple(r for r in found if str(r.get("url", "")).startswith(BASE))


@cache
def by_url() -> dict[str, Json]:
    return {r["url"]: r for r in artifacts()}


@cache
def expand(valueset_url: str) -> frozenset[tuple[str, str]] | None:
    """The (system, code) pairs of one of our ValueSets; None for a ValueSet we do not hold."""
    valueset = by_url().get(valueset_url.split("|")[0])
    if valueset is None or valueset.get("resourceType") != "ValueSet":
        return None
    codes: set[tuple[str, str]] = set()
    for include in valueset.get("compose", {}).get("include", []):
        system = include.get("system", "")
        listed = include.get("concept")
        if listed is not None:
            codes |= {(system, c["code"]) for c in listed}
            continue
        code_system = by_url().get(system)
        if code_system is None:
            return None  # a system we cannot expand: the binding is not checked
        codes |= {(system, c["code"]) for c in _concepts(code_system.get("concept", []))}
    return frozenset(codes)


def _concepts(concepts: list[Json]) -> Iterator[Json]:
    for concept in concepts:
        yield concept
        yield from _concepts(concept.get("concept", []))


# -- a profile compiled from its differential ------------------------------------------


@dataclass(frozen=True)
class Constraint:
    key: str
    human: str
    expression: str
    check: Callable[..., list[Any]]


@dataclass(frozen=True)
class Rule:
    """What one ElementDefinition of a differential asks."""

    path: tuple[str, ...]  # below the root: ("basedOn",), ("value[x]",), () for the root
    slice: str | None
    member: Callable[[Any], bool] | None  # for a slice: is a value one of its members
    min: int
    max: int | None  # None: unbounded
    fixed: tuple[str, Any] | None
    pattern: tuple[str, Any] | None
    types: tuple[str, ...]
    targets: frozenset[str]
    valueset: str | None
    constraints: tuple[Constraint, ...]


@dataclass(frozen=True)
class Profile:
    url: str
    type: str
    rules: tuple[Rule, ...] = field(default=())


@cache
def profiles() -> dict[str, Profile]:
    """Our StructureDefinitions (profiles and extensions) by url."""
    return {
        r["url"]: _compile(r)
        for r in artifacts()
        if r["resourceType"] == "StructureDefinition" and r.get("derivation") == "constraint"
    }


def _compile(sd: Json) -> Profile:
    rules = []
    for element in sd.get("differential", {}).get("element", []):
        path = element["path"].split(".")[1:]
        if ":" in element.get("id", "").rsplit(".", 1)[0]:
            continue  # the inside of a slice: not checked here
        fixed = _choice(element, "fixed")
        pattern = _choice(element, "pattern")
        types = element.get("type", [])
        binding = element.get("binding", {})
        maximum = element.get("max", "*")
        rules.append(
            Rule(
                path=tuple(path),
                slice=element.get("sliceName"),
                member=_membership(element, fixed, pattern) if element.get("sliceName") else None,
                min=int(element.get("min", 0)),
                max=None if maximum == "*" else int(maximum),
                fixed=fixed,
                pattern=pattern,
                types=tuple(t["code"] for t in types) if element["path"].endswith("[x]") else (),
                targets=frozenset(
                    p.removeprefix(CORE_SD) for t in types for p in t.get("targetProfile", []) if p.startswith(CORE_SD)
                ),
                valueset=binding.get("valueSet") if binding.get("strength") == "required" else None,
                constraints=tuple(
                    Constraint(c["key"], c["human"], c["expression"], fhirpath(c["expression"], models["r4"]))
                    for c in element.get("constraint", [])
                    if c.get("severity") == "error" and c.get("expression")
                ),
            )
        )
    return Profile(sd["url"], sd["type"], tuple(rules))


def _choice(element: Json, prefix: str) -> tuple[str, Any] | None:
    for key, value in element.items():
        if key.startswith(prefix) and key[len(prefix) : len(prefix) + 1].isupper():
            return key, value
    return None


def _membership(element: Json, fixed: tuple[str, Any] | None, pattern: tuple[str, Any] | None) -> Callable[[Any], bool]:
    extension = [p for t in element.get("type", []) if t.get("code") == "Extension" for p in t.get("profile", [])]
    if extension:
        return lambda value: isinstance(value, dict) and value.get("url") == extension[0]
    if fixed is not None:
        return lambda value: value == fixed[1]
    if pattern is not None:
        return lambda value: _matches(value, pattern[1])
    return lambda value: True


def _matches(value: Any, pattern: Any) -> bool:
    """Whether ``value`` holds ``pattern`` (R4 ElementDefinition.pattern[x]): a list item matches some item."""
    if isinstance(pattern, dict):
        return isinstance(value, dict) and all(k in value and _matches(value[k], v) for k, v in pattern.items())
    if isinstance(pattern, list):
        items = value if isinstance(value, list) else []
        return all(any(_matches(item, p) for item in items) for p in pattern)
    return bool(value == pattern)


def items(node: Any, key: str) -> list[Json]:
    """The objects of the list ``node[key]``: this runs on any JSON, never raising on a malformed one."""
    value = node.get(key) if isinstance(node, dict) else None
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def supported(rtype: str) -> list[str]:
    """The canonical urls of our profiles of ``rtype`` (CapabilityStatement ``supportedProfile``)."""
    return sorted(url for url, p in profiles().items() if p.type == rtype)


# -- checking ------------------------------------------------------------------------


def required(resource: Json, store: Lookup | None = None) -> list[str]:
    """The profiles a resource must conform to: those of ours it claims, and those the rules of
    ``require`` name. ``store`` lets a rule read the store; without it only the resource counts."""
    meta = resource.get("meta")
    claimed = meta.get("profile") if isinstance(meta, dict) else None
    urls = [p.split("|")[0] for p in claimed or () if isinstance(p, str) and p.startswith(BASE)]
    urls += [url for requirement in _requirements for url in requirement(resource, store)]
    return list(dict.fromkeys(urls))


def check(resource: Json, extra: list[str] | tuple[str, ...] = (), store: Lookup | None = None) -> list[Issue]:
    """Every issue of ``resource`` against the profiles it must conform to (and ``extra`` ones),
    with what the checks of ``add_check`` find."""
    issues: list[Issue] = []
    rtype = resource.get("resourceType", "")
    urls = applicable(resource, extra, store)
    for url in urls:
        profile = profiles().get(url)
        if profile is None or profile.type == "Extension":
            issues.append(Issue("not-supported", f"{url} is not a profile this server knows", expression=(rtype,)))
        elif profile.type != rtype:
            issues.append(Issue("structure", f"{url} is a profile of {profile.type}, not {rtype}", expression=(rtype,)))
        else:
            issues += _check(profile, resource, rtype, resource)
    issues += _extensions(resource, rtype, resource)
    return [*issues, *(issue for check in _checks for issue in check(resource, urls, store))]


def applicable(resource: Json, extra: list[str] | tuple[str, ...] = (), store: Lookup | None = None) -> list[str]:
    """The profiles ``resource`` is checked against: those it must conform to, then ``extra`` ones."""
    return list(dict.fromkeys([*required(resource, store), *(str(u).split("|")[0] for u in extra)]))


def _extensions(node: Any, at: str, root: Json) -> Iterator[Issue]:
    """Extensions of ours found anywhere in the resource, checked against their definitions.

    It runs on every write: only objects and lists are walked into, and no path is built for
    a primitive.
    """
    if isinstance(node, list):
        for i, item in enumerate(node):
            if isinstance(item, (dict, list)):
                yield from _extensions(item, f"{at}[{i}]", root)
    elif isinstance(node, dict):
        for key, value in node.items():
            if not isinstance(value, (dict, list)):
                continue
            if key in ("extension", "modifierExtension") and isinstance(value, list):
                for i, ext in enumerate(value):
                    url = ext.get("url") if isinstance(ext, dict) else None
                    definition = profiles().get(url) if isinstance(url, str) else None
                    if definition is not None and definition.type == "Extension":
                        yield from _check(definition, ext, f"{at}.{key}[{i}]", root)
            yield from _extensions(value, f"{at}.{key}", root)


def _check(profile: Profile, node: Json, at: str, root: Json) -> Iterator[Issue]:
    for rule in profile.rules:
        if not rule.path:
            yield from _constraints(rule, [(at, node)], root)
            continue
        for parent_at, parent in _walk([(at, node)], rule.path[:-1]):
            values = _children(parent_at, parent, rule.path[-1])
            if rule.member is not None:
                values = [(p, v) for p, v in values if rule.member(v)]
            yield from _cardinality(rule, parent_at, values)
            yield from _values(rule, values)
            yield from _constraints(rule, values, root)


def _walk(nodes: list[tuple[str, Any]], path: tuple[str, ...]) -> list[tuple[str, Any]]:
    for name in path:
        nodes = [child for at, node in nodes for child in _children(at, node, name)]
    return nodes


def _children(at: str, node: Any, name: str) -> list[tuple[str, Any]]:
    """The values of element ``name`` of ``node``, with their paths (``name[x]``: any of its types)."""
    if not isinstance(node, dict):
        return []
    if name.endswith("[x]"):
        prefix = name[:-3]
        keys = [k for k in node if k.startswith(prefix) and k[len(prefix) : len(prefix) + 1].isupper()]
    else:
        keys = [name] if name in node else []
    out: list[tuple[str, Any]] = []
    for key in keys:
        value = node[key]
        if isinstance(value, list):
            out += [(f"{at}.{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            out.append((f"{at}.{key}", value))
    return out


def _name(rule: Rule) -> str:
    return ".".join(rule.path) + (f":{rule.slice}" if rule.slice else "")


def _cardinality(rule: Rule, parent_at: str, values: list[tuple[str, Any]]) -> Iterator[Issue]:
    where = f"{parent_at}.{rule.path[-1]}"
    if len(values) < rule.min:
        yield Issue(
            "required",
            f"{_name(rule)}: minimum required = {rule.min}, but only found {len(values)}",
            expression=(where,),
        )
    if rule.max is not None and len(values) > rule.max:
        yield Issue(
            "structure",
            f"{_name(rule)}: maximum allowed = {rule.max}, but found {len(values)}",
            expression=(values[rule.max][0],),
        )


def _values(rule: Rule, values: list[tuple[str, Any]]) -> Iterator[Issue]:
    for at, value in values:
        if rule.types:
            key = at.rsplit(".", 1)[-1].split("[")[0]
            type_name = key[len(rule.path[-1]) - 3 :]
            if type_name[:1].lower() + type_name[1:] not in rule.types and type_name not in rule.types:
                yield Issue(
                    "structure", f"{_name(rule)}: {key} is not allowed here ({', '.join(rule.types)})", expression=(at,)
                )
                continue
        if rule.fixed is not None and value != rule.fixed[1]:
            yield Issue(
                "invalid", f"{_name(rule)}: must be exactly {rule.fixed[1]!r} ({rule.fixed[0]})", expression=(at,)
            )
        if rule.pattern is not None and not _matches(value, rule.pattern[1]):
            yield Issue(
                "invalid", f"{_name(rule)}: must match {rule.pattern[1]!r} ({rule.pattern[0]})", expression=(at,)
            )
        if rule.targets and isinstance(value, dict):
            target = _reference_type(value)
            if target is not None and target not in rule.targets:
                allowed = " | ".join(sorted(rule.targets))
                yield Issue(
                    "structure",
                    f"{_name(rule)}: a reference to a {target}, where only {allowed} is allowed",
                    expression=(f"{at}.reference" if "reference" in value else at,),
                )
        if rule.valueset is not None:
            yield from _binding(rule, at, value)


def _binding(rule: Rule, at: str, value: Any) -> Iterator[Issue]:
    assert rule.valueset is not None
    codes = expand(rule.valueset)
    if codes is None:
        return
    if isinstance(value, str):
        ok = any(code == value for _, code in codes)
    elif isinstance(value, dict) and "coding" in value:
        ok = any((c.get("system"), c.get("code")) in codes for c in items(value, "coding"))
    elif isinstance(value, dict):
        ok = (value.get("system"), value.get("code")) in codes
    else:
        ok = False
    if not ok:
        allowed = "; ".join(
            f"{system}: {', '.join(code for s, code in sorted(codes) if s == system)}"
            for system in sorted({s for s, _ in codes})
        )
        yield Issue(
            "code-invalid",
            f"{_name(rule)}: the code is not in the value set {rule.valueset} (required binding): one of {allowed}",
            expression=(at,),
        )


def _constraints(rule: Rule, values: list[tuple[str, Any]], root: Json) -> Iterator[Issue]:
    for constraint in rule.constraints:
        for at, value in values:
            try:
                result = constraint.check(value, {"resource": root})
            except Exception as exc:  # an expression fhirpathpy cannot run is a failed invariant, not a 500
                result = [False]
                detail = f" (not evaluated: {exc})"
            else:
                detail = ""
            if result not in ([True], []):
                yield Issue(
                    "invariant",
                    f"{constraint.key}: {constraint.human} [{constraint.expression}]{detail}",
                    expression=(at,),
                )


def _reference_type(reference: Any) -> str | None:
    if not isinstance(reference, dict):
        return None
    literal = reference.get("reference")
    if isinstance(literal, str) and (found := _REFERENCE.search(literal)):
        return found.group(1)
    kind = reference.get("type")
    return kind if isinstance(kind, str) else None
