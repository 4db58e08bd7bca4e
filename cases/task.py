"""The rules of a second-opinion case, the same through every door.

- A ServiceRequest created (the create interaction: POST, alone or in a transaction, from
  FHIR or from an HL7 order) as an active order opens a case: a Task (status requested,
  intent order, focus the ServiceRequest) unless the same request already wrote one, and one
  image-linking job in the outbox. Both are written in the transaction that created the order.
- Where the case stands is the Task's businessStatus (``set_case_status``); the linking
  worker (``dicom_bridge.linking``) links one ImagingStudy per study to every order that
  asked for it (``link_study``), only when the study's patient is the order's
  (``cases.patient_match``); ``$link-imaging`` queues the job again (``relink``), or
  with a ``Confirmation`` links a study whose patient did not match, audited
  (``confirmed_link_audit``).
- An original report (tagged ``report-role|original``) is linked to its order by accession
  or placer number, whichever of the two arrives first, when its patient is the order's.
- A new case is routed (``cases.routing``): Task.owner and the due date
  (Task.restriction.period.end) from the rules the hook was made with (``case_opener``).
  Status rules of the case and its reports are ``cases.workflow``.
- The placer's order control (HL7 ORC-1 CA/DC/HD/RL/SC, ``hl7_bridge.intake``) reaches the
  case Task through ``control_case``.
"""

from dataclasses import dataclass
from typing import Any

from cases import patient_match
from cases.routing import NO_ROUTING, Routing, route
from cases.second_opinion import case_of, is_case, is_original, order_of
from fhir_server import dates, outbox
from fhir_server.errors import error
from fhir_server.repository import Change, Hook, Repository, Stored

#: The outbox topic of the image-linking worker (dicom_bridge).
LINK_IMAGING = "link-imaging"
#: ServiceRequest.intent of an order that opens a case (R4 request-intent, the order codes).
ORDER_INTENTS = {"order", "original-order", "reflex-order", "filler-order", "instance-order"}


def case_opener(routing: Routing = NO_ROUTING) -> Hook:
    """The ``open_case`` hook whose new cases are routed (owner, due date) by ``routing``."""

    def open_case(repo: Repository, change: Change) -> None:
        """Repository hook: a new active order asks for its case once the request is written.

        An original report written without ``basedOn`` asks for the order it belongs to as well.
        """
        resource = change.resource
        if resource is None:
            return
        if change.type == "Task" and change.method == "POST" and routing != NO_ROUTING:
            change.resource = _routed(repo, resource, routing)  # a Task the request brought (an HL7 order's)
        elif change.type == "DiagnosticReport" and is_original(resource) and not resource.get("basedOn"):
            repo.defer(lambda r: _link_report(r, change.id))
        elif change.type == "ServiceRequest" and change.method == "POST" and _opens_case(resource):
            repo.defer(lambda r: _ensure_case(r, change.id, routing))

    return open_case


def _opens_case(order: dict[str, Any]) -> bool:
    return order.get("intent") in ORDER_INTENTS and order.get("status") == "active"


#: The case hook without routing rules.
open_case = case_opener()


def _routed(repo: Repository, task: dict[str, Any], routing: Routing) -> dict[str, Any]:
    """A new Task of a case, routed by its order when the order is already written."""
    order_id = order_of(task)
    if not is_case(task) or order_id is None:
        return task
    order = repo.current("ServiceRequest", order_id)
    return task if order is None or order.content is None else route(routing, task, order.resource)


def _ensure_case(repo: Repository, order_id: str, routing: Routing = NO_ROUTING) -> None:
    """The order's case: a new Task, or the one the request brought, routed (if it came before its order)."""
    order = repo.read("ServiceRequest", order_id)
    case = case_of(repo, order_id)
    if case is None:
        repo.create(route(routing, task_for(order_id, order.resource), order.resource))
    elif (routed := route(routing, case.resource, order.resource)) != case.resource:
        repo.update("Task", case.id, routed, case.etag)
    repo.enqueue(LINK_IMAGING, order)
    _link_reports_of(repo, order)


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


