"""What a second-opinion case and a second-opinion report are: one definition for every rule.

The case is the Task of intent ``order`` whose focus is the ServiceRequest (``is_case``,
``case_of``): the case rules (``cases.task``), the workflow (``cases.workflow``) and the
placer's order control (``control_case``, from the HL7 intake) all find it this way.

The profile rule (``required_profiles``, which ``overread.app`` gives ``fhir_server.profiles``:
which reports must conform to ``second-opinion-report``), the report workflow and result delivery
(``cases.results``) all ask ``second_opinion_order``. A DiagnosticReport not tagged
``report-role|original`` is a second-opinion report when

- it is based on an order that is a case here: the ServiceRequest is stored and a Task of intent
  ``order`` has it as focus (docs/workflow.md); or
- it says it is one: it claims the ``second-opinion-report`` profile in ``meta.profile``, is
  tagged ``report-role|second-opinion``, or carries a code of the discrepancy scale.

Any other report (another service's report on another order, R4 ``DiagnosticReport-example-pgx``)
is an ordinary R4 DiagnosticReport. Original reports (HL7 ORU^R01, tagged ``original`` by the
mapping) never are.

It reads the store through ``fhir_server.lookup.Lookup`` (a ``Repository`` is one): the
profile rule runs inside validation, before the repository writes.
"""

import re
from typing import TYPE_CHECKING, Any

from fhir_server.lookup import Lookup
from fhir_server.profiles import items
from mappings.original_report import REPORT_ROLE

if TYPE_CHECKING:
    from fhir_server.repository import Stored

BASE = "https://overread.org/fhir/"
SECOND_OPINION_REPORT = f"{BASE}StructureDefinition/second-opinion-report"
DISCREPANCY = f"{BASE}CodeSystem/second-opinion-discrepancy"
RADPEER = f"{BASE}CodeSystem/radpeer"
#: A relative reference to a ServiceRequest here (an absolute one names another server's order).
_ORDER = re.compile(r"^ServiceRequest/([A-Za-z0-9\-.]{1,64})(?:/_history/[^/]+)?$")

Json = dict[str, Any]


def roles(resource: Json) -> set[str]:
    """The ``report-role`` tags of a resource."""
    return {str(t.get("code")) for t in items(resource.get("meta"), "tag") if t.get("system") == REPORT_ROLE}


def is_original(resource: Json) -> bool:
    """A report tagged ``report-role|original``: the report the second opinion re-reads."""
    return "original" in roles(resource)


def is_case(task: Json | None) -> bool:
    """A Task that tracks a second-opinion case: intent order, focus a ServiceRequest."""
    return task is not None and task.get("intent") == "order" and order_of(task) is not None


def order_of(task: Json) -> str | None:
    """The id of the ServiceRequest a Task is focused on, if it is one."""
    reference = task.get("focus", {}).get("reference", "")
    return reference.removeprefix("ServiceRequest/") if reference.startswith("ServiceRequest/") else None


def case_of(store: Lookup, order_id: str) -> "Stored | None":
    """The Task that tracks the order's case (``is_case``), not any Task about the order."""
    tasks = store.referring("Task", "focus", f"ServiceRequest/{order_id}")
    return next((task for task in tasks if is_case(task.resource)), None)


def is_case_order(store: Lookup, order_id: str) -> bool:
    """A ServiceRequest stored here that a case tracks."""
    order = store.current("ServiceRequest", order_id)
    return order is not None and order.content is not None and case_of(store, order_id) is not None


def orders(report: Json) -> list[str]:
    """The ids of the ServiceRequests a report is based on (literal references)."""
    found = (_ORDER.search(str(ref.get("reference", ""))) for ref in items(report, "basedOn"))
    return [m.group(1) for m in found if m]


def says_second_opinion(report: Json) -> bool:
    """The report says it is a second opinion: the profile claimed, the tag, or a discrepancy code."""
    meta = report.get("meta")
    claimed = meta.get("profile") if isinstance(meta, dict) else None
    profiled = isinstance(claimed, list) and any(str(p).split("|")[0] == SECOND_OPINION_REPORT for p in claimed)
    coded = any(c.get("system") == DISCREPANCY for cc in items(report, "conclusionCode") for c in items(cc, "coding"))
    return profiled or coded or "second-opinion" in roles(report)


def _may_be_one(report: Json) -> bool:
    return report.get("resourceType") == "DiagnosticReport" and not is_original(report)


def is_second_opinion_report(report: Json | None, store: Lookup | None) -> bool:
    """The definition above; without a store (no database at hand) only what the report says counts."""
    if report is None or not _may_be_one(report):
        return False
    if says_second_opinion(report):
        return True
    return store is not None and any(is_case_order(store, order_id) for order_id in orders(report))


def second_opinion_order(report: Json | None, store: Lookup | None) -> str | None:
    """The order a second-opinion report is about (its case's, else the first); None for any other report."""
    if report is None or not _may_be_one(report):
        return None
    ids = orders(report)
    cased = next((i for i in ids if store is not None and is_case_order(store, i)), None)
    if cased is not None:
        return cased
    return ids[0] if ids and says_second_opinion(report) else None


def required_profiles(resource: Json, store: Lookup | None) -> list[str]:
    """The profile rule of ``fhir_server.profiles``: every second-opinion report must conform to
    ``second-opinion-report``, claimed or not (a client that forgets the discrepancy code is refused)."""
    return [SECOND_OPINION_REPORT] if is_second_opinion_report(resource, store) else []
