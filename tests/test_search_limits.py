"""Search limits (docs/reliability.md, "Search and the index"): what one query string may ask.

Each input whose cost grows with it is refused with a 400 OperationOutcome naming the limit
before the work is done; a search past its time is stopped in the database and answered 503.
"""

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from fhir_server import search_limits
from fhir_server.db import Database
from fhir_server.search_limits import SearchLimits
from overread.app import create_app
from overread.settings import Settings
from tests.builders import patient
from tests.conftest import FHIR_JSON
from tests.search_data import assert_outcome


@pytest.fixture
def limited(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``limited(**limits)``: a client of an application started with those search limits."""
    monkeypatch.setattr(search_limits, "_current", search_limits.limits())  # restored after the test
    clients: list[TestClient] = []

    def start(**limits: Any) -> TestClient:
        app = create_app(Settings(database_url=db.url, search=SearchLimits(**limits)), db)
        client = TestClient(app, base_url="http://testserver").__enter__()
        client.headers.update(FHIR_JSON)
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def refused(response: Any, limit: str) -> None:
    """A 400 ``too-costly`` whose diagnostics name the setting ``limit``."""
    issue = assert_outcome(response, 400)["issue"][0]
    assert issue["code"] == "too-costly" and f"{limit}=" in issue["diagnostics"], issue


# -- chains and _has ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "Task?focus.focus.focus.focus.status=x",  # the issue: 4+ levels overflowed the parser, 8 took seconds
        "Task?" + ".".join(["focus"] * 12) + ".status=x",  # 12 levels ran past 120 s and GBs
        "Patient?_has:Task:patient:_has:Task:part-of:_has:Task:part-of:_has:Task:part-of:status=x",
        "ServiceRequest?subject:Patient.organization.partof.partof.name=x",
    ],
)
def test_a_chain_or_has_past_the_depth_limit_is_400(client: TestClient, query: str) -> None:
    refused(client.get(f"/fhir/{query}"), "max_chain_depth")


def test_a_chain_within_the_depth_limit_is_searched(client: TestClient) -> None:
    created = client.post("/fhir/Patient", json=patient(family="Haugen")).json()
    ok = client.get("/fhir/Patient?_has:Task:patient:_has:Task:part-of:_has:Task:part-of:status=x")
    assert ok.status_code == 200 and ok.json()["total"] == 0
    order = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
             "code": {"text": "XR"}, "subject": {"reference": f"Patient/{created['id']}"}}  # fmt: skip
    client.post("/fhir/ServiceRequest", json=order)
    found = client.get("/fhir/ServiceRequest?subject:Patient.name=haugen")
    assert found.status_code == 200 and found.json()["total"] == 1


def test_the_depth_limit_is_a_setting(limited: Any) -> None:
    client = limited(max_chain_depth=1)
    assert client.get("/fhir/ServiceRequest?subject:Patient.name=x").status_code == 200
    refused(client.get("/fhir/ServiceRequest?subject:Patient.organization.name=x"), "max_chain_depth")


# -- AND-ed criteria and OR-ed values -----------------------------------------------------------


def test_many_and_terms_are_400_not_an_expression_tree_too_large(client: TestClient) -> None:
    # SQLite refused 1,200 AND-ed terms with a 500 ("Expression tree is too large").
    query = "&".join(f"name=n{n}" for n in range(1200))
    refused(client.get(f"/fhir/Patient?{query}"), "max_terms")


def test_many_or_values_are_400(client: TestClient) -> None:
    values = ",".join(f"MRN-{n}" for n in range(20_000))  # too long for a URL: a form _search
    form = {"content-type": "application/x-www-form-urlencoded"}
    refused(client.post("/fhir/Patient/_search", content=f"identifier={values}", headers=form), "max_values")


def test_terms_and_values_count_up_to_their_limits(limited: Any) -> None:
    client = limited(max_terms=3, max_values=4)
    assert client.get("/fhir/Patient?name=a&name=b&gender=male").status_code == 200
    refused(client.get("/fhir/Patient?name=a&name=b&gender=male&birthdate=2000"), "max_terms")
    assert client.get("/fhir/Patient?name=a,b&gender=male,female").status_code == 200
    refused(client.get("/fhir/Patient?name=a,b,c&gender=male,female"), "max_values")


def test_a_chain_counts_once_per_target_type(limited: Any) -> None:
    # Task.focus may refer to any type: the chain expands into one criterion per type with "status".
    client = limited(max_terms=5)
    refused(client.get("/fhir/Task?focus.status=x"), "max_terms")


def test_a_very_long_value_is_400(client: TestClient) -> None:
    refused(client.get("/fhir/Patient?name=" + "x" * 60_000), "max_value_length")


# -- _sort, _count, _include ----------------------------------------------------------------------


def test_too_many_sort_keys_are_400(limited: Any) -> None:
    client = limited()
    assert client.get("/fhir/Patient?_sort=name,-birthdate,gender,_id,-_lastUpdated").status_code == 200
    refused(client.get("/fhir/Patient?_sort=" + ",".join(["name"] * 200)), "max_sort_keys")
    refused(client.get("/fhir/Patient?_sort=name,gender,_id&_sort=birthdate,family,given"), "max_sort_keys")


def test_count_is_served_up_to_the_setting(limited: Any) -> None:
    client = limited(max_count=7)
    bundle = client.get("/fhir/Patient?_count=5000").json()
    assert "_count=7" in bundle["link"][0]["url"]


def test_too_many_includes_are_400(limited: Any) -> None:
    client = limited(max_includes=2)
    two = "_include=ServiceRequest:subject&_revinclude=Task:focus"
    assert client.get(f"/fhir/ServiceRequest?{two}").status_code == 200
    refused(client.get(f"/fhir/ServiceRequest?{two}&_include:iterate=*"), "max_includes")


def test_includes_cut_at_the_limit_say_so_in_an_outcome_entry(limited: Any) -> None:
    client = limited(max_included=2)
    subject = client.post("/fhir/Patient", json=patient()).json()["id"]
    order = {"resourceType": "ServiceRequest", "status": "active", "intent": "order", "code": {"text": "XR"},
             "subject": {"reference": f"Patient/{subject}"}}  # fmt: skip
    for _ in range(4):
        client.post("/fhir/ServiceRequest", json=order)
    bundle = client.get(f"/fhir/Patient?_id={subject}&_revinclude=ServiceRequest:subject").json()
    modes = [e["search"]["mode"] for e in bundle["entry"]]
    assert modes == ["match", "include", "include", "outcome"]
    issue = bundle["entry"][-1]["resource"]["issue"][0]
    assert issue["severity"] == "warning" and "max_included=2" in issue["diagnostics"]


# -- the time a search may take ----------------------------------------------------------------


def _many_names(db: Database, rows: int) -> None:
    """``rows`` name index rows of one Patient, written straight to the index: a scan of them all
    takes far longer than a millisecond on either database."""
    with db.engine.begin() as conn:
        pk = conn.execute(text("SELECT pk FROM resource WHERE type = 'Patient'")).scalar_one()
        numbers = (
            "generate_series(1, :rows) AS n"
            if db.is_postgres
            else "(WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < :rows) SELECT n FROM c)"
        )
        conn.execute(
            text(
                "INSERT INTO idx_string (resource_pk, res_type, param, value, norm) "
                f"SELECT :pk, 'Patient', 'name', 'name' || n, 'name' || n FROM {numbers}"
            ),
            {"pk": pk, "rows": rows},
        )


@pytest.mark.parametrize("page", ["", "&_count=500"])  # on SQLite: on the event loop, on a reader thread
def test_a_search_past_its_time_is_stopped_and_answered_503(limited: Any, db: Database, page: str) -> None:
    client = limited(timeout=0.001)
    created = client.post("/fhir/Patient", json=patient()).json()["id"]
    _many_names(db, 200_000)
    slow = client.get(f"/fhir/Patient?name:contains=nobody{page}")
    issue = assert_outcome(slow, 503)["issue"][0]
    assert issue["code"] == "too-costly" and "timeout=0.001" in issue["diagnostics"]
    assert client.get(f"/fhir/Patient/{created}").status_code == 200  # the server goes on answering


def test_the_same_search_within_its_time_is_answered(limited: Any, db: Database) -> None:
    client = limited()
    assert client.post("/fhir/Patient", json=patient()).status_code == 201
    _many_names(db, 200_000)
    found = client.get("/fhir/Patient?name:contains=nobody&_count=500")
    assert found.status_code == 200 and found.json()["total"] == 0


def test_limits_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OVERREAD_SEARCH__TIMEOUT", "2.5")
    monkeypatch.setenv("OVERREAD_SEARCH__MAX_CHAIN_DEPTH", "2")
    chosen = Settings().search
    assert chosen.timeout == 2.5 and chosen.max_chain_depth == 2 and chosen.max_terms == SearchLimits().max_terms
