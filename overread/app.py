"""Start-up wiring: the FastAPI application, the MLLP listener, the DICOM side, on one database."""

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import uvicorn
from fastapi import FastAPI

from dicom_bridge.image_store import ImageStore
from dicom_bridge.linking import Backoff, Linker, Source
from dicom_bridge.storage_scp import StorageScp
from fhir_server import api
from fhir_server.cases import open_case
from fhir_server.db import Database
from hl7_bridge.api import messages_router
from hl7_bridge.intake import receive
from hl7_bridge.mllp import MllpServer
from overread import config
from overread.config import OverreadConfig
from overread.settings import Settings

log = logging.getLogger(__name__)
#: The repository hooks of every door (HTTP, HL7): the domain rules of a write.
HOOKS = (open_case,)


def create_app(settings: Settings, db: Database | None = None, cfg: OverreadConfig | None = None) -> FastAPI:
    """The web application: the FHIR API and the HL7 message store's endpoints.

    ``cfg`` is the parsed OVERREAD_CONFIG; read from ``settings.config`` when not given.
    """
    db = db or Database(settings.database_url)
    cfg = cfg or config.load(settings.config)
    app = FastAPI(title="Overread", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.db = db
    api.mount(app, db, HOOKS, base_url=settings.public_base_url)
    app.include_router(messages_router(db, cfg.sender, HOOKS))
    return app


def mllp_listener(settings: Settings, db: Database, cfg: OverreadConfig | None = None) -> MllpServer:
    """HL7 v2 order intake on OVERREAD_MLLP_HOST:OVERREAD_MLLP_PORT (storage runs off the event loop)."""
    senders = (cfg or config.load(settings.config)).sender

    async def handler(message: bytes) -> bytes:
        return await asyncio.get_running_loop().run_in_executor(None, receive, db, message, senders, HOOKS)

    return MllpServer(handler, settings.mllp_host, settings.mllp_port)


def linker(settings: Settings, db: Database, cfg: OverreadConfig) -> Linker:
    """The image-linking worker: the PACS peers of OVERREAD_CONFIG in order, then our image store."""
    store = ImageStore(settings.image_store)
    timeout = cfg.linking.timeout_seconds
    peers = [Source(p.name, store, p, settings.dicom_ae_title, timeout) for p in cfg.pacs]
    backoff = Backoff(
        cfg.linking.max_attempts,
        timedelta(seconds=cfg.linking.first_retry_seconds),
        timedelta(seconds=cfg.linking.max_retry_seconds),
    )
    return Linker(db, [*peers, Source("image store", store)], backoff, HOOKS)


@contextmanager
def imaging(settings: Settings, db: Database, cfg: OverreadConfig) -> Iterator[tuple[Linker, StorageScp]]:
    """The DICOM side running: our Storage SCP, and the linking worker on a thread of its own."""
    worker = linker(settings, db, cfg)
    worker.publish_endpoints()
    stop = threading.Event()
    scp = StorageScp(
        settings.dicom_ae_title, settings.dicom_host, settings.dicom_port, ImageStore(settings.image_store), worker.wake
    )
    thread = threading.Thread(target=worker.run, args=(stop,), name="image-linking", daemon=True)
    with scp:
        thread.start()
        try:
            yield worker, scp
        finally:
            stop.set()
            thread.join(timeout=60)


async def serve_all(settings: Settings, db: Database, cfg: OverreadConfig) -> None:
    """Every listener and worker of ``overread serve`` in one process, until interrupted."""
    app = create_app(settings, db, cfg)
    http = uvicorn.Server(uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="info"))
    with imaging(settings, db, cfg) as (_, scp):
        log.warning("DICOM Storage SCP %s on %s:%s", settings.dicom_ae_title, settings.dicom_host, scp.port)
        async with mllp_listener(settings, db, cfg) as mllp:
            log.warning("HL7 MLLP listener on %s:%s", settings.mllp_host, mllp.port)
            await http.serve()
