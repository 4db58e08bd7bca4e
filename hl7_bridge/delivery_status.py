"""How a case shows the delivery of its results (docs/delivery.md, "On the case").

The case's Task gets a ``result-delivery`` extension per destination and report version, updated
only when it changes, and once the case is completed, a businessStatus that follows delivery
(``case_delivery_status``). Each is written in the transaction of the outcome it shows.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import Session

from cases.second_opinion import case_of
from cases.task import RESULT_FAILED, RESULT_QUEUED, RESULT_SENT, with_case_status
from fhir_server.repository import Hook, Repository
from hl7_bridge.outbound import DEAD, ERROR, FAILED, NO_DESTINATION, PENDING, SENT, OutboundMessage

log = logging.getLogger(__name__)

#: The Task extension that shows each delivery of the case's results.
DELIVERY_EXTENSION = "https://overread.org/fhir/StructureDefinition/result-delivery"


def show_on_case(session: Session, hooks: Sequence[Hook], order_id: str, rows: Sequence[OutboundMessage]) -> None:
    """Each row's delivery on the case's Task (one extension per destination and report version), and,
    once the final report is in (the Task completed), where delivery stands as Task.businessStatus.

    In a savepoint: a Task that cannot take it (gone, refused) costs the case its status, never the
    delivery record.
    """
    try:
        with session.begin_nested():
            repo = Repository(session, hooks)
            task = case_of(repo, order_id)
            if task is None:
                return
            repo.lock(f"Task/{task.id}")  # key, then row, as Repository.update: senders of one case take turns
            current = repo.current("Task", task.id, for_update=True)
            if current is None or current.content is None:
                return
            resource = current.resource
            updated = {**resource, "extension": _with_deliveries(resource.get("extension", []), rows)}
            if updated.get("status") == "completed":
                updated = with_case_status(updated, *case_delivery_status(delivery_status(updated)))
            repo.update_if_changed(current, updated)
            repo.complete()
    except Exception:
        log.exception("showing the delivery of ServiceRequest/%s on its case", order_id)


def _with_deliveries(extensions: Sequence[dict[str, Any]], rows: Sequence[OutboundMessage]) -> list[dict[str, Any]]:
    """The Task's extensions with each row's entry added or replaced. A report version that reached a
    destination no longer shows that it had none."""
    found = list(extensions)
    for row in rows:
        entry = delivery_extension(row)
        if row.destination != NO_DESTINATION:
            found = [e for e in found if not _is_delivery(e, (NO_DESTINATION, report_ref(row)))]
        at = next((n for n, e in enumerate(found) if _is_delivery(e, _key(entry))), None)
        if at is None:
            found.append(entry)
        else:
            found[at] = entry
    return found


def _is_delivery(extension: Mapping[str, Any], key: tuple[str, str]) -> bool:
    return extension.get("url") == DELIVERY_EXTENSION and _key(extension) == key


def case_delivery_status(deliveries: Sequence[Mapping[str, str]]) -> tuple[str, str | None]:
    """Task.businessStatus (and the reason) from the case's deliveries (``delivery_status``).

    Only the latest version of each report shown counts: a correction that reached the receiver makes
    the failure of the version it corrects history. Any failed or dead message there = result-failed;
    else any still queued or being retried = result-queued; else (all acknowledged) result-sent.
    """
    latest: dict[str, int] = {}
    for entry in deliveries:
        report, version = _report_version(entry)
        latest[report] = max(latest.get(report, version), version)
    current = [e for e in deliveries if _report_version(e)[1] == latest[_report_version(e)[0]]]
    failed = [e["summary"] for e in current if e.get("status") in (FAILED, DEAD)]
    if failed:
        return RESULT_FAILED, "; ".join(failed)
    waiting = [e for e in current if e.get("status") in PENDING]
    if waiting:
        return RESULT_QUEUED, "; ".join(e["summary"] for e in waiting if e.get("status") == ERROR) or None
    return RESULT_SENT, None


def _report_version(entry: Mapping[str, str]) -> tuple[str, int]:
    """("DiagnosticReport/<id>", version) of a delivery entry's report reference."""
    report, _, version = entry.get("report", "").partition("/_history/")
    return report, int(version) if version.isdigit() else 0


def delivery_extension(row: OutboundMessage) -> dict[str, Any]:
    """The ``result-delivery`` extension of one message: where, which report version, MSH-10, status."""
    error = row.last_error if row.status != SENT else None
    detail = ", ".join(p for p in (row.ack_code, f"MSH-10 {row.control_id}" if row.control_id else "") if p)
    summary = f"{row.message_type} to {row.destination}: {row.status}" + (f" ({detail})" if detail else "")
    if error:
        summary += f": {error}"
    parts: list[dict[str, Any]] = [
        {"url": "destination", "valueString": row.destination},
        {"url": "report", "valueReference": {"reference": report_ref(row)}},
        {"url": "messageType", "valueString": row.message_type},
    ]
    if row.control_id:
        parts.append({"url": "controlId", "valueString": row.control_id})
    parts.append({"url": "status", "valueCode": row.status})
    if row.ack_code:
        parts.append({"url": "ackCode", "valueCode": row.ack_code})
    if error:
        parts.append({"url": "error", "valueString": error})
    parts.append({"url": "summary", "valueString": summary})
    return {"url": DELIVERY_EXTENSION, "extension": parts}


def delivery_status(task: Mapping[str, Any]) -> list[dict[str, str]]:
    """A Task's ``result-delivery`` extensions as plain dicts (sub-extension url → value)."""
    found = []
    for extension in task.get("extension", []):
        if extension.get("url") == DELIVERY_EXTENSION:
            found.append({e["url"]: _value(e) for e in extension.get("extension", [])})
    return found


def _value(extension: Mapping[str, Any]) -> str:
    for key, value in extension.items():
        if key.startswith("value"):
            return str(value["reference"]) if isinstance(value, dict) else str(value)
    return ""


def _key(extension: Mapping[str, Any]) -> tuple[str, str]:
    parts = {e.get("url"): e for e in extension.get("extension", [])}
    destination = str(parts.get("destination", {}).get("valueString", ""))
    report = str(parts.get("report", {}).get("valueReference", {}).get("reference", ""))
    return destination, report


def report_ref(row: OutboundMessage) -> str:
    return f"DiagnosticReport/{row.report_id}/_history/{row.report_version}"
