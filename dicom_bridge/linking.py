"""The image-linking worker: every case gets its ImagingStudy (docs/image-linking.md).

It consumes the ``link-imaging`` outbox rows that every new order leaves (and that
``$link-imaging`` and pushed studies add). For each: build the query from the order, ask
the configured PACS peers in order and then the local image store, link what is found
(an ImagingStudy per Study Instance UID, based on the order) when its patient is the
order's (``cases.patient_match``, each source with its own rule), retrieve it where
the peer says so, and tell the case where it stands (Task.businessStatus, the reason a
sentence of ``dicom_bridge.reasons``). A PACS that is down, a study not there yet or a
retrieve that fails means: try again later, with backoff, until the configured limit; then
a final status (``pacs-unreachable`` when no peer ever answered) and the reason on the Task.
A study of another patient is never linked: the case ends ``images-mismatch`` at once, until
an operator confirms the study (``$link-imaging`` with a reason) or another study arrives.

A job is claimed with a lease (``fhir_server.outbox_worker.OutboxWorker``), so a worker that
dies mid-job loses nothing and several server processes can share one PostgreSQL database.
The network I/O runs outside any transaction; each outcome is one transaction.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session

from cases import patient_match, task
from cases.patient_match import STRICT, Identity, MatchRule
from cases.second_opinion import case_of
from cases.task import Confirmation
from dicom_bridge import reasons
from dicom_bridge.dicomweb import DicomWebClient
from dicom_bridge.dimse import DimseClient, Peer
from dicom_bridge.errors import PacsError, PacsUnavailable, RetrieveFailed
from dicom_bridge.image_store import ImageStore
from dicom_bridge.query import StudyQuery, missing
from fhir_server import dates, outbox
from fhir_server.executor import Executor
from fhir_server.outbox import Backoff
from fhir_server.outbox_worker import Job, OutboxWorker
from fhir_server.repository import Hook, Repository, Stored
from mappings.imaging_study import Study, imaging_study

log = logging.getLogger(__name__)

ACSN = "ACSN"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
PEER_SYSTEM = "https://overread.org/fhir/pacs-peer"
CONNECTION_TYPE = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
# R4 has no connection type for DIMSE; the binding is extensible, so a code of our own.
DIMSE_CONNECTION = {"system": "https://overread.org/fhir/CodeSystem/endpoint-connection-type", "code": "dicom-dimse"}


class PeerConfig(Protocol):
    """A PACS peer of OVERREAD_CONFIG (``overread.config.PacsPeer`` has this shape)."""

    name: str
    ae_title: str
    host: str
    port: int
    qido_url: str | None
    retrieve: Literal["c-move", "c-get", "wado-rs", "none"]
    timezone: str | None

    def ssl_context(self) -> ssl.SSLContext | None:
        """DICOM TLS to this PACS (PS3.15 B.9; docs/security.md); None: plain TCP."""


#: A PACS that is down for the night or a study not there yet: 30 s doubling to 1 h, 10 times.
DEFAULT_BACKOFF = Backoff()


class Source:
    """One place studies can be found: a PACS peer (DIMSE or DICOMweb), or the image store."""

    def __init__(
        self,
        name: str,
        store: ImageStore,
        peer: PeerConfig | None = None,
        our_ae: str = "",
        timeout: float = 30.0,
        rule: MatchRule = STRICT,
    ) -> None:
        self.name, self.store, self.peer, self.our_ae, self.rule = name, store, peer, our_ae, rule
        self.endpoint: str | None = None  # "Endpoint/<id>", once written
        dimse = Peer(peer.ae_title, peer.host, peer.port, peer.ssl_context()) if peer else None
        self.dimse = DimseClient(dimse, our_ae, timeout=timeout) if dimse else None
        self.web = DicomWebClient(peer.qido_url, timeout=timeout) if peer and peer.qido_url else None

    def find(self, query: StudyQuery) -> list[Study]:
        """The studies matching ``query``, each answered whole (asked twice if not), else PacsError."""
        for _ in range(2):
            studies = self._find(query)
            gaps = [gap for study in studies if (gap := missing(study))]
            if not gaps:
                return studies
            log.warning("PACS %s answered an incomplete study: %s", self.name, gaps[0])
        raise PacsError(f"incomplete answer: {gaps[0]}")

    def _find(self, query: StudyQuery) -> list[Study]:
        """QIDO-RS when the peer has a qido_url, C-FIND when it has not or DICOMweb is down."""
        if self.web is not None:
            try:
                return self.web.find(query)
            except PacsUnavailable:
                log.warning("PACS %s: QIDO-RS unavailable, trying C-FIND", self.name)
        return self.dimse.find(query) if self.dimse is not None else self.store.find(query)

    def close(self) -> None:
        """Close the DICOMweb client's connection pool (DIMSE opens an association per call)."""
        if self.web is not None:
            self.web.close()

    @property
    def label(self) -> str:
        """How a reason names this source: ``PACS "main"`` or ``the image store``."""
        return reasons.source(self.name, self.peer is not None)

    def identity(self, study: Study) -> Identity:
        """The study's patient as this source's issuer mapping reads it."""
        return patient_match.of_dicom(study.dataset, self.rule.issuers)

    @property
    def retrieves(self) -> bool:
        return self.peer is not None and self.peer.retrieve != "none"

    def retrieve(self, study: Study) -> None:
        """Bring the study into the image store; RetrieveFailed unless every instance arrived."""
        if self.peer is None or self.dimse is None:
            return
        match self.peer.retrieve:
            case "c-move":
                self.dimse.move(study.uid, self.our_ae)
            case "c-get":
                sop_classes = {str(i.SOPClassUID) for s in study.series for i in s.instances if "SOPClassUID" in i}
                self.dimse.get(study.uid, self.store, sop_classes)
            case "wado-rs":
                if self.web is None:
                    raise RetrieveFailed(f"{self.name}: retrieve is wado-rs but the peer has no qido_url")
                self.web.retrieve(study.uid, self.store)
            case _:
                return
        expected = sum(len(s.instances) for s in study.series)
        if (have := self.store.count(study.uid)) < expected:
            raise RetrieveFailed(f"{self.name}: {have} of {expected} instances of {study.uid} arrived")


