"""Results out: each version of a second-opinion report leaves work for whoever delivers results.

``results`` is a repository hook: when a second-opinion DiagnosticReport (basedOn a ServiceRequest,
not tagged ``report-role|original``) is written with a status that is a result to send
(preliminary, final, amended, corrected, appended), it leaves a ``result`` outbox row naming that
report version, in the same transaction as the write. The FHIR store knows nothing of HL7: the
``hl7_bridge.delivery`` worker turns the row into ORU^R01 messages, one per destination that wants
it (preliminary reports only go where a destination asks for them).
"""

from fhir_server.repository import Change, Repository
from fhir_server.workflow import second_opinion_order

#: The outbox topic of a report version to deliver.
RESULT = "result"
#: The report statuses that are a result for the ordering system (OBR-25 P, F, C).
RESULT_STATUSES = frozenset({"preliminary", "final", "amended", "corrected", "appended"})


def results(repo: Repository, change: Change) -> None:
    """Repository hook: a ``result`` outbox row for each version of a second-opinion report worth sending."""
    if change.type != "DiagnosticReport" or change.resource is None:
        return
    status = change.resource.get("status")
    order_id = second_opinion_order(change.resource)
    if order_id is None or status not in RESULT_STATUSES:
        return
    repo.enqueue(RESULT, change, {"order": order_id, "status": status})
