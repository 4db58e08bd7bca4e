"""Results out: each version of a second-opinion report leaves work for whoever delivers results.

``results`` is a repository hook: when a second-opinion DiagnosticReport (``cases.second_opinion``)
is written with a status that is a result to send
(preliminary, final, amended, corrected, appended), or withdrawn (entered-in-error, cancelled)
after such a version, it leaves a ``result`` outbox row naming that report version, in the same
transaction as the write; a version that says the same as the one before leaves none. The FHIR
store knows nothing of HL7: the ``hl7_bridge.results_queue`` worker turns the row into ORU^R01
messages, one per destination that wants it (preliminary reports only go where a destination asks
for them).
"""

from cases.second_opinion import second_opinion_order
from fhir_server.repository import Change, Repository, same_content

#: The outbox topic of a report version to deliver.
RESULT = "result"
#: The report statuses that are a result for the ordering system (OBR-25 P, F, C).
RESULT_STATUSES = frozenset({"preliminary", "final", "amended", "corrected", "appended"})
#: A result withdrawn (OBR-25 X): sent when a version the ordering system may have is withdrawn.
RETRACTIONS = frozenset({"entered-in-error", "cancelled"})


def results(repo: Repository, change: Change) -> None:
    """Repository hook: a ``result`` outbox row for each version of a second-opinion report worth sending."""
    if change.type != "DiagnosticReport" or change.resource is None:
        return
    status = change.resource.get("status")
    order_id = second_opinion_order(change.resource, repo)
    before = change.previous.resource if change.previous is not None and change.previous.content else None
    was_result = before is not None and before.get("status") in RESULT_STATUSES
    if order_id is None or not (status in RESULT_STATUSES or (status in RETRACTIONS and was_result)):
        return
    if same_content(before, change.resource):
        return  # the same report again: the receiver has it
    repo.enqueue(RESULT, change, {"order": order_id, "status": status})
