"""Schema migrations (Alembic) of the whole deployment, run from code: ``overread db upgrade``
and server start-up. The app package owns them because it alone knows every package's tables."""

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

import fhir_server.channel_headers
import fhir_server.smart_store  # noqa: F401
import hl7_bridge.outbound  # their tables join the FHIR store's metadata
import hl7_bridge.store  # noqa: F401
from fhir_server.schema import Base

MIGRATIONS = Path(__file__).parent / "migrations"
#: Every table the migrations create, for autogenerate and the test that they match the models.
METADATA = Base.metadata


def alembic_config(url: str = "") -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        command.upgrade(config, revision)