@dataclass(frozen=True)
class Mismatch:
    """A study found for the order whose patient is someone else's."""

    source: Source
    study: Study
    patient: Identity


@dataclass
class Found:
    """What asking every source gave: the first source with studies of the order's patient, or why none."""

    source: Source | None = None
    studies: list[Study] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # reasons of peers that did not answer
    failed: list[str] = field(default_factory=list)  # reasons of sources that answered with an error
    empty: list[str] = field(default_factory=list)  # sources that answered: no study
    peers: int = 0  # PACS peers asked

    def final_status(self) -> str:
        """The status of a job that gives up on this: mismatch, unreachable, else not found."""
        if self.mismatches:
            return task.IMAGES_MISMATCH
        return task.PACS_UNREACHABLE if self.peers and len(self.unreachable) == self.peers else task.IMAGES_NOT_FOUND


class Linker(OutboxWorker):
    """Claims ``link-imaging`` jobs and runs them (``loop``: ``run_once`` until stopped)."""

    topic = task.LINK_IMAGING

    def __init__(
        self,
        executor: Executor,
        sources: Sequence[Source],
        backoff: Backoff = DEFAULT_BACKOFF,
        hooks: Sequence[Hook] = (),
        poll: float = 1.0,
    ) -> None:
        super().__init__(executor, backoff, poll=poll)
        self.sources, self.hooks = list(sources), hooks
        self._retrieving: set[str] = set()  # studies our own retrieves are bringing in right now

    def close(self) -> None:
        """Release the sources' connections; call once ``run`` has returned."""
        for source in self.sources:
            source.close()

    def publish_endpoints(self) -> None:
        """Each PACS peer as an Endpoint resource (conditional on its name), for ImagingStudy.endpoint."""
        with self.executor.session() as session:
            repo = Repository(session, self.hooks)
            for source in self.sources:
                if source.peer is not None:
                    source.endpoint = _publish(repo, source.peer)
            repo.complete()

    def handle(self, job: Job) -> None:
        self._run(job.pk, job.resource_id, Confirmation.of(job.payload))

    def failed(self, job: Job, exc: Exception) -> None:
        """E.g. a PACS answer the mapping or validation refuses: a retry, with the reason on the case."""
        self._retry(job.pk, job.resource_id, reasons.error(exc))

    def _run(self, pk: int, order_id: str, confirmation: Confirmation | None = None) -> None:
        with self.executor.begin(write=False) as conn:
            repo = Repository(conn)
            order = repo.current("ServiceRequest", order_id)
            patient = _subject(repo, order.resource) if order and order.content else None
            linked = _linked_uids(repo, order_id)
        if order is None or order.content is None or order.resource.get("status") != "active":
            with self.executor.session() as session:  # revoked, completed or gone: nothing to link
                if outbox.pending(session, pk):
                    outbox.complete(session, pk)
            return
        query = StudyQuery(study_uid=confirmation.study_uid) if confirmation else order_query(order.resource, patient)
        if not query:
            return self._retry(pk, order_id, reasons.no_query())
        ours = patient_match.of_patient(patient, order.resource.get("subject", {}).get("reference", ""))
        # A study linked to this order before (matched, or confirmed) stays the order's.
        accepted = linked | ({confirmation.study_uid} if confirmation else set())
        found = self._find(query, ours, accepted)
        if found.source is None:
            return self._not_linked(pk, order_id, query, found, ours)
        source, studies = found.source, found.studies
        retrieve = source.retrieves
        # Audited once: a retry after a failed retrieve finds the confirmed study linked already.
        confirmed = confirmation is not None and confirmation.study_uid not in linked
        audit = _Audit(confirmation, ours, source) if confirmation and confirmed else None
        if not self._link(pk, order, studies, source, done=not retrieve, audit=audit):
            return
        if retrieve:
            try:
                self._retrieve(source, studies)
            except PacsError as exc:
                return self._retry(pk, order_id, str(exc), found=True)
            with self.executor.session() as session:
                if not outbox.pending(session, pk):
                    return
                repo = Repository(session, self.hooks)
                task.set_case_status(repo, order_id, task.IMAGES_AVAILABLE)
                outbox.complete(session, pk)
                repo.complete()

    def _find(self, query: StudyQuery, ours: Identity, accepted: set[str]) -> Found:
        """Ask each source in turn; the first with studies of the order's patient (or ``accepted``) wins."""
        found = Found(peers=sum(1 for s in self.sources if s.peer is not None))
        for source in self.sources:
            try:
                studies = source.find(query)
            except PacsUnavailable as exc:
                log.warning("PACS %s: %s", source.name, exc)
                found.unreachable.append(reasons.unreachable(source.label, str(exc)))
                continue
            except PacsError as exc:
                log.warning("PACS %s: %s", source.name, exc)
                found.failed.append(reasons.failed(source.label, str(exc)))
                continue
            theirs = [(study, source.identity(study)) for study in studies]
            if mine := [
                s for s, who in theirs if s.uid in accepted or patient_match.matches(ours, who, source.rule.mode)
            ]:
                found.source, found.studies = source, mine
                return found
            found.mismatches += [Mismatch(source, s, who) for s, who in theirs]
            if not studies:
                found.empty.append(source.label)
        return found

    def _not_linked(self, pk: int, order_id: str, query: StudyQuery, found: Found, ours: Identity) -> None:
        """No study of the order's patient: a mismatch ends the job now (a person must look), else retry."""
        mismatches = [reasons.mismatch(m.source.label, m.study.uid, m.patient, ours) for m in found.mismatches]
        # Where nothing was found matters only when nothing of another patient was found either.
        nowhere = found.empty and not found.mismatches
        empty = [reasons.not_found(found.empty, query.matching_keys())] if nowhere else []
        reason = reasons.join([*mismatches, *found.unreachable, *found.failed, *empty])
        if found.mismatches and not found.unreachable:
            return self._give_up(pk, order_id, reason, task.IMAGES_MISMATCH)
        return self._retry(pk, order_id, reason, final=found.final_status())

    def _retrieve(self, source: Source, studies: list[Study]) -> None:
        for study in studies:
            self._retrieving.add(study.uid)
            try:
                source.retrieve(study)
            finally:
                self._retrieving.discard(study.uid)

    def _link(
        self, pk: int, order: Stored, studies: list[Study], source: Source, done: bool, audit: _Audit | None = None
    ) -> bool:
        """Link ``studies`` to the order; False when the job was no longer ours to finish.

        A confirmed link (``audit``) writes its AuditEvent in the same transaction.
        """
        subject = order.resource["subject"]["reference"]
        endpoints = [source.endpoint] if source.endpoint else []
        tz = source.peer.timezone if source.peer else None
        with self.executor.session() as session:
            if not outbox.pending(session, pk):
                return False
            repo = Repository(session, self.hooks)
            for study in studies:
                based_on = [f"ServiceRequest/{order.id}"]
                stored = task.link_study(
                    repo, imaging_study(study, subject=subject, based_on=based_on, endpoints=endpoints, tz=tz)
                )
                if audit is not None and study.uid == audit.confirmation.study_uid:
                    repo.create(audit.event(order, stored, study))
            status = task.IMAGES_AVAILABLE if done else task.IMAGES_PENDING
            task.set_case_status(repo, order.id, status, None if done else reasons.retrieving(source.label))
            if done:
                outbox.complete(session, pk)
            repo.complete()
        return True

    def _retry(
        self, pk: int, order_id: str, reason: str, found: bool = False, final: str = task.IMAGES_NOT_FOUND
    ) -> None:
        with self.executor.session() as session:
            if (row := outbox.pending(session, pk)) is None:
                return
            attempts = row.attempts
            # Due already: a push woke the job while it ran (``wake``), so the study may be here now.
            # Backing off would undo the wake-up and leave the case waiting up to max_delay.
            delay = timedelta(0) if row.available_at <= dates.now() else None
            again = self.retry(session, Job.of(row), reason, delay)
            status = task.IMAGES_PENDING if again else task.IMAGES_UNAVAILABLE if found else final
            repo = Repository(session, self.hooks)
            task.set_case_status(repo, order_id, status, reason)
            repo.complete()
        log.info("image linking for ServiceRequest/%s: %s (attempt %s)", order_id, reason, attempts)

    def _give_up(self, pk: int, order_id: str, reason: str, status: str) -> None:
        """End the job now with a final status: retrying cannot change what it found."""
        with self.executor.session() as session:
            if outbox.pending(session, pk) is None:
                return
            outbox.fail(session, pk, reason)
            repo = Repository(session, self.hooks)
            task.set_case_status(repo, order_id, status, reason)
            repo.complete()
        log.warning("image linking for ServiceRequest/%s: %s", order_id, reason)

    def wake(self, studies: set[tuple[str, str]]) -> None:
        """A study arrived by itself (C-STORE push): run the jobs of the cases waiting for it now."""
        with self.executor.session() as session:
            repo = Repository(session, self.hooks)
            for study_uid, accession in studies:
                if study_uid in self._retrieving:
                    continue  # our own retrieve: its job is running
                for order in _orders_for(repo, study_uid, accession):
                    _wake(session, repo, order)
            repo.complete()
        self.loop.wake()


