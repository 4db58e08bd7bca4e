"""Code translation with a FHIR R4 ConceptMap, after the semantics of ``$translate``.

Pure: a ConceptMap arrives as its JSON (a dict already read by the caller) and is checked once by
``parse_concept_map``; ``translate`` then answers what one ``(system, code)`` becomes
(https://hl7.org/fhir/R4/conceptmap.html, https://hl7.org/fhir/R4/conceptmap-operation-translate.html).

The rules, in R4 terms:

- Every ``group`` whose ``source`` is the code's system applies, in the order of the file; a group
  without ``source`` applies to codes of any system (and to codes sent without one). A group's
  ``target`` is the system of the codings it yields, so it is required here.
- ``element.code`` equal to the code (case-sensitive, as FHIR codes are) yields each of its
  ``target``s with a ``code`` (``display`` kept when given), except those whose ``equivalence`` is
  ``unmatched`` or ``disjoint``: those say there is no translation. Every other equivalence
  (``relatedto``, ``equivalent``, ``equal``, ``wider``, ``subsumes``, ``narrower``, ``specializes``,
  ``inexact``) is a translation, as ``$translate`` reports it.
- ``group.unmapped`` applies only to codes the group has no ``element`` for (an element whose
  targets are all unmatched/disjoint is an explicit "no translation"): mode ``provided`` yields the
  same code in the target system, ``fixed`` yields ``unmapped.code`` (and its display),
  ``other-map`` is ignored (Overread does not chase other ConceptMaps).
- The same ``(system, code)`` is yielded once, first occurrence kept.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

Json = dict[str, Any]

#: R4 ConceptMapEquivalence (http://hl7.org/fhir/R4/valueset-concept-map-equivalence.html).
EQUIVALENCES = frozenset(
    {"relatedto", "equivalent", "equal", "wider", "subsumes", "narrower", "specializes", "inexact", "unmatched",
     "disjoint"}
)  # fmt: skip
#: The equivalences that assert there is no translation.
NO_TRANSLATION = frozenset({"unmatched", "disjoint"})
UNMAPPED_MODES = frozenset({"provided", "fixed", "other-map"})


class ConceptMapError(ValueError):
    """The JSON is not a ConceptMap Overread can use; the message says where."""


@dataclass(frozen=True)
class Target:
    code: str
    display: str
    equivalence: str


@dataclass(frozen=True)
class Unmapped:
    mode: str
    code: str = ""
    display: str = ""


@dataclass(frozen=True)
class Group:
    source: str | None
    target: str
    elements: Mapping[str, tuple[Target, ...]]
    unmapped: Unmapped | None = None


@dataclass(frozen=True)
class ConceptMap:
    """A checked ConceptMap: what ``translate`` needs of it, immutable."""

    url: str
    groups: tuple[Group, ...]


def parse_concept_map(data: object) -> ConceptMap:
    """Check the JSON of an R4 ConceptMap and keep what translation needs; ``ConceptMapError`` if broken."""
    if not isinstance(data, dict) or data.get("resourceType") != "ConceptMap":
        raise ConceptMapError("not a ConceptMap (resourceType must be 'ConceptMap')")
    groups = _list(data, "group", "ConceptMap")
    if not groups:
        raise ConceptMapError("ConceptMap.group: a ConceptMap without groups translates nothing")
    return ConceptMap(_str(data, "url", "ConceptMap"), tuple(_group(g, f"group[{i}]") for i, g in enumerate(groups)))


def _group(data: object, at: str) -> Group:
    if not isinstance(data, dict):
        raise ConceptMapError(f"{at}: must be an object")
    target = _str(data, "target", at)
    if not target:
        raise ConceptMapError(f"{at}.target: the target system is required (the system of the codings it yields)")
    elements: dict[str, tuple[Target, ...]] = {}
    for i, element in enumerate(_list(data, "element", at)):
        where = f"{at}.element[{i}]"
        if not isinstance(element, dict):
            raise ConceptMapError(f"{where}: must be an object")
        code = _str(element, "code", where)
        if not code:
            raise ConceptMapError(f"{where}.code: is required")
        targets = tuple(_target(t, f"{where}.target[{j}]") for j, t in enumerate(_list(element, "target", where)))
        elements[code] = elements.get(code, ()) + targets  # the same code listed twice: both lists count
    unmapped = _unmapped(data["unmapped"], f"{at}.unmapped") if "unmapped" in data else None
    return Group(_str(data, "source", at) or None, target, MappingProxyType(elements), unmapped)


def _target(data: object, at: str) -> Target:
    if not isinstance(data, dict):
        raise ConceptMapError(f"{at}: must be an object")
    equivalence = _str(data, "equivalence", at)
    if equivalence not in EQUIVALENCES:
        raise ConceptMapError(
            f"{at}.equivalence: {equivalence!r} is not an R4 equivalence ({', '.join(sorted(EQUIVALENCES))})"
        )
    code = _str(data, "code", at)
    if not code and equivalence not in NO_TRANSLATION:
        raise ConceptMapError(f"{at}.code: is required unless the equivalence is unmatched or disjoint")
    return Target(code, _str(data, "display", at), equivalence)


def _unmapped(data: object, at: str) -> Unmapped:
    if not isinstance(data, dict):
        raise ConceptMapError(f"{at}: must be an object")
    mode = _str(data, "mode", at)
    if mode not in UNMAPPED_MODES:
        raise ConceptMapError(f"{at}.mode: {mode!r} is not one of provided, fixed, other-map")
    code = _str(data, "code", at)
    if mode == "fixed" and not code:
        raise ConceptMapError(f"{at}.code: mode 'fixed' needs the fixed code (R4 invariant cmd-2)")
    return Unmapped(mode, code, _str(data, "display", at))


def _str(data: Mapping[str, object], key: str, at: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ConceptMapError(f"{at}.{key}: must be a string")
    return value


def _list(data: Mapping[str, object], key: str, at: str) -> list[object]:
    value = data.get(key, [])
    if not isinstance(value, list):
        raise ConceptMapError(f"{at}.{key}: must be a list")
    return value


def translate(concept_map: ConceptMap, system: str | None, code: str) -> list[Json]:
    """The Codings ``(system, code)`` translates to in ``concept_map`` (empty: no translation)."""
    found: list[Json] = []
    if not code:
        return found  # a coding without a code (text only) has nothing to translate
    for group in concept_map.groups:
        if group.source is not None and group.source != system:
            continue
        if code in group.elements:
            found += [
                _coding(group.target, t.code, t.display)
                for t in group.elements[code]
                if t.code and t.equivalence not in NO_TRANSLATION
            ]
        elif group.unmapped is not None and group.unmapped.mode == "provided":
            found.append(_coding(group.target, code, ""))
        elif group.unmapped is not None and group.unmapped.mode == "fixed":
            found.append(_coding(group.target, group.unmapped.code, group.unmapped.display))
    return _unique(found, ())


def add_translations(concept: Json, concept_maps: Sequence[ConceptMap]) -> Json:
    """A CodeableConcept with the translations of its codings added after them (originals kept as they are).

    Each original coding is translated with every map in turn; a translation already among the
    codings (same system and code) is not repeated. ``text`` and ``userSelected`` are untouched.
    """
    originals: list[Json] = list(concept.get("coding", []))
    if not concept_maps or not originals:
        return concept
    found = [
        c
        for coding in originals
        for cm in concept_maps
        for c in translate(cm, coding.get("system"), coding.get("code", ""))
    ]
    added = _unique(found, originals)
    return {**concept, "coding": originals + added} if added else concept


def _coding(system: str, code: str, display: str) -> Json:
    return {"system": system, "code": code, "display": display} if display else {"system": system, "code": code}


def _unique(codings: Iterable[Json], seen_already: Iterable[Json]) -> list[Json]:
    seen = {(c.get("system"), c.get("code")) for c in seen_already}
    out: list[Json] = []
    for coding in codings:
        key = (coding.get("system"), coding.get("code"))
        if key not in seen:
            seen.add(key)
            out.append(coding)
    return out