# -- where the case stands: Task.businessStatus ---------------------------------------

#: Task.businessStatus codes of a case (docs/image-linking.md, docs/workflow.md).
CASE_STATUS = "https://overread.org/fhir/CodeSystem/case-status"
IMAGES_PENDING = "images-pending"  # a linking job is looking (or will look again)
IMAGES_AVAILABLE = "images-available"  # the ImagingStudy is linked (and retrieved, where configured)
IMAGES_NOT_FOUND = "images-not-found"  # the job gave up: no PACS had a matching study
IMAGES_UNAVAILABLE = "images-unavailable"  # the job gave up: the study was found but could not be retrieved
IMAGES_MISMATCH = "images-mismatch"  # a study was found, but of another patient: not linked
PACS_UNREACHABLE = "pacs-unreachable"  # the job gave up: no PACS peer answered at all
REPORTED = "reported"  # a final (amended, corrected) second-opinion report is in (cases.workflow)
#: Delivery of the final report's result (``hl7_bridge.delivery_status.case_delivery_status``; docs/delivery.md).
RESULT_QUEUED = "result-queued"  # queued, or being retried, for a destination
RESULT_SENT = "result-sent"  # every destination acknowledged it (AA)
RESULT_FAILED = "result-failed"  # it could not be made, had no destination, or its attempts are spent
CASE_STATUS_DISPLAY = {
    IMAGES_PENDING: "Images pending",
    IMAGES_AVAILABLE: "Images available",
    IMAGES_NOT_FOUND: "Images not found",
    IMAGES_UNAVAILABLE: "Images found but not retrieved",
    IMAGES_MISMATCH: "Images of another patient",
    PACS_UNREACHABLE: "PACS unreachable",
    REPORTED: "Reported",
    RESULT_QUEUED: "Result queued",
    RESULT_SENT: "Result sent",
    RESULT_FAILED: "Result not delivered",
}
#: The statuses a reported (completed) case can still take: news of its report, never of its images.
#: Listed rather than excluded, so a status added later cannot undo ``reported`` by default.
AFTER_REPORT = frozenset({REPORTED, RESULT_QUEUED, RESULT_SENT, RESULT_FAILED})


def set_case_status(repo: Repository, order_id: str, code: str, reason: str | None = None) -> None:
    """Task.businessStatus (and statusReason's text) of the order's case; no new version if unchanged.

    A case that is completed or reported takes only the statuses of ``AFTER_REPORT``: the report
    is its news, and images found (or looked for again) after it do not make it pending.
    """
    task = case_of(repo, order_id)
    if task is None or (code not in AFTER_REPORT and _reported(task.resource)):
        return
    updated = with_case_status(task.resource, code, reason)
    if updated != task.resource:
        repo.update("Task", task.id, updated, task.etag)


def control_case(
    repo: Repository, order_id: str, status: str | None, business_status: dict[str, Any] | None
) -> dict[str, str]:
    """The placer's order control on the order's case (HL7 ORC-1 CA/DC/HD/RL/SC: ``hl7_bridge.intake``).

    The case Task takes ``status`` and ``business_status`` (a CodeableConcept: where the placer
    says the order stands), each when given; the workflow judges the move (``cases.workflow``).
    Returns ``{"Task/id": versioned reference}`` of what changed; empty when the order has no case.
    """
    case = case_of(repo, order_id)
    changes = {"status": status, "businessStatus": business_status}
    update = {k: v for k, v in changes.items() if v is not None}
    if case is None or not update:
        return {}
    updated, _ = repo.update("Task", case.id, {**case.resource, **update}, case.etag)
    return {f"Task/{updated.id}": f"Task/{updated.id}/_history/{updated.version}"}