@dataclass(frozen=True)
class _Audit:
    """What the AuditEvent of a confirmed link needs besides the order and the stored study."""

    confirmation: Confirmation
    order_patient: Identity
    source: Source

    def event(self, order: Stored, stored: Stored, study: Study) -> dict[str, Any]:
        patient = reasons.identity(self.source.identity(study))
        return task.confirmed_link_audit(
            order, stored, self.confirmation, reasons.identity(self.order_patient), patient
        )


def _linked_uids(repo: Repository, order_id: str) -> set[str]:
    """Study Instance UIDs of the ImagingStudies already based on the order."""
    studies = repo.referring("ImagingStudy", "basedon", f"ServiceRequest/{order_id}")
    return {
        str(i.get("value", "")).removeprefix("urn:oid:")
        for s in studies
        for i in s.resource.get("identifier", [])
        if i.get("system") == "urn:dicom:uid"
    }


def order_query(order: dict[str, Any], patient: dict[str, Any] | None) -> StudyQuery:
    """The PACS query of an order: accession (ACSN), Study Instance UID, patient id + date + modality."""
    identifiers = order.get("identifier", [])
    accession = next((i.get("value", "") for i in identifiers if _typed(i, ACSN)), "")
    study_uid = next((i.get("value", "") for i in identifiers if i.get("system") == "urn:dicom:uid"), "")
    patient_ids = (patient or {}).get("identifier", [])
    patient_id = next((i.get("value", "") for i in patient_ids if _typed(i, "MR")), "") or next(
        (i.get("value", "") for i in patient_ids), ""
    )
    when = str(order.get("occurrenceDateTime") or order.get("occurrencePeriod", {}).get("start") or "")
    # the procedure code, else a modality the order sent apart (IPC-5 → orderDetail)
    concepts = [order.get("code", {}), *order.get("orderDetail", [])]
    codings = [c for concept in concepts for c in concept.get("coding", [])]
    modality = next((c.get("code", "") for c in codings if c.get("system") == DCM), "")
    return StudyQuery(
        accession=accession,
        study_uid=study_uid.removeprefix("urn:oid:"),
        patient_id=patient_id,
        study_date=when[:10].replace("-", ""),
        modality=modality,
    )


