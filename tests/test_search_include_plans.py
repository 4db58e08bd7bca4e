"""``_include`` and ``_revinclude`` look their resources up by index on SQLite (docs/reliability.md).

A forward include was a correlated EXISTS: SQLite scanned every resource and tested each
(0.7-0.9 s at 30k resources). The plans of the statements a real search runs are checked here.
"""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from fhir_server.db import Database
from overread.app import create_app
from overread.settings import Settings
from tests.builders import patient
from tests.conftest import FHIR_JSON


@pytest.fixture
def client(sqlite_db: Database) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=sqlite_db.url), sqlite_db), base_url="http://testserver") as c:
        c.headers.update(FHIR_JSON)
        yield c


def plans_of_includes(db: Database, client: TestClient, query: str) -> list[str]:
    """The query plan of each statement ``query`` runs to fetch included resources."""
    statements: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.lstrip().startswith("SELECT") and "idx_reference" in statement:
            statements.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        response = client.get(f"/fhir/{query}")
    finally:
        event.remove(db.engine, "before_cursor_execute", record)
    assert response.status_code == 200 and any(e["search"]["mode"] == "include" for e in response.json()["entry"])
    assert statements
    with db.engine.connect() as conn:
        return [
            " / ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
            for sql, params in statements
        ]


@pytest.mark.parametrize(
    "query",
    [
        "ServiceRequest?_include=ServiceRequest:subject",
        "ServiceRequest?_include=ServiceRequest:subject:Patient",
        "ServiceRequest?_include=*",
        "Patient?_revinclude=ServiceRequest:subject",
    ],
)
def test_includes_use_indexes_not_a_scan_of_the_resources(sqlite_db: Database, client: TestClient, query: str) -> None:
    subject = client.post("/fhir/Patient", json=patient()).json()["id"]
    for n in range(30):  # resources an include must not walk through
        client.post("/fhir/Patient", json=patient(mrn=f"MRN-{n}"))
    order = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": {"text": "XR"},
             "subject": {"reference": f"Patient/{subject}"}}  # fmt: skip
    assert client.post("/fhir/ServiceRequest", json=order).status_code == 201
    for plan in plans_of_includes(sqlite_db, client, query):
        assert "SCAN resource" not in plan and "USING INDEX" in plan, plan