def with_case_status(task: dict[str, Any], code: str, reason: str | None = None) -> dict[str, Any]:
    """The Task with businessStatus ``code`` of the case-status CodeSystem and statusReason's text
    ``reason`` (none when None)."""
    status = {"coding": [{"system": CASE_STATUS, "code": code, "display": CASE_STATUS_DISPLAY[code]}]}
    updated = {**task, "businessStatus": status}
    updated.pop("statusReason", None)
    if reason:
        updated["statusReason"] = {"text": reason}
    return updated


def case_status(task: dict[str, Any]) -> set[str]:
    """The codes of a Task's businessStatus that are ``CASE_STATUS`` codes (not the placer's order status)."""
    return {c.get("code") for c in task.get("businessStatus", {}).get("coding", []) if c.get("system") == CASE_STATUS}


def _reported(task: dict[str, Any]) -> bool:
    return task.get("status") == "completed" or bool(case_status(task) & AFTER_REPORT)


def link_study(repo: Repository, study: dict[str, Any]) -> Stored:
    """Store an ImagingStudy: one per Study Instance UID, based on every order that asked for it.

    A study already linked to another order keeps that order in ``basedOn`` and gains this
    one; the rest comes from the latest query. The lock makes two jobs for one study, even
    in two server processes, take turns instead of creating it twice.
    """
    (uid,) = [i["value"] for i in study["identifier"] if i.get("system") == "urn:dicom:uid"]
    repo.lock(f"ImagingStudy|{uid}")
    found = repo.with_token("ImagingStudy", "identifier", "urn:dicom:uid", uid, limit=1)
    if not found:
        return repo.create(study)
    current = found[0]
    based_on = [*current.resource.get("basedOn", [])]
    based_on += [ref for ref in study.get("basedOn", []) if ref not in based_on]
    return repo.update_if_changed(current, {**study, "basedOn": based_on}) or current


@dataclass(frozen=True)
class Confirmation:
    """An operator's word that a study is the order's although its patient did not match.

    It travels in the linking job's payload; the worker links that study whatever its patient
    and writes ``confirmed_link_audit`` in the transaction that links it.
    """

    study_uid: str
    reason: str
    operator: dict[str, Any]  # a FHIR Reference: who confirmed

    def payload(self) -> dict[str, Any]:
        return {"confirm": {"study_uid": self.study_uid, "reason": self.reason, "operator": self.operator}}

    @classmethod
    def of(cls, payload: dict[str, Any]) -> "Confirmation | None":
        confirm = payload.get("confirm")
        return cls(confirm["study_uid"], confirm["reason"], confirm["operator"]) if confirm else None


def relink(repo: Repository, order_id: str, confirmation: Confirmation | None = None) -> None:
    """``ServiceRequest/[id]/$link-imaging``: look for the order's images again, now.

    With a confirmation the order's other pending jobs end: they would find the same study
    and call it a mismatch again after the confirmed link.
    """
    order = repo.read("ServiceRequest", order_id)
    if order.resource.get("status") != "active":
        raise error(409, "business-rule", f"ServiceRequest/{order_id} is {order.resource.get('status')}, not active")
    if confirmation is not None:
        outbox.supersede(repo.conn, LINK_IMAGING, order_id)
    repo.enqueue(LINK_IMAGING, order, confirmation.payload() if confirmation else None)
    set_case_status(repo, order_id, IMAGES_PENDING)


#: The AuditEvent of a confirmed link: DICOM "Patient Record" (PS3.15 A.5.3.1), updated.
DCM = "http://dicom.nema.org/resources/ontology/DCM"
AUDIT_EVENT_TYPE = "https://overread.org/fhir/CodeSystem/audit-event-type"


