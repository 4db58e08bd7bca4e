"""Coding consistency of second-opinion reports and findings: the RADPEER score and the level agree.

A second-opinion report may carry an ACR RADPEER 2016 score beside its level on the discrepancy
scale (``conclusionCode``); a discrepancy finding (an Observation of ``DiagnosticReport.result``,
contained or stored, or one written under the ``discrepancy-finding`` profile) may carry both in
its ``valueCodeableConcept`` or ``interpretation``. The ConceptMap ``radpeer-to-discrepancy`` of
``conformance/`` says which level each score means (R4 conceptmap.html, translated with
``mappings.concept_map``); a level that is not the one mapped contradicts the score, and the
referrer would get both. Each contradiction is an issue ``business-rule`` naming the two codes,
the expected level and the ConceptMap, with expressions pointing at both codes (422 on a write,
the same issues from ``$validate``: ``overread.app`` adds ``check`` to ``fhir_server.profiles``).

A code outside its ValueSet is the required binding's issue (``fhir_server.profiles``, which
lists the allowed codes); a finding's RADPEER code, which no profile binds, is checked here.
"""

from collections.abc import Iterator
from dataclasses import replace
from functools import cache
from typing import Any

from cases.second_opinion import BASE, DISCREPANCY, RADPEER, SECOND_OPINION_REPORT
from fhir_server import profiles
from fhir_server.errors import Issue
from fhir_server.lookup import Lookup
from fhir_server.profiles import items
from mappings.concept_map import ConceptMap, parse_concept_map, translate

CONCEPT_MAP = f"{BASE}ConceptMap/radpeer-to-discrepancy"
FINDING = f"{BASE}StructureDefinition/discrepancy-finding"
RADPEER_VALUESET = f"{BASE}ValueSet/radpeer"

Json = dict[str, Any]
#: A CodeableConcept and where it is (its FHIRPath expression).
Coded = tuple[str, Json]


@cache
def concept_map() -> ConceptMap:
    return parse_concept_map(profiles.by_url()[CONCEPT_MAP])


def check(resource: Json, urls: list[str], store: Lookup | None) -> list[Issue]:
    """The contradictions of ``resource`` checked against the profiles ``urls`` (``profiles.applicable``)."""
    rtype = resource.get("resourceType")
    if rtype == "DiagnosticReport" and SECOND_OPINION_REPORT in urls:
        coded = [(f"{rtype}.conclusionCode[{i}]", cc) for i, cc in enumerate(items(resource, "conclusionCode"))]
        return [*_contradictions(coded, ""), *_findings(resource, store)]
    if rtype == "Observation" and FINDING in urls:
        return list(_finding(resource, "Observation", ""))
    return []


def _findings(report: Json, store: Lookup | None) -> Iterator[Issue]:
    """The report's findings (``result``): contained ones (``#id``) and, with a store, stored ones."""
    contained = {c.get("id"): (k, c) for k, c in enumerate(items(report, "contained"))}
    for i, ref in enumerate(items(report, "result")):
        reference = str(ref.get("reference", ""))
        if reference.startswith("#") and reference[1:] in contained:
            k, observation = contained[reference[1:]]
            yield from _finding(observation, f"DiagnosticReport.contained[{k}]", "")
        elif reference.startswith("Observation/") and store is not None:
            stored = store.current("Observation", reference.removeprefix("Observation/"))
            if stored is not None and stored.content is not None:
                # Pointed at by its reference: the Observation's own paths are not the report's.
                for issue in _finding(stored.resource, "Observation", f"{reference}: "):
                    yield replace(issue, expression=(f"DiagnosticReport.result[{i}]",))
        # A finding elsewhere (another server) is not ours to read.


def _finding(observation: Json, at: str, named: str) -> Iterator[Issue]:
    if observation.get("resourceType") != "Observation":
        return
    coded: list[Coded] = []
    if isinstance(observation.get("valueCodeableConcept"), dict):
        coded.append((f"{at}.valueCodeableConcept", observation["valueCodeableConcept"]))
    coded += [(f"{at}.interpretation[{j}]", cc) for j, cc in enumerate(items(observation, "interpretation"))]
    yield from _unknown_scores(coded, named)
    yield from _contradictions(coded, named)


def _contradictions(coded: list[Coded], named: str) -> Iterator[Issue]:
    """Each RADPEER score beside a level of the scale that the ConceptMap does not map it to."""
    scores = [(at, c["code"]) for at, c in _codings(coded, RADPEER)]
    levels = [(at, c["code"]) for at, c in _codings(coded, DISCREPANCY) if (DISCREPANCY, c["code"]) in _scale()]
    for score_at, score in scores:
        expected = sorted(t["code"] for t in translate(concept_map(), RADPEER, score) if t["system"] == DISCREPANCY)
        if not expected:
            continue  # not a RADPEER score: the binding's issue
        for level_at, level in levels:
            if level not in expected:
                yield Issue(
                    "business-rule",
                    f"{named}RADPEER {score!r} ({RADPEER}) contradicts the discrepancy level {level!r}: RADPEER"
                    f" {score!r} means {' or '.join(repr(e) for e in expected)} (ConceptMap {CONCEPT_MAP})",
                    expression=tuple(dict.fromkeys((level_at, score_at))),
                )


def _unknown_scores(coded: list[Coded], named: str) -> Iterator[Issue]:
    allowed = profiles.expand(RADPEER_VALUESET) or frozenset()
    for at, coding in _codings(coded, RADPEER):
        if (RADPEER, coding["code"]) not in allowed:
            codes = ", ".join(sorted(code for _, code in allowed))
            yield Issue(
                "code-invalid",
                f"{named}{coding['code']!r} is not a code of the value set {RADPEER_VALUESET}: one of {codes}",
                expression=(at,),
            )


@cache
def _scale() -> frozenset[tuple[str, str]]:
    return profiles.expand(f"{BASE}ValueSet/second-opinion-discrepancy") or frozenset()


def _codings(coded: list[Coded], system: str) -> Iterator[tuple[str, Json]]:
    for at, concept in coded:
        for coding in items(concept, "coding"):
            if coding.get("system") == system and isinstance(coding.get("code"), str):
                yield at, coding