def _typed(identifier: dict[str, Any], code: str) -> bool:
    return any(c.get("code") == code for c in identifier.get("type", {}).get("coding", []))


def _subject(repo: Repository, order: dict[str, Any]) -> dict[str, Any] | None:
    rtype, _, rid = str(order.get("subject", {}).get("reference", "")).partition("/")
    found = repo.current(rtype, rid) if rtype == "Patient" and rid else None
    return found.resource if found and found.content else None


def _publish(repo: Repository, peer: PeerConfig) -> str:
    endpoint: dict[str, Any] = {
        "resourceType": "Endpoint",
        "identifier": [{"system": PEER_SYSTEM, "value": peer.name}],
        "status": "active",
        "name": f"PACS {peer.name} ({peer.ae_title})",
        "payloadType": [{"text": "DICOM"}],
        "payloadMimeType": ["application/dicom"],
    }
    if peer.qido_url:
        endpoint |= {"connectionType": {"system": CONNECTION_TYPE, "code": "dicom-qido-rs"}, "address": peer.qido_url}
    else:
        endpoint |= {"connectionType": DIMSE_CONNECTION, "address": f"dicom://{peer.ae_title}@{peer.host}:{peer.port}"}
    repo.lock(f"Endpoint|{peer.name}")
    found = repo.search("Endpoint", [("identifier", f"{PEER_SYSTEM}|{peer.name}")])
    if not found:
        return f"Endpoint/{repo.create(endpoint).id}"
    repo.update_if_changed(found[0], endpoint)
    return f"Endpoint/{found[0].id}"


def _orders_for(repo: Repository, study_uid: str, accession: str) -> list[Stored]:
    criteria = [f"urn:dicom:uid|urn:oid:{study_uid}"] + ([accession] if accession else [])
    found: dict[str, Stored] = {}
    for value in criteria:
        for order in repo.search("ServiceRequest", [("identifier", value)]):
            if order.resource.get("status") == "active":
                found[order.id] = order
    return list(found.values())


def _wake(session: Session, repo: Repository, order: Stored) -> None:
    if _linked(repo, order.id):
        return
    woken = outbox.wake(session, task.LINK_IMAGING, order.id)
    # The UPDATE may have waited for the order's own job to commit (PostgreSQL): its row is done then,
    # and the case linked, which a read now sees. Only a case still waiting needs a new job.
    if not woken and not _linked(repo, order.id):
        repo.enqueue(task.LINK_IMAGING, order)


def _linked(repo: Repository, order_id: str) -> bool:
    """The case has its images, or is past needing them (reported)."""
    case = case_of(repo, order_id)
    return case is not None and bool(task.case_status(case.resource) & {task.IMAGES_AVAILABLE, *task.AFTER_REPORT})
