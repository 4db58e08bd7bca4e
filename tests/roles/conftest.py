"""The roles' tests run on testbed/roles.py's store: its app (auth on, a client of each role) and its cases."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from fhir_server.db import Database
from testbed.roles import Case, app_client, load


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with app_client(db) as c:
        yield c


@pytest.fixture
def case_count() -> int:
    """How many cases ``cases`` loads; a module asks for more by overriding this."""
    return 8


@pytest.fixture
def cases(client: TestClient, case_count: int) -> list[Case]:
    return load(client, case_count)
