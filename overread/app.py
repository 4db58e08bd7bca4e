"""Start-up wiring: the FastAPI application, the MLLP listener, the DICOM side, on one database."""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager
from datetime import timedelta
from functools import cache, partial
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI
from sqlalchemy import Connection

from cases import compartments, discrepancy, link_imaging, second_opinion
from cases.results import results
from cases.task import case_opener
from cases.workflow import case_workflow
from dicom_bridge import tuning
from dicom_bridge.image_store import ImageStore
from dicom_bridge.linking import Linker, Source
from dicom_bridge.storage_scp import StorageScp
from fhir_server import api, compartment, dates, operations, profiles, search_limits
from fhir_server.audit_http import AuditTrail
from fhir_server.audit_log import AuditLog
from fhir_server.conformance_seed import publish
from fhir_server.db import Database
from fhir_server.executor import Executor, for_database
from fhir_server.notifier import Notifier
from fhir_server.outbox_worker import running
from fhir_server.rate_limit import Buckets, RateLimit
from fhir_server.repository import Hook, Repository
from fhir_server.smart import Smart
from fhir_server.smart_http import BearerAuth, area_guard, open_routes, routes
from fhir_server.subscriptions import hook
from hl7_bridge.api import messages_router, outbound_router
from hl7_bridge.audit import message_event
from hl7_bridge.delivery import Delivery
from hl7_bridge.intake import failed, last_resort, oversize, receive_in
from hl7_bridge.mllp import MllpServer, current_connection, quiet_accept_errors
from overread import config
from overread.allow import Peer, address
from overread.config import OverreadConfig
from overread.server import http_config
from overread.settings import Settings

log = logging.getLogger(__name__)


def wire_cases() -> None:
    """The second-opinion case in the generic FHIR store, for the whole process: ``$link-imaging``,
    the profile every second-opinion report must conform to, its RADPEER/discrepancy check, and the
    compartment of each client role.

    Process-wide, so explicit, never on import: whatever sets a process up to write calls it
    through ``make_hooks``, where every door and worker (and the app) gets its hooks. The
    registries keep each entry once, so calling it again changes nothing.
    """
    operations.register("ServiceRequest", "link-imaging", link_imaging.OPERATION)
    profiles.require(second_opinion.required_profiles)
    profiles.add_check(discrepancy.check)
    compartment.use(compartments.compartment)


def make_hooks(cfg: OverreadConfig) -> tuple[Hook, ...]:
    """The repository hooks of every door (HTTP, HL7, workers): the domain rules of a write, with
    the case rules wired (``wire_cases``), so no door writes with the one and without the other."""
    wire_cases()
    return (case_opener(cfg.routing_rules()), case_workflow, hook(cfg.subscriptions.egress()), results)


@cache
def default_hooks() -> tuple[Hook, ...]:
    """The hooks of the default configuration (no routing rules; due dates by priority)."""
    return make_hooks(OverreadConfig())


