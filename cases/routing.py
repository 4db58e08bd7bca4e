"""Routing a new case: who reads it (Task.owner) and by when (Task.restriction.period.end).

Pure rules over plain data: the app package builds ``Routing`` from ``OVERREAD_CONFIG``
(``routing:`` and ``due:``) and hands it to the case hook (``cases.task.case_opener``).

A rule matches an order when every criterion it names matches (case-insensitively):

- ``performer_type``: a coding code or display, or the text, of ServiceRequest.performerType;
- ``modality``: a DICOM modality code (system DCM) among the codings of ServiceRequest.code,
  .category or .orderDetail (a sender's ConceptMap can add it as a translation of a local code);
- ``body_site``: a coding code or display, or the text, of ServiceRequest.bodySite.

The first rule that matches gives the owner. The due date is the order's authoredOn (else now)
plus the time configured for its priority (routine when it has none).
"""

from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from fhir_server import dates

DCM = "http://dicom.nema.org/resources/ontology/DCM"


@dataclass(frozen=True)
class Rule:
    owner: dict[str, str]  # a Reference: Organization (a reading group) or Practitioner (a radiologist)
    performer_type: str | None = None
    modality: tuple[str, ...] = ()
    body_site: tuple[str, ...] = ()

    def matches(self, order: dict[str, Any]) -> bool:
        if self.performer_type is not None and self.performer_type.casefold() not in _words(
            [order.get("performerType")]
        ):
            return False
        if self.modality and not _folded(self.modality) & _modalities(order):
            return False
        return not self.body_site or bool(_folded(self.body_site) & _words(order.get("bodySite", [])))


@dataclass(frozen=True)
class Routing:
    rules: tuple[Rule, ...] = ()
    #: Time from authoredOn to the due date, by request priority; a priority not here gets no due date.
    due: Mapping[str, timedelta] = field(default_factory=dict)


NO_ROUTING = Routing()


def owner(routing: Routing, order: dict[str, Any]) -> dict[str, str] | None:
    """The owner of the first rule matching the order, if any."""
    return next((dict(rule.owner) for rule in routing.rules if rule.matches(order)), None)


def due(routing: Routing, order: dict[str, Any], now: datetime | None = None) -> datetime | None:
    """Naive UTC due date of the order's case, or None when its priority has no time configured."""
    time = routing.due.get(order.get("priority") or "routine")
    if time is None:
        return None
    start = now or dates.now()
    if authored := order.get("authoredOn"):
        with suppress(ValueError):  # not a FHIR dateTime: from now
            start = dates.parse_range(authored)[0]
    return start + time


def route(routing: Routing, task: dict[str, Any], order: dict[str, Any]) -> dict[str, Any]:
    """The Task with the owner and due date routing gives, where it has none yet."""
    routed = dict(task)
    if "owner" not in routed and (found := owner(routing, order)) is not None:
        routed["owner"] = found
    end = due(routing, order)
    period = routed.get("restriction", {}).get("period", {})
    if end is not None and "end" not in period:
        restriction = routed.get("restriction", {})
        routed["restriction"] = {**restriction, "period": {**period, "end": end.strftime("%Y-%m-%dT%H:%M:%SZ")}}
    return routed


def _folded(values: Iterable[str]) -> set[str]:
    return {v.casefold() for v in values}


def _words(concepts: Iterable[Any]) -> set[str]:
    """Codes, displays and texts of CodeableConcepts, case-folded."""
    out: set[str] = set()
    for concept in concepts:
        if not isinstance(concept, dict):
            continue
        out |= {c[k].casefold() for c in concept.get("coding", []) for k in ("code", "display") if c.get(k)}
        if concept.get("text"):
            out.add(concept["text"].casefold())
    return out


def _modalities(order: dict[str, Any]) -> set[str]:
    concepts = [order.get("code"), *order.get("category", []), *order.get("orderDetail", [])]
    return {
        c["code"].casefold()
        for concept in concepts
        if isinstance(concept, dict)
        for c in concept.get("coding", [])
        if c.get("system") == DCM and c.get("code")
    }
