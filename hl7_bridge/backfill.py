"""Backfill: the results a destination never had, queued for it (docs/delivery.md, "Backfill").

A destination added after reports were made final has none of them. For each destination (or the
ones named), ``backfill`` finds the second-opinion reports whose current version is a result that
destination wants — ``hl7_bridge.results_queue.choose`` decides, so its ``sending_facility`` and
``send_preliminary`` are honoured — and that have no message of any version for it, and queues the
ORU^R01 of that version like the queueing worker does (a result that cannot be made is a ``failed``
row with its reason). A dry run only lists them. One transaction per report; a second run finds the
messages of the first, and the unique key (destination, report, version, sequence) settles a race
with the queueing worker, so nothing is queued twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from sqlalchemy import exists, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cases.results import RESULT_STATUSES
from cases.second_opinion import second_opinion_order
from fhir_server.repository import Repository
from fhir_server.schema import ResourceRow
from hl7_bridge.delivery_status import show_on_case
from hl7_bridge.outbound import FAILED, NO_DESTINATION, OutboundMessage
from hl7_bridge.results_queue import Result, ResultsQueue

WOULD_QUEUE, QUEUED, FAILED_NOW = "would queue", "queued", "failed"


@dataclass(frozen=True)
class Backfilled:
    """One report version for one destination: what the backfill did (or, in a dry run, would do)."""

    destination: str
    report_id: str
    version: int
    report_status: str
    order_id: str
    outcome: str  # WOULD_QUEUE, QUEUED, FAILED_NOW (``reason`` says why)
    message_id: int | None = None
    reason: str | None = None


class UnknownDestination(ValueError):
    pass


def backfill(results: ResultsQueue, names: Sequence[str] = (), dry_run: bool = False) -> list[Backfilled]:
    """Queue (or list, ``dry_run``) the latest result version of each second-opinion report that
    has no message for a destination; all of ``results``' destinations, or those ``names``d."""
    unknown = [n for n in names if n not in results.by_name]
    if unknown:
        configured = ", ".join(results.by_name) or "none"
        raise UnknownDestination(f"no destination {', '.join(unknown)} is configured (configured: {configured})")
    wanted = set(names or results.by_name)
    done: list[Backfilled] = []
    for report_id in _reports(results):
        try:
            done += _report(results, report_id, wanted, dry_run)
        except IntegrityError:  # the queueing worker made one of these messages meanwhile: look again
            done += _report(results, report_id, wanted, dry_run)
    return done


def _reports(results: ResultsQueue) -> list[str]:
    """The ids of the DiagnosticReports that exist now, oldest first."""
    r = ResourceRow
    with results.executor.begin(write=False) as conn:
        return list(conn.scalars(select(r.id).where(r.type == "DiagnosticReport", ~r.deleted).order_by(r.pk)))


def _report(results: ResultsQueue, report_id: str, wanted: set[str], dry_run: bool) -> list[Backfilled]:
    """One report, in one transaction: a message for each wanted destination that has none of it."""
    with results.executor.session() as session:
        repo = Repository(session, results.hooks)
        current = repo.current("DiagnosticReport", report_id)
        report = current.resource if current is not None else {}
        order_id, status = second_opinion_order(report, repo), str(report.get("status", ""))
        if current is None or order_id is None or status not in RESULT_STATUSES:
            return []
        missing = {name for name in wanted if not _has_message(session, name, report_id)}
        if not missing:
            return []
        gathered = results.gather(repo, Result(report_id, current.version, order_id, status))
        result = gathered.result
        targets = [d for d in results.targets(gathered) if d is not None and d.name in missing]
        planned = [Backfilled(d.name, report_id, result.version, result.status, result.order_id, WOULD_QUEUE)
                   for d in targets]  # fmt: skip
        if dry_run or not targets:
            return planned
        rows = [results.build(gathered, d, replay_of=_unsent(session, result)) for d in targets]
        session.add_all(rows)
        session.flush()
        if result.order_id:
            show_on_case(session, results.hooks, result.order_id, rows)
        repo.complete()
    return [_outcome(plan, row) for plan, row in zip(planned, rows, strict=True)]


def _outcome(planned: Backfilled, row: OutboundMessage) -> Backfilled:
    failed = row.status == FAILED
    return replace(planned, outcome=FAILED_NOW if failed else QUEUED, message_id=row.pk,
                   reason=row.last_error if failed else None)  # fmt: skip


def _has_message(session: Session, destination: str, report_id: str) -> bool:
    m = OutboundMessage
    return bool(session.scalar(select(exists().where(m.destination == destination, m.report_id == report_id))))


def _unsent(session: Session, result: Result) -> int | None:
    """The failed row that says this report version had no destination: the backfill answers it."""
    m = OutboundMessage
    return session.scalar(
        select(m.pk)
        .where(
            m.destination == NO_DESTINATION,
            m.report_id == result.report_id,
            m.report_version == result.version,
            m.status == FAILED,
        )
        .order_by(m.pk.desc())
        .limit(1)
    )


def table(done: Sequence[Backfilled], dry_run: bool) -> str:
    """The backfill as a table, a line per report version and destination, then a count per outcome."""
    header = ("DESTINATION", "REPORT", "STATUS", "ORDER", "OUTCOME")
    lines = [header] + [
        (
            d.destination,
            f"DiagnosticReport/{d.report_id}/_history/{d.version}",
            d.report_status,
            f"ServiceRequest/{d.order_id}",
            d.outcome + (f" (message {d.message_id})" if d.message_id else "") + (f": {d.reason}" if d.reason else ""),
        )
        for d in done
    ]
    widths = [max(len(line[n]) for line in lines) for n in range(len(header) - 1)]
    rows = [" ".join([*(cell.ljust(w) for cell, w in zip(line, widths, strict=False)), line[-1]]) for line in lines]
    counts = Counter(d.outcome for d in done)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "nothing to backfill"
    return "\n".join([*(rows if done else []), ("dry run: " if dry_run else "") + summary])
