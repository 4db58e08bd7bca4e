"""Alembic environment: runs on the connection handed over by ``overread.migrate``."""

from alembic import context
from sqlalchemy import Connection, create_engine

from overread.migrate import METADATA

config = context.config
connection = config.attributes.get("connection")


def run(conn: Connection) -> None:
    context.configure(connection=conn, target_metadata=METADATA, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:  # `alembic` command line, e.g. to autogenerate a revision
    with create_engine(config.get_main_option("sqlalchemy.url") or "").connect() as conn:
        run(conn)
