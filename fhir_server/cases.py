"""A second-opinion case opens the same way through every door.

A ServiceRequest created (the create interaction: POST, alone or in a transaction, from FHIR
or from an HL7 order) as an active order opens a case: a Task (status requested, intent
order, focus the ServiceRequest) unless the same request already wrote one, and one
image-linking job in the outbox. Both are written in the transaction that created the order.
"""

from typing import Any

from fhir_server import search
from fhir_server.repository import Change, Repository

#: The outbox topic of the image-linking worker (dicom_bridge).
LINK_IMAGING = "link-imaging"
ORDER_INTENTS = {"order", "original-order", "reflex-order", "filler-order", "instance-order"}


def open_case(repo: Repository, change: Change) -> None:
    """Repository hook: a new active order asks for its case once the request is written."""
    order = change.resource
    if change.type != "ServiceRequest" or change.method != "POST" or order is None:
        return
    if order.get("intent") in ORDER_INTENTS and order.get("status") == "active":
        repo.defer(lambda r: _ensure_case(r, change.id))


def _ensure_case(repo: Repository, order_id: str) -> None:
    order = repo.read("ServiceRequest", order_id)
    focus = search.parse("Task", [("focus", f"ServiceRequest/{order_id}")])
    if not search.execute(repo.conn, focus).matches:
        repo.create(task_for(order_id, order.resource))
    repo.enqueue(LINK_IMAGING, order)


def task_for(order_id: str, order: dict[str, Any]) -> dict[str, Any]:
    """The Task that tracks the case of an order (R4 Task: requested, intent order, focus)."""
    task: dict[str, Any] = {
        "resourceType": "Task",
        "identifier": [i for i in order.get("identifier", []) if _typed(i, "PLAC")],
        "status": "requested",
        "intent": "order",
        "focus": {"reference": f"ServiceRequest/{order_id}"},
    }
    for element in ("priority", "authoredOn", "requester"):
        if element in order:
            task[element] = order[element]
    if "subject" in order:
        task["for"] = order["subject"]
    return {k: v for k, v in task.items() if v}


def _typed(identifier: dict[str, Any], code: str) -> bool:
    return any(c.get("code") == code for c in identifier.get("type", {}).get("coding", []))
