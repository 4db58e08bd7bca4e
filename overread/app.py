"""Start-up wiring: the FastAPI application on one database."""

from fastapi import FastAPI

from fhir_server import api
from fhir_server.db import Database
from overread.settings import Settings


def create_app(settings: Settings, db: Database | None = None) -> FastAPI:
    db = db or Database(settings.database_url)
    app = FastAPI(title="Overread", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.db = db
    api.mount(app, db, base_url=settings.public_base_url)
    return app
