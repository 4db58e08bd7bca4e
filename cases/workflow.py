"""The case workflow and the second-opinion report rules, the same through every door.

``case_workflow`` is a repository hook (docs/workflow.md):

- The Task of a case (intent order, focus a ServiceRequest) moves only along the R4 Task state
  machine (task.html#statemachine), widened where order control needs it: HL7 HD/RL hold and
  release a case that was never started, CA/DC cancel one at any point before it ends.
- The ServiceRequest follows its case: active while the Task is open, on-hold while it is,
  completed with it, revoked when it is cancelled, rejected or failed.
- A second-opinion report (``cases.second_opinion``) moves registered/partial/preliminary →
  final → amended/corrected/appended; entered-in-error from anywhere. It gains the
  ``compared-report`` extension when the case has an original report, and ``imagingStudy`` (the
  studies linked to the order) when it names none. A final, amended, corrected or appended one
  needs the case's images (an ImagingStudy basedOn the order) or the reader's reason for reading
  without them (extension ``no-images-reason``); it completes the case (Task.output → the
  report, businessStatus ``reported``), in the same transaction.

An illegal move is 409 Conflict with an OperationOutcome issue ``business-rule`` naming the
current status, the asked one and the legal next ones: the request conflicts with the current
state of the resource (RFC 9110 §15.5.10), like ``$link-imaging`` on an order that is not
active; a final report without images is one too (the same report is fine once they are
linked). 422 stays for content that is wrong whatever the state (type rules, profiles).
"""

from typing import Any

from cases.second_opinion import case_of, is_case, order_of, second_opinion_order
from cases.task import REPORTED, with_case_status
from fhir_server.errors import error
from fhir_server.repository import Change, Repository, Stored, same_content
from mappings.original_report import REPORT_ROLE

COMPARED_REPORT = "https://overread.org/fhir/StructureDefinition/compared-report"
#: The reader's reason for a final report without the case's images (docs/workflow.md).
NO_IMAGES_REASON = "https://overread.org/fhir/StructureDefinition/no-images-reason"
SECOND_OPINION_OUTPUT = "second-opinion report"

# -- Task ----------------------------------------------------------------------------

_OPEN = ("requested", "received", "accepted", "ready", "in-progress")
#: The legal next statuses of a case's Task (entered-in-error is legal from every status).
TASK_NEXT: dict[str, frozenset[str]] = {
    "draft": frozenset({"requested", "cancelled"}),
    "requested": frozenset({"received", "accepted", "ready", "rejected", "cancelled", "on-hold"}),
    "received": frozenset({"accepted", "rejected", "cancelled", "on-hold"}),
    "accepted": frozenset({"ready", "in-progress", "cancelled", "on-hold"}),
    "ready": frozenset({"in-progress", "cancelled", "failed", "on-hold"}),
    "in-progress": frozenset({"completed", "failed", "on-hold", "cancelled"}),
    "on-hold": frozenset({*_OPEN, "cancelled", "failed"}),
    "completed": frozenset(),
    "rejected": frozenset(),
    "cancelled": frozenset(),
    "failed": frozenset(),
    "entered-in-error": frozenset(),
}
#: Where a report completes the case from: its Task need not have been started by the reader.
COMPLETED_BY_REPORT = frozenset({*_OPEN, "on-hold"})
#: ServiceRequest.status of the order while its case's Task has this status.
ORDER_STATUS = {
    **dict.fromkeys(_OPEN, "active"),
    "on-hold": "on-hold",
    "completed": "completed",
    "cancelled": "revoked",
    "rejected": "revoked",
    "failed": "revoked",
}

# -- DiagnosticReport ------------------------------------------------------------------

_AFTER_FINAL = frozenset({"amended", "corrected", "appended"})
#: The legal next statuses of a second-opinion report (entered-in-error is legal from every status).
REPORT_NEXT: dict[str, frozenset[str]] = {
    "registered": frozenset({"partial", "preliminary", "final", "cancelled"}),
    "partial": frozenset({"registered", "preliminary", "final", "cancelled"}),
    "preliminary": frozenset({"registered", "partial", "final", "cancelled"}),
    "final": _AFTER_FINAL,
    "amended": _AFTER_FINAL,
    "corrected": _AFTER_FINAL,
    "appended": _AFTER_FINAL,
    "cancelled": frozenset(),
    "entered-in-error": frozenset(),
}
#: Report statuses that complete the case.
COMPLETING = frozenset({"final", *_AFTER_FINAL})


def case_workflow(repo: Repository, change: Change) -> None:
    """Repository hook: the status rules of cases and second-opinion reports."""
    if change.type == "Task":
        _task(repo, change)
    elif change.type == "DiagnosticReport":
        _report(repo, change)


def _previous(change: Change) -> dict[str, Any] | None:
    """The current content before this write (None for a create or for bringing back a deleted one)."""
    return change.previous.resource if change.previous is not None and change.previous.content else None


def _task(repo: Repository, change: Change) -> None:
    task, before = change.resource, _previous(change)
    if task is None or before is None or not (is_case(task) or is_case(before)):
        return
    old, new = before.get("status", ""), task.get("status", "")
    if old == new:
        return
    legal = TASK_NEXT.get(old, frozenset()) | {"entered-in-error"}
    by_report = new == "completed" and old in COMPLETED_BY_REPORT and _outputs_report(task)
    if new not in legal and not by_report:
        raise _illegal(f"Task/{change.id}", old, new, legal)
    if (order_id := order_of(task)) is not None and new in ORDER_STATUS:
        repo.defer(lambda r: _follow(r, order_id))