def confirmed_link_audit(
    order: Stored, study: Stored, confirmation: Confirmation, order_patient: str, study_patient: str
) -> dict[str, Any]:
    """The R4 AuditEvent of a link an operator confirmed: who (agent), why (purposeOfEvent), what (entity).

    ``order_patient`` and ``study_patient`` are the two identities as the reason printed them.
    """
    subject = order.resource.get("subject", {})
    return {
        "resourceType": "AuditEvent",
        "type": {"system": DCM, "code": "110110", "display": "Patient Record"},
        "subtype": [{"system": AUDIT_EVENT_TYPE, "code": "confirmed-image-link", "display": "Image link confirmed"}],
        "action": "U",
        "recorded": dates.instant(dates.now()),
        "outcome": "0",
        "purposeOfEvent": [{"text": confirmation.reason}],
        "agent": [{"who": confirmation.operator, "requestor": True}],
        "source": {"observer": {"display": "Overread image linking"}},
        "entity": [
            {"what": {"reference": f"ServiceRequest/{order.id}"}, "description": "The order"},
            {"what": subject, "description": "The order's patient", "detail": [_detail("identity", order_patient)]},
            {
                "what": {"reference": f"ImagingStudy/{study.id}"},
                "description": f"Study {confirmation.study_uid}",
                "detail": [_detail("dicom-patient", study_patient)],
            },
        ],
    }


def _detail(kind: str, value: str) -> dict[str, str]:
    return {"type": kind, "valueString": value}


# -- the original report a case is compared with ---------------------------------------

#: The order identifiers a report is matched on, in this order: accession, then placer number.
LINK_TYPES = ("ACSN", "PLAC")


def _link_keys(resource: dict[str, Any]) -> list[tuple[str, str]]:
    """``(system, value)`` of the resource's accession and placer identifiers (those that link)."""
    return [
        (i["system"], i["value"])
        for code in LINK_TYPES
        for i in resource.get("identifier", [])
        if _typed(i, code) and i.get("system") and i.get("value")
    ]


def _link_reports_of(repo: Repository, order: Stored) -> None:
    """A new order: its original reports that came first (same accession or placer, same patient) gain basedOn."""
    for key in _link_keys(order.resource):
        repo.lock(f"original-report|{'|'.join(key)}")
        for report in repo.with_token("DiagnosticReport", "identifier", *key):
            _add_based_on(repo, report, order)


def _link_report(repo: Repository, report_id: str) -> None:
    """A new original report: basedOn the one order of its accession (else placer) number, when it exists."""
    report = repo.read("DiagnosticReport", report_id)
    for key in _link_keys(report.resource):
        repo.lock(f"original-report|{'|'.join(key)}")
        orders = [o for o in repo.with_token("ServiceRequest", "identifier", *key) if _same_subject(repo, o, report)]
        if len(orders) == 1:
            _add_based_on(repo, report, orders[0])
            return


def _same_subject(repo: Repository, order: Stored, report: Stored) -> bool:
    """The report's patient is the order's: the same Patient, or one ``patient_match`` (strict) says is."""
    ours = str(order.resource.get("subject", {}).get("reference", ""))
    theirs = str(report.resource.get("subject", {}).get("reference", ""))
    if not ours.startswith("Patient/") or not theirs.startswith("Patient/"):
        return False
    if ours == theirs:
        return True
    order_patient, report_patient = (repo.current("Patient", ref.removeprefix("Patient/")) for ref in (ours, theirs))
    if order_patient is None or order_patient.content is None or report_patient is None or not report_patient.content:
        return False
    return patient_match.matches(
        patient_match.of_patient(order_patient.resource), patient_match.of_patient(report_patient.resource)
    )


def _add_based_on(repo: Repository, report: Stored, order: Stored) -> None:
    """Link an original report to an order of the same patient; never anyone else's report."""
    resource = report.resource
    ref = {"reference": f"ServiceRequest/{order.id}"}
    if not is_original(resource) or not _same_subject(repo, order, report) or ref in resource.get("basedOn", []):
        return
    repo.update(
        "DiagnosticReport", report.id, {**resource, "basedOn": [*resource.get("basedOn", []), ref]}, report.etag
    )