def create_app(
    settings: Settings,
    db: Database | None = None,
    cfg: OverreadConfig | None = None,
    audit: AuditLog | None = None,
    executor: Executor | None = None,
) -> FastAPI:
    """The web application: the FHIR API and the HL7 message store's endpoints.

    ``cfg`` is the parsed OVERREAD_CONFIG; read from ``settings.config`` when not given. Every
    request is audited into ``audit``, or a log of the app's own, written out at its shutdown.
    With ``settings.auth_mode()`` smart, every route but the open ones needs an access token
    (docs/security.md); ValueError when it is off and a listener is beyond loopback.
    """
    mode = settings.auth_mode()
    db = db or Database(settings.database_url, settings.pools, hide_parameters=not settings.log_sensitive)
    executor = executor or for_database(db)
    cfg = cfg or config.load(settings.config)
    owned = audit is None
    audit = audit or audit_log(settings, executor)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            await asyncio.to_thread(audit.close)

    app = FastAPI(title="Overread", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.db, app.state.audit = db, audit
    search_limits.configure(settings.search)
    hooks = make_hooks(cfg)  # wires $link-imaging and the role compartments the app serves too
    if rate := settings.http_rate():  # added first: inside BearerAuth, so it sees the token's client
        app.add_middleware(RateLimit, buckets=Buckets(rate))
    if mode == "smart":
        smart = Smart(executor, cfg.auth.registered(), cfg.auth.token_seconds)
        app.router.routes.extend(routes(smart, base_url=settings.public_base_url))  # before the FHIR catch-all
        app.add_middleware(BearerAuth, smart=smart, open=open_routes())
    else:
        log.warning("OVERREAD_AUTH is off: anyone who reaches a listener reads and changes every record")
    api.mount(app, executor, hooks, base_url=settings.public_base_url, limits=settings.http_limits(), audit=audit)
    app.add_middleware(AuditTrail, log=audit)  # added last, so outermost: it sees BearerAuth's 401s too
    hl7 = [Depends(area_guard("hl7"))]
    app.include_router(messages_router(executor, cfg.sender, hooks), dependencies=hl7)
    app.include_router(outbound_router(result_delivery(executor, cfg).queue), dependencies=hl7)
    # The schema describes the /hl7 API only: those who may read it, not every holder of a token.
    app.add_api_route("/openapi.json", app.openapi, include_in_schema=False, dependencies=hl7)
    return app


def audit_log(settings: Settings, executor: Executor) -> AuditLog:
    return AuditLog(executor, reads=settings.audit_reads)


def mllp_listener(
    settings: Settings, executor: Executor, cfg: OverreadConfig | None = None, audit: AuditLog | None = None
) -> MllpServer:
    """HL7 v2 order intake on OVERREAD_MLLP_HOST:OVERREAD_MLLP_PORT, each message a unit of ``executor``.

    On SQLite each message is a unit of the writer's groups, with the FHIR requests that write:
    committed together, each acknowledged after the commit. Every message is answered: one whose
    intake fails unexpectedly is stored in a transaction of its own and answered AR
    (``intake.failed``); if even that fails, the AR is built without the database
    (``intake.last_resort``). Each message is audited into ``audit``: in its own transaction, or,
    answered without the database, queued. With ``settings.mllp_tls`` it speaks TLS; with
    allow-lists in ``hl7.senders``, a message from a peer its sender may not send from is refused
    (docs/security.md).
    """
    cfg = cfg or config.load(settings.config)
    senders, hooks = cfg.sender, make_hooks(cfg)

    async def write(work: Callable[[Connection], bytes]) -> bytes:
        return await executor.run(work, write=True)

    def audited(work: Callable[[Connection], bytes], message: bytes) -> Callable[[Connection], bytes]:
        address = _peer_address()

        def run(conn: Connection) -> bytes:
            ack = work(conn)
            if audit is not None:
                audit.write(Repository(conn), message_event(message, ack, dates.now(), address))
            return ack

        return run

    def unstored(answer: Callable[..., bytes]) -> Callable[..., bytes]:
        """``answer`` (an ACK made without the database), its message audited through the queue."""

        def run(message: bytes, *args: Any) -> bytes:
            ack = answer(message, *args)
            if audit is not None:
                audit.record(partial(message_event, message, ack, dates.now(), _peer_address()))
            return ack

        return run

    async def handler(message: bytes) -> bytes:
        connection = current_connection()
        refusal = None
        if connection is not None and cfg.hl7.allow_listed:
            refusal = partial(cfg.hl7.refusal, peer=Peer.of(connection))
        try:
            intake = partial(
                receive_in,
                raw=message,
                senders=senders,
                hooks=hooks,
                max_segments=settings.mllp_max_segments,
                refusal=refusal,
            )
            return await write(audited(intake, message))
        except Exception as exc:
            log.exception("HL7 intake failed on a %d-byte message; storing it as rejected", len(message))
            return await write(audited(partial(failed, raw=message, exc=exc), message))

    return MllpServer(
        handler,
        settings.mllp_host,
        settings.mllp_port,
        on_error=unstored(last_resort),
        on_oversize=unstored(oversize),
        max_message_size=settings.mllp_max_message_size,
        idle_timeout=settings.mllp_idle_timeout,
        max_connections=settings.mllp_max_connections,
        max_connections_per_address=settings.mllp_max_connections_per_address,
        ssl=settings.mllp_tls.context(),
        ssl_handshake_timeout=settings.mllp_idle_timeout,
    )


def _peer_address() -> str | None:
    """The address of the MLLP peer whose message is being handled, as its allow-list sees it."""
    info = current_connection()
    return address(info.peername) if info is not None and info.peername else None


def image_store(settings: Settings) -> ImageStore:
    return ImageStore(settings.image_store, settings.image_store_min_free_bytes)


def linker(settings: Settings, executor: Executor, cfg: OverreadConfig) -> Linker:
    """The image-linking worker: the PACS peers of OVERREAD_CONFIG in order, then our image store."""
    store = image_store(settings)
    timeout = cfg.linking.timeout_seconds
    rule = cfg.linking.rule
    peers = [Source(p.name, store, p, settings.dicom_ae_title, timeout, rule(p)) for p in cfg.pacs]
    sources = [*peers, Source("image store", store, rule=rule())]
    return Linker(executor, sources, cfg.linking.backoff(), make_hooks(cfg))


@contextmanager
def imaging(
    settings: Settings, executor: Executor, cfg: OverreadConfig, audit: AuditLog | None = None
) -> Iterator[tuple[Linker, StorageScp]]:
    """The DICOM side running: our Storage SCP (its associations audited into ``audit``), and the
    linking worker on a thread of its own."""
    tuning.apply()  # the process serves DICOM from here on: pynetdicom and pydicom as it needs them
    worker = linker(settings, executor, cfg)
    worker.publish_endpoints()
    scp = StorageScp(
        settings.dicom_ae_title,
        settings.dicom_host,
        settings.dicom_port,
        image_store(settings),
        worker.wake,
        limits=settings.dicom_limits(),
        audit=audit.record if audit is not None else None,
        tls=settings.dicom_tls.context(),
        admits=cfg.dicom.admits if cfg.dicom.allow else None,
    )
    with scp, closing(worker), running([worker.loop]):
        yield worker, scp


@contextmanager
def notifications(executor: Executor, cfg: OverreadConfig) -> Iterator[Notifier]:
    """The Subscription worker (handshakes, rest-hook notifications) on a thread of its own."""
    s = cfg.subscriptions
    worker = Notifier(executor, make_hooks(cfg), s.backoff(), s.timeout_seconds, egress=s.egress())
    with closing(worker), running([worker.loop]):
        yield worker


def result_delivery(executor: Executor, cfg: OverreadConfig) -> Delivery:
    """The ORU^R01 workers: results of second-opinion reports to the HL7 destinations of OVERREAD_CONFIG."""
    d = cfg.hl7.delivery
    lease = timedelta(seconds=d.lease_seconds)
    return Delivery(executor, cfg.hl7.destinations, d.backoff(), make_hooks(cfg), cfg.sender, lease, d.poll_seconds)


@contextmanager
def results_out(executor: Executor, cfg: OverreadConfig) -> Iterator[Delivery]:
    """The result delivery workers (queueing, one sender per destination) on threads of their own."""
    worker = result_delivery(executor, cfg)
    with running(worker.loops):
        yield worker


@contextmanager
def workers(
    settings: Settings, executor: Executor, cfg: OverreadConfig, audit: AuditLog | None = None
) -> Iterator[StorageScp]:
    """Everything but the listeners of HTTP and MLLP: the conformance artifacts published, our
    Storage SCP, and the workers (image linking, Subscription notifications, ORU^R01 delivery)."""
    publish(executor)  # the conformance artifacts of conformance/, served over FHIR (idempotent)
    with imaging(settings, executor, cfg, audit) as (_, scp), notifications(executor, cfg), results_out(executor, cfg):
        yield scp


async def serve_all(settings: Settings, db: Database, cfg: OverreadConfig) -> None:
    """Every listener and worker of ``overread serve`` in one process, until interrupted; the audit
    log's queue written out after the last of them stopped."""
    quiet_accept_errors(asyncio.get_running_loop())  # out of descriptors: one log a minute, not a flood
    executor = for_database(db)  # one per process: every door and worker shares SQLite's writer and PostgreSQL's pools
    audit = audit_log(settings, executor)
    app = create_app(settings, db, cfg, audit, executor)
    http = uvicorn.Server(
        http_config(app, settings, host=settings.http_host, port=settings.http_port, log_level="info")
    )
    with closing(audit), workers(settings, executor, cfg, audit) as scp:
        log.warning("DICOM Storage SCP %s on %s:%s", settings.dicom_ae_title, settings.dicom_host, scp.port)
        async with executor.opened(), mllp_listener(settings, executor, cfg, audit) as mllp:
            log.warning("HL7 MLLP listener on %s:%s", settings.mllp_host, mllp.port)
            await http.serve()