def _outputs_report(task: dict[str, Any]) -> bool:
    return any(
        o.get("valueReference", {}).get("reference", "").startswith("DiagnosticReport/") for o in task.get("output", [])
    )


def _follow(repo: Repository, order_id: str) -> None:
    """The order's status after its case's (the Task as it is at the end of the unit of work)."""
    order, case = repo.current("ServiceRequest", order_id), case_of(repo, order_id)
    if order is None or order.content is None or case is None:
        return
    status = ORDER_STATUS.get(case.resource.get("status", ""))
    resource = order.resource
    if status is None or resource.get("status") in (status, "entered-in-error"):
        return
    repo.update("ServiceRequest", order_id, {**resource, "status": status}, order.etag)


def _illegal(what: str, old: str, new: str, legal: frozenset[str]) -> Exception:
    nexts = ", ".join(sorted(legal)) or "none"
    return error(409, "business-rule", f"{what} cannot go from {old!r} to {new!r}; from {old!r} it can go to: {nexts}")


# -- reports ---------------------------------------------------------------------------


def _report(repo: Repository, change: Change) -> None:
    report, before = change.resource, _previous(change)
    order_id = second_opinion_order(report, repo)
    if report is None or order_id is None:
        return
    new = report.get("status", "")
    if before is not None and second_opinion_order(before, repo) is not None:
        old = before.get("status", "")
        legal = REPORT_NEXT.get(old, frozenset(REPORT_NEXT)) | {"entered-in-error"}
        if old != new and new not in legal:
            raise _illegal(f"DiagnosticReport/{change.id}", old, new, legal)
    _compare_with_original(repo, change, report, order_id)
    studies = linked_studies(repo, order_id)
    _reference_images(change, studies)
    if before is not None and before.get("status") == new == "final" and not same_content(before, change.resource):
        # The referrer already has this final report: a change must reach it as a correction (OBR-25 C).
        raise error(
            409,
            "business-rule",
            f"DiagnosticReport/{change.id} is final: change it as amended, corrected or appended, not as final",
            "DiagnosticReport.status",
        )
    if new in COMPLETING:
        _require_images(change, order_id, studies)
        report_id, news = change.id, not same_content(before, change.resource)
        repo.defer(lambda r: _complete_case(r, order_id, report_id, news))


def _compare_with_original(repo: Repository, change: Change, report: dict[str, Any], order_id: str) -> None:
    """Add ``compared-report`` (the case's original report) to the report about to be written."""
    if any(e.get("url") == COMPARED_REPORT for e in report.get("extension", [])):
        return
    original = _original_report(repo, order_id)
    if original is None or original.id == change.id:
        return
    extension = {"url": COMPARED_REPORT, "valueReference": {"reference": f"DiagnosticReport/{original.id}"}}
    change.resource = {**report, "extension": [*report.get("extension", []), extension]}


def linked_studies(repo: Repository, order_id: str) -> list[Stored]:
    """The case's images: the ImagingStudies based on the order (``cases.task.link_study``)."""
    return repo.search("ImagingStudy", [("basedon", f"ServiceRequest/{order_id}")])


def _reference_images(change: Change, studies: list[Stored]) -> None:
    """A report that names no ImagingStudy gets those linked to its order: what the reader read."""
    report = change.resource
    if report is None or report.get("imagingStudy") or not studies:
        return
    change.resource = {**report, "imagingStudy": [{"reference": f"ImagingStudy/{s.id}"} for s in studies]}


def _require_images(change: Change, order_id: str, studies: list[Stored]) -> None:
    """A final report reads the case's images, or says why the reader reported without them."""
    report = change.resource or {}
    if studies or any(e.get("url") == NO_IMAGES_REASON for e in report.get("extension", [])):
        return
    raise error(
        409,
        "business-rule",
        f"DiagnosticReport/{change.id} cannot be {report.get('status')!r}: ServiceRequest/{order_id} has no"
        f" ImagingStudy linked. Link the images (ServiceRequest/{order_id}/$link-imaging), send the report as"
        f" preliminary, or state why it was read without them in the extension {NO_IMAGES_REASON}",
        "DiagnosticReport.status",
    )


def _original_report(repo: Repository, order_id: str) -> Stored | None:
    """The latest original report linked to the order."""
    query = [
        ("based-on", f"ServiceRequest/{order_id}"),
        ("_tag", f"{REPORT_ROLE}|original"),
        ("_sort", "-_lastUpdated"),
    ]
    found = repo.search("DiagnosticReport", query)
    return found[0] if found else None


def _complete_case(repo: Repository, order_id: str, report_id: str, news: bool) -> None:
    """A final (amended, corrected, appended) report: its case is completed and reported, with the report as output."""
    case = case_of(repo, order_id)
    if case is None:
        return
    task = case.resource
    status = task.get("status", "")
    if status != "completed" and status not in COMPLETED_BY_REPORT:
        raise error(
            409,
            "business-rule",
            f"Task/{case.id} of ServiceRequest/{order_id} is {status!r}: a report cannot complete it",
        )
    reference = f"DiagnosticReport/{report_id}"
    outputs = task.get("output", [])
    # The client's own output for the report may carry a display or type: the reference decides.
    listed = any(o.get("valueReference", {}).get("reference") == reference for o in outputs)
    if not listed:
        outputs = [*outputs, {"type": {"text": SECOND_OPINION_OUTPUT}, "valueReference": {"reference": reference}}]
    completed = {**task, "status": "completed", "output": outputs}
    if news or not (listed and status == "completed"):  # the same report sent again is no news to report
        completed = with_case_status(completed, REPORTED)
    if completed != task:
        repo.update("Task", case.id, completed, case.etag)
