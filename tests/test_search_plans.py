"""Searches look up by index, on SQLite and PostgreSQL (docs/reliability.md, "Search and the index").

A forward ``_include`` was a correlated EXISTS: SQLite scanned every resource and tested each
(0.7-0.9 s at 30k resources); a string search a ``LIKE`` that read every index row of the
parameter on SQLite, and on PostgreSQL under any collation but C; ``_revinclude=*`` the reference
index whole. The plans of the statements a real search runs are checked here.
"""

import hashlib
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, Select, event, insert, select

from fhir_server import conditional, search
from fhir_server.db import Database
from fhir_server.repository import Repository
from fhir_server.schema import ReferenceIndex, ResourceRow, StringIndex, TokenIndex, UriIndex
from tests.builders import patient
from tests.search_data import module_client

#: Resources of each type in a loaded store: enough for PostgreSQL's statistics to favour lookups.
ROWS = 3000


def family(n: int) -> str:
    """A family name of the loaded store: as varied as real ones, which share few trigrams."""
    return hashlib.sha256(str(n).encode()).hexdigest()[:12]


def load(db: Database, rows: int = ROWS) -> None:
    """Patients and ServiceRequests (``ServiceRequest/{n}`` for ``Patient/{n}``) written straight into
    the tables with the index rows the plans below read; on PostgreSQL then VACUUM ANALYZEd: it plans
    by its statistics, and reads an empty table whole, index or not. SQLite stays without statistics,
    as nothing runs ANALYZE on it in use."""
    now = datetime(2024, 1, 1)
    with db.engine.begin() as conn:
        for rtype in ("Patient", "ServiceRequest"):
            conn.execute(
                insert(ResourceRow),
                [
                    {"type": rtype, "id": str(n), "version": 1, "last_updated": now, "deleted": False,
                     "content": f'{{"resourceType":"{rtype}","id":"{n}"}}'}
                    for n in range(rows)
                ],
            )  # fmt: skip
        pk = {(t, i): k for k, t, i in conn.execute(select(ResourceRow.pk, ResourceRow.type, ResourceRow.id))}
        index: list[tuple[Any, str, str, dict[str, Any]]] = []
        for n in range(rows):
            index += [
                (TokenIndex, "Patient", "identifier", {"system": "urn:x", "code": f"V{n}"}),
                (StringIndex, "Patient", "family", {"value": family(n).title(), "norm": family(n)}),
                (StringIndex, "Patient", "name", {"value": family(n).title(), "norm": family(n)}),
                (UriIndex, "ServiceRequest", "instantiates-uri", {"value": f"https://x.example/{n}/a"}),
                (ReferenceIndex, "ServiceRequest", "subject", {"target_type": "Patient", "target_id": str(n)}),
            ]
        for table in {row[0] for row in index}:
            values = [
                {"resource_pk": pk[rtype, str(n // 5)], "res_type": rtype, "param": param, **v}
                for n, (t, rtype, param, v) in enumerate(index)
                if t is table
            ]
            conn.execute(insert(table), values)
    if db.is_postgres:  # as autovacuum would: statistics, and the GIN index's pending rows merged
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def loaded_client(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A client on a store ``load``ed once per module and database: the tests that take it only read."""
    clients = module_client(request, tmp_path_factory, list)
    client = next(clients)
    load(client.app.state.db)  # type: ignore[attr-defined]
    yield client
    next(clients, None)


@pytest.fixture
def loaded(loaded_client: TestClient) -> Database:
    """The database of ``loaded_client``."""
    db: Database = loaded_client.app.state.db  # type: ignore[attr-defined]
    return db


def plan_of(db: Database, sql: str, parameters: Any = None) -> str:
    """The query plan of ``sql`` (with its driver's ``parameters``) on either database, its lines joined by " / ".

    On PostgreSQL, with sequential scans off: at a few thousand rows it rightly prefers reading a
    table whole, and only past the cost of every index would it still scan one.
    """
    with db.engine.connect() as conn:
        if db.is_postgres:
            conn.exec_driver_sql("SET enable_seqscan = off")
            return " / ".join(row[0].strip() for row in conn.exec_driver_sql(f"EXPLAIN {sql}", parameters))
        return " / ".join(row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", parameters))


def plan_of_statement(db: Database, stmt: Any) -> str:
    with db.engine.connect() as conn:
        return plan_of(db, str(stmt.compile(conn, compile_kwargs={"literal_binds": True})))


def plan_of_search(db: Database, resource_type: str, params: list[tuple[str, str]]) -> str:
    return plan_of_statement(db, search.statement(search.parse(resource_type, params)))


def plans_of_includes(db: Database, client: TestClient, query: str) -> list[str]:
    """The query plan of each statement ``query`` runs to fetch included resources."""
    statements: list[Any] = []

    def record(_conn: Any, clause: Any, *_: Any) -> None:
        if isinstance(clause, Select) and "idx_reference" in str(clause):
            statements.append(clause)

    # On any engine: PostgreSQL searches run on the asyncpg engine of the application.
    event.listen(Engine, "before_execute", record)
    try:
        response = client.get(f"/fhir/{query}")
    finally:
        event.remove(Engine, "before_execute", record)
    assert response.status_code == 200 and any(e["search"]["mode"] == "include" for e in response.json()["entry"])
    assert statements
    return [plan_of_statement(db, stmt) for stmt in statements]


@pytest.mark.parametrize(
    "query",
    [
        "ServiceRequest?_include=ServiceRequest:subject",
        "ServiceRequest?_include=ServiceRequest:subject:Patient",
        "ServiceRequest?_include=*",
        "Patient?_revinclude=ServiceRequest:subject",
        "Patient?_revinclude=*",
    ],
)
def test_includes_use_indexes_not_a_scan_of_the_resources(
    loaded: Database, loaded_client: TestClient, query: str
) -> None:
    for plan in plans_of_includes(loaded, loaded_client, query):
        if loaded.is_postgres:  # each index read by a condition, not whole
            assert "Seq Scan" not in plan and "Index" in plan, plan
            assert set(re.findall(r"Index (?:Only )?Scan [^/]*/ ([^:/]*)", plan)) == {"Index Cond"}, plan
        else:
            assert "SCAN resource" not in plan and "SCAN idx_reference" not in plan and "USING INDEX" in plan, plan


@pytest.mark.parametrize("value", [family(12)[:3], "o*b", "a?[b]%_\\"])
@pytest.mark.parametrize("param", ["name", "family"])
def test_a_string_search_reads_a_range_of_the_index(loaded: Database, param: str, value: str) -> None:
    plan = plan_of_search(loaded, "Patient", [(param, value)])
    if loaded.is_postgres:  # LIKE 'x%' as a range of the varchar_pattern_ops index
        assert re.search(r"Index Cond: .*\(norm\)::text ~>=~ .*\(norm\)::text ~<~", plan), plan
        assert "ix_idx_string_lookup" in plan, plan
    else:
        assert "ix_idx_string_lookup (res_type=? AND param=? AND norm>? AND norm<?)" in plan, plan


def test_a_uri_below_search_reads_a_range_of_the_index(loaded: Database) -> None:
    plan = plan_of_search(loaded, "ServiceRequest", [("instantiates-uri:below", "https://x.example/12")])
    if loaded.is_postgres:
        assert re.search(r"Index Cond: .*\(value\)::text ~>=~ .*\(value\)::text ~<~", plan), plan
    else:
        assert "ix_idx_uri_lookup (res_type=? AND param=? AND value>? AND value<?)" in plan, plan


def test_a_contains_search_reads_trigrams_or_one_parameter(loaded: Database) -> None:
    part = family(12)[2:8]
    plan = plan_of_search(loaded, "Patient", [("family:contains", part)])
    if loaded.is_postgres:  # the trigram index finds the candidates; the LIKE checks them
        trigrams = rf"Bitmap Index Scan on ix_idx_string_contains [^/]*/ Index Cond: [^/]*~~ '%{part}%'"
        assert re.search(trigrams, plan), plan
    else:  # a substring: every row of the type's parameter, and no other
        assert "SEARCH idx_string USING INDEX ix_idx_string_lookup (res_type=? AND param=?)" in plan, plan
        assert "SCAN idx_string" not in plan and "SCAN resource" not in plan, plan


def test_a_string_search_takes_wildcards_literally(client: TestClient) -> None:
    # SQLite searches by GLOB, whose *, ? and [ are wildcards; LIKE's % and _ elsewhere.
    for surname in ("O*Brien", "Oxbrien", "Ma?[tt]", "Max", "50%_off", "50xyoff"):
        assert client.post("/fhir/Patient", json=patient(family=surname)).status_code == 201
    expected = {
        "o*b": {"O*Brien"},
        "o*": {"O*Brien"},
        "ma?[t": {"Ma?[tt]"},
        "50%_": {"50%_off"},
        "o": {"O*Brien", "Oxbrien"},
    }
    for value, families in expected.items():
        bundle = client.get("/fhir/Patient", params={"name": value}).json()
        assert {e["resource"]["name"][0]["family"] for e in bundle.get("entry", [])} == families, value


@pytest.mark.parametrize(
    ("resource_type", "params"),
    [
        ("Patient", [("identifier", f"urn:x|{'V' * 300}")]),  # the key looked up, the rest compared
        ("Patient", [("identifier", "V" * 300)]),
        ("Patient", [("family:exact", "Ab" * 200)]),  # by the norm key it implies
        ("Patient", [("family", "ab" * 200)]),  # starts with, past the key
        ("ServiceRequest", [("instantiates-uri", "https://x.example/" + "v" * 600)]),
        ("ServiceRequest", [("instantiates-uri:below", "https://x.example/" + "v" * 600)]),
        ("ServiceRequest", [("instantiates-uri:above", "https://x.example/" + "v" * 600 + "/a/b")]),
    ],
)
def test_a_lookup_of_a_value_past_the_key_reads_the_index(
    loaded: Database, resource_type: str, params: list[tuple[str, str]]
) -> None:
    plan = plan_of_search(loaded, resource_type, params)
    if loaded.is_postgres:
        lookup = r"Index Scan using ix_idx_\w+_lookup on idx_\w+ [^/]*/ Index Cond: [^/]*\(param\)[^)]*\) AND"
        assert re.search(lookup, plan), plan[:2000]
        return
    assert re.search(r"USING INDEX ix_idx_\w+_lookup \(res_type=\? AND param=\? AND \w+=\?", plan), plan
    assert "SCAN idx_" not in plan and "SCAN resource" not in plan, plan


def test_a_conditional_create_on_a_long_identifier_reads_the_index(sqlite_db: Database) -> None:
    """The lookup a conditional create on one identifier runs, its code longer than the index column."""
    ran: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if "idx_token" in statement:
            ran.append((statement, parameters))

    event.listen(Engine, "before_cursor_execute", record)
    try:
        with sqlite_db.begin() as conn:
            assert conditional.matches(Repository(conn), "Patient", f"identifier=urn:x|{'V' * 300}") == []
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    [(sql, parameters)] = ran
    plan = plan_of(sqlite_db, sql, parameters)
    assert "ix_idx_token_lookup (res_type=? AND param=? AND code=? AND system=?)" in plan, plan
