"""Start-up wiring: the FastAPI application and the MLLP listener on one database."""

import asyncio
import logging

import uvicorn
from fastapi import FastAPI

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


async def serve_all(settings: Settings, db: Database, cfg: OverreadConfig) -> None:
    """Every listener of ``overread serve`` in one event loop, until interrupted."""
    app = create_app(settings, db, cfg)
    http = uvicorn.Server(uvicorn.Config(app, host=settings.http_host, port=settings.http_port, log_level="info"))
    async with mllp_listener(settings, db, cfg) as mllp:
        log.warning("HL7 MLLP listener on %s:%s", settings.mllp_host, mllp.port)
        await http.serve()
