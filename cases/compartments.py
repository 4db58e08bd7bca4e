"""Which second-opinion cases a client with a role sees, and what it may write (docs/security.md, "Roles").

``compartment`` is the rule ``overread.app`` registers with ``fhir_server.compartment.use``. A
client's *own parties* are the resources its ``organization`` identifier (``system|value``) names:
the Organization, Practitioner or PractitionerRole with that identifier, and the
PractitionerRoles of such an Organization. Then, by role:

- **ordering**: the orders (ServiceRequest) whose requester or performer is one of its parties,
  and those it wrote (tagged ``WRITTEN_BY`` its client id when it writes them);
- **reader**: the orders of the cases (``cases.second_opinion.is_case``) whose Task.owner is one;
- **insurer**: the orders whose insurance is a Coverage whose payor is one of its Organizations,
  and their case Tasks; and of those two types only ``STATUS``, read-only;
- **operator**: no compartment (its scopes alone: the HL7 store).

Ordering and reader see each of their orders with what surrounds it: what the order refers to
(patient, coverage, requester, encounter...), the resources based on it or focused on it (the
case Task, reports, images, observations), and the results of those reports. Every set is built
of ``fhir_server.compartment``'s indexed lookups, evaluated by the database inside each statement.
"""

from collections.abc import Callable, Iterator
from typing import Any

from fhir_server.access import Access
from fhir_server.compartment import (
    Compartment,
    Contains,
    Fixed,
    Resource,
    Set,
    matching,
    referenced,
    referring,
    union_of,
)

#: The insurer's view of Task and ServiceRequest: where the case stands, nothing clinical.
STATUS = frozenset(
    {"identifier", "status", "businessStatus", "intent", "priority", "authoredOn", "lastModified",
     "restriction.period", "code", "owner"}
)  # fmt: skip
#: What a reader may write, for its own cases only.
READER_WRITES = frozenset({"DiagnosticReport", "Observation", "Task"})
#: The resources around an order: (type, reference parameter to the order).
BASED_ON = (
    ("Task", "focus"), ("Task", "based-on"), ("DiagnosticReport", "based-on"),
    ("ImagingStudy", "basedon"), ("Observation", "based-on"),
)  # fmt: skip
#: What no client with a compartment writes: a Subscription's notifications are not held to it.
UNCONFINED = frozenset({"Subscription"})
#: The tag an ordering system's orders carry: the client that wrote them (``meta.tag``, searchable as ``_tag``).
WRITTEN_BY = "https://overread.org/fhir/CodeSystem/written-by"
#: The types a client's organization identifier may name.
PARTY_TYPES = ("Organization", "Practitioner", "PractitionerRole")


def compartment(access: Access) -> Compartment | None:
    """The compartment of a client with a role; a role without an organization sees nothing."""
    identifier = [("identifier", access.organization or "|")]
    organizations = matching("Organization", identifier)
    parties = union_of(
        *(matching(t, identifier) for t in PARTY_TYPES), referring("PractitionerRole", "organization", organizations)
    )
    match access.role:
        case "ordering":
            named = [referring("ServiceRequest", p, parties) for p in ("requester", "performer")]
            written = matching("ServiceRequest", [("_tag", f"{WRITTEN_BY}|{access.client_id}")])
            visible = _around(Fixed(union_of(*named, written)))
            return Compartment(visible, _writes(parties, visible, ordering=True), stamp=_stamp(access.client_id))
        case "reader":
            orders = Fixed(referenced(_cases(referring("Task", "owner", parties)), "focus", "ServiceRequest"))
            visible = _around(orders)
            return Compartment(visible, _writes(parties, visible, ordering=False))
        case "insurer":
            paid = Fixed(referring("ServiceRequest", "insurance", referring("Coverage", "payor", organizations)))
            visible = union_of(paid, _cases(referring("Task", "focus", paid)))
            return Compartment(visible, lambda *_: False, {"Task": STATUS, "ServiceRequest": STATUS})
    return None


def _cases(tasks: Set) -> Set:
    """The Tasks of intent order among ``tasks``: the cases (``cases.second_opinion.is_case``), as the
    callers follow, or found them by, their focus on an order."""
    return matching("Task", [("intent", "order")], within=tasks)


def _around(orders: Set) -> Set:
    """The orders, what they refer to, the resources based on them, and the results of those reports."""
    based = union_of(*(referring(rtype, param, orders) for rtype, param in BASED_ON))
    return union_of(orders, referenced(orders), based, referenced(based, "result"))


def _writes(parties: Set, visible: Set, ordering: bool) -> Callable[[str, Resource | None, Contains], bool]:
    """What an ordering system or a reader may write (``Compartment.may_write``).

    Every reference of the body to a resource here names a resource it sees or one of its own
    parties, so no write reaches into another's compartment. A reader writes reports, observations and Tasks,
    each about one of its orders at least."""

    def may_write(rtype: str, resource: Resource | None, contains: Contains) -> bool:
        if rtype in UNCONFINED:
            return False
        if resource is None:
            return ordering or rtype in READER_WRITES
        references = list(_references(resource))
        if not all(contains(visible, ref) or contains(parties, ref) for ref in references):
            return False
        if ordering:
            return True
        return rtype in READER_WRITES and any(ref.startswith("ServiceRequest/") for ref in references)

    return may_write


def _stamp(client_id: str) -> Callable[[str, Resource], None]:
    """Tag the orders an ordering system writes with its client id (``WRITTEN_BY``): they stay its
    own whatever parties they name."""

    def stamp(rtype: str, resource: Resource) -> None:
        if rtype != "ServiceRequest":
            return
        meta = resource.setdefault("meta", {})
        tags = [t for t in meta.get("tag", []) if t.get("system") != WRITTEN_BY]
        meta["tag"] = [*tags, {"system": WRITTEN_BY, "code": client_id}]

    return stamp


def _references(value: Any) -> Iterator[str]:
    """The literal references (``Type/id``) of a resource or element, at any depth."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and ref.count("/") == 1 and ref[:1].isupper():
            yield ref
        for item in value.values():
            yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)
