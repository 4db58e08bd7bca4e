"""Logs leave PHI out by default (docs/reliability.md#http-and-fhir): no query strings in the access
log, no bound parameters in SQL errors; ``OVERREAD_LOG_SENSITIVE`` shows them for debugging."""

import logging

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from fhir_server.db import Database
from overread.app import create_app
from overread.server import running
from overread.settings import Settings

SEARCH = "/fhir/Patient?name=Haugen&birthdate=1961-04-17"


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def searched(db: Database, log_sensitive: bool = False) -> list[str]:
    """The access log lines of a search, at INFO (``running`` starts uvicorn at WARNING)."""
    config = Settings(database_url=db.url, log_sensitive=log_sensitive)
    with running(create_app(config, db), settings=config) as root:
        logger, lines = logging.getLogger("uvicorn.access"), Lines()
        level = logger.level
        logger.addHandler(lines)  # after uvicorn's logging configuration, which replaces handlers
        logger.setLevel(logging.INFO)
        try:
            with httpx.Client(base_url=root) as client:
                assert client.get(SEARCH).status_code == 200
        finally:
            logger.removeHandler(lines)
            logger.setLevel(level)
    return [line for line in lines.lines if "/fhir/Patient" in line]


def test_the_access_log_leaves_out_query_strings(sqlite_db):
    lines = searched(sqlite_db)
    assert lines and all("Haugen" not in line and "1961" not in line for line in lines), lines


def test_the_access_log_shows_query_strings_when_asked(sqlite_db):
    lines = searched(sqlite_db, log_sensitive=True)
    assert any("name=Haugen" in line for line in lines), lines


def failing_statement(db: Database) -> str:
    with db.engine.connect() as conn, pytest.raises(DBAPIError) as failed:
        conn.execute(text("SELECT no_such_column FROM resource WHERE id = :id"), {"id": "Haugen-1961-04-17"})
    return str(failed.value)


def test_sql_errors_leave_out_bound_parameters(db):
    message = failing_statement(db)
    assert "no_such_column" in message and "Haugen" not in message, message


def test_sql_errors_show_bound_parameters_when_asked(database_url):
    db = Database(database_url, hide_parameters=False)
    try:
        assert "Haugen-1961-04-17" in failing_statement(db)
    finally:
        db.dispose()
