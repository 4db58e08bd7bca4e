"""The audit log over HTTP, on SQLite and PostgreSQL: one BALP AuditEvent per FHIR interaction and
token request, refusals and failures included; a write's in its own transaction; AuditEvents
searchable by the operator and by a client allowed to read them, written by nobody through the API."""

import base64
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from fhir_server import balp
from fhir_server.audit_log import AuditLog
from fhir_server.db import Database
from fhir_server.schema import ResourceRow
from fhir_server.validation import validate
from testbed import smart_client
from testbed.smart_client import TOKEN_PATH, assertion, client_entry, es384, form, smart_app
from tests.builders import patient, post

KEY = es384()
CLIENTS = {
    "admin": ("system/*.cruds", None),
    "patients": ("system/Patient.rs", None),
    "ops": ("system/hl7.r", "operator"),
}
Bearer = Callable[[str], dict[str, str]]
FORM = {"content-type": "application/x-www-form-urlencoded"}


def events(db: Database) -> list[dict[str, Any]]:
    """Every AuditEvent stored, oldest first, read from the database (a search would be audited too);
    each a valid R4 AuditEvent (the server writes them unvalidated: ``Repository.create_own``)."""
    with db.begin(write=False) as conn:
        rows = conn.execute(
            select(ResourceRow.content).where(ResourceRow.type == "AuditEvent").order_by(ResourceRow.pk)
        )
        found = [orjson.loads(content or "{}") for (content,) in rows]
    for event in found:
        validate(event)
    return found


@contextmanager
def make_client(db: Database, **settings: Any) -> Iterator[TestClient]:
    entries = [
        client_entry(name, KEY, scope, **({"role": role} if role else {})) for name, (scope, role) in CLIENTS.items()
    ]
    app = smart_app(db, entries, **settings)
    with TestClient(app, base_url="http://testserver") as c:
        c.headers.update({"content-type": "application/fhir+json"})
        yield c


@pytest.fixture
def client(db: Database) -> Iterator[TestClient]:
    with make_client(db) as c:
        yield c


def token(client: TestClient, client_id: str) -> dict[str, str]:
    return smart_client.bearer(client, KEY, client_id, CLIENTS[client_id][0])


@pytest.fixture
def bearer(client: TestClient) -> Bearer:
    return lambda client_id: token(client, client_id)


class Trail:
    """The AuditEvents a step adds: ``after(step)`` runs it, writes the queue out and returns them."""

    def __init__(self, client: TestClient, db: Database) -> None:
        self.client, self.db = client, db
        self.log: AuditLog = client.app.state.audit  # type: ignore[attr-defined]

    def after(self, step: Callable[[], Any]) -> list[dict[str, Any]]:
        self.log.flush()
        before = len(events(self.db))
        step()
        self.log.flush()
        return events(self.db)[before:]

    def one(self, step: Callable[[], Any]) -> dict[str, Any]:
        (event,) = self.after(step)
        return event


@pytest.fixture
def trail(client: TestClient, db: Database) -> Trail:
    return Trail(client, db)


def subtype(event: dict[str, Any]) -> str | None:
    codes = [c["code"] for c in event.get("subtype", [])]
    return codes[0] if codes else None


def client_agent(event: dict[str, Any]) -> dict[str, Any]:
    (agent,) = [a for a in event["agent"] if a["requestor"]]
    return agent


def references(event: dict[str, Any], role: str) -> list[str]:
    return [e["what"]["reference"] for e in event.get("entity", []) if e.get("role", {}).get("code") == role]


def test_each_interaction_leaves_one_audit_event_of_its_kind(client, bearer, trail):
    admin = bearer("admin")
    created = trail.one(lambda: client.post("/fhir/Patient", json=patient(), headers=admin))
    (pid,) = [r.split("/")[1] for r in references(created, "4")]
    order = {"resourceType": "ServiceRequest", "status": "active", "intent": "order",
             "code": {"text": "CT head"}, "subject": {"reference": f"Patient/{pid}"}}  # fmt: skip
    patch_type = {**admin, "content-type": "application/json-patch+json"}
    read_entry = {"request": {"method": "GET", "url": f"Patient/{pid}"}}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [read_entry]}

    def call(method: str, path: str, body: Any = None, headers: dict[str, str] = admin) -> Callable[[], Any]:
        return lambda: client.request(method, f"/fhir/{path}", json=body, headers=headers)

    steps: list[tuple[str, Callable[[], Any], str, str, list[str]]] = [
        ("read", call("GET", f"Patient/{pid}"), "read", "R", [f"Patient/{pid}/_history/1"]),
        ("vread", call("GET", f"Patient/{pid}/_history/1"), "vread", "R", []),
        ("search", call("GET", f"ServiceRequest?subject=Patient/{pid}"), "search-type", "E", []),
        ("system search", call("GET", "?_type=Patient"), "search-system", "E", []),
        ("history", call("GET", f"Patient/{pid}/_history"), "history-instance", "R", []),
        ("type history", call("GET", "Patient/_history"), "history-type", "R", []),
        ("system history", call("GET", "_history"), "history-system", "R", []),
        ("update", call("PUT", f"Patient/{pid}", {**patient(), "id": pid}),
         "update", "U", [f"Patient/{pid}/_history/2"]),
        ("patch", call("PATCH", f"Patient/{pid}", [{"op": "add", "path": "/active", "value": True}], patch_type),
         "patch", "U", [f"Patient/{pid}/_history/3"]),
        ("operation", call("POST", "Patient/$validate", patient()), "operation", "E", []),
        ("create of another type", call("POST", "ServiceRequest", order), "create", "C", []),
        ("batch", call("POST", "", batch), "batch", "E", []),
        ("delete", call("DELETE", f"Patient/{pid}"), "delete", "D", [f"Patient/{pid}/_history/4"]),
    ]  # fmt: skip
    for name, step, interaction, action, resources in steps:
        event = trail.one(step)
        assert (subtype(event), event["action"], event["outcome"]) == (interaction, action, "0"), name
        assert event["type"] == {"system": balp.AUDIT_EVENT_TYPE, "code": "rest", "display": "Restful Operation"}
        agent = client_agent(event)
        assert agent["who"]["identifier"] == {"system": balp.CLIENT_ID, "value": "admin"}, name
        assert agent["network"]["address"] == "testclient", name
        assert event["source"]["observer"] == {"display": "Overread"}
        for resource in resources:
            assert resource in references(event, "4"), name
        if name in ("read", "vread", "search", "update", "history", "create of another type"):
            assert references(event, "1") == [f"Patient/{pid}"], name  # the patient it is about
    assert created["action"] == "C" and subtype(created) == "create" and references(created, "1") == [f"Patient/{pid}"]
    opened = trail.one(call("GET", "metadata"))  # an open route: its token is not read
    assert (subtype(opened), opened["action"], opened["outcome"]) == ("capabilities", "R", "0")


def test_a_search_is_audited_with_its_query_and_not_the_resources_it_found(client, bearer, trail):
    admin = bearer("admin")
    client.post("/fhir/Patient", json=patient(), headers=admin)
    event = trail.one(lambda: client.get("/fhir/Patient?family=Haugen&_count=5", headers=admin))
    (query,) = [e for e in event["entity"] if e["role"]["code"] == "24"]
    assert base64.b64decode(query["query"]).decode() == "Patient?family=Haugen&_count=5"
    assert references(event, "4") == []


def test_a_transaction_is_audited_in_its_transaction_and_a_failed_one_leaves_no_success(client, bearer, trail, db):
    admin = bearer("admin")
    good = {"resourceType": "Bundle", "type": "transaction", "entry": [post(patient(), "urn:uuid:1")]}
    event = trail.one(lambda: client.post("/fhir", json=good, headers=admin))
    assert (subtype(event), event["outcome"]) == ("transaction", "0")
    ((rtype, _, history, version),) = [r.split("/") for r in references(event, "4")]
    assert (rtype, history, version) == ("Patient", "_history", "1")

    bad = {**good, "entry": [post(patient()), {"request": {"method": "PUT", "url": "Patient/x"}, "resource": {}}]}
    event = trail.one(lambda: client.post("/fhir", json=bad, headers=admin))
    assert (subtype(event), event["outcome"]) == ("transaction", "4") and "entry" not in event
    assert event["outcomeDesc"]


def test_an_audit_event_written_with_a_write_is_undone_with_it(client, bearer, trail, monkeypatch):
    admin = bearer("admin")
    written = AuditLog.write

    def write_then_fail(repo: Any, event: dict[str, Any]) -> None:
        written(repo, event)
        raise RuntimeError("the write's transaction fails after its AuditEvent")

    monkeypatch.setattr(AuditLog, "write", staticmethod(write_then_fail))
    (event,) = trail.after(lambda: client.post("/fhir/Patient", json=patient(), headers=admin))
    assert (subtype(event), event["outcome"]) == ("create", "8")  # the failure, not the success


def test_refusals_are_audited(client, bearer, trail):
    event = trail.one(lambda: client.get("/fhir/Patient"))
    assert (subtype(event), event["outcome"]) == ("search-type", "4")
    assert "who" not in client_agent(event) and client_agent(event)["network"]["address"] == "testclient"

    patients = bearer("patients")
    event = trail.one(lambda: client.get("/fhir/Observation", headers=patients))
    assert (subtype(event), event["outcome"], client_agent(event)["name"]) == ("search-type", "4", "patients")
    assert "scopes do not allow" in event["outcomeDesc"]

    event = trail.one(lambda: client.get("/fhir/Patient/nobody", headers=patients))
    assert (subtype(event), event["outcome"], references(event, "4")) == ("read", "4", ["Patient/nobody"])


def test_token_requests_are_audited(client, trail):
    event = trail.one(lambda: token(client, "admin"))
    assert event["type"]["code"] == "110114" and subtype(event) == "110122"
    assert (event["outcome"], client_agent(event)["name"]) == ("0", "admin")

    refused = form(assertion(KEY, "admin", "http://elsewhere/token"), "system/*.rs")
    event = trail.one(lambda: client.post(TOKEN_PATH, data=refused, headers=FORM))
    assert event["outcome"] == "4" and event["outcomeDesc"].startswith("invalid_client")


def test_audit_events_are_never_written_through_the_api(client, bearer, trail, db):
    admin = bearer("admin")
    trail.one(lambda: client.get("/fhir/metadata", headers=admin))
    (some,) = events(db)[-1:]
    aid = client.get("/fhir/AuditEvent?_count=1", headers=admin).json()["entry"][0]["resource"]["id"]
    attempts = [
        client.post("/fhir/AuditEvent", json=some, headers=admin),
        client.put(f"/fhir/AuditEvent/{aid}", json={**some, "id": aid}, headers=admin),
        client.patch(f"/fhir/AuditEvent/{aid}", json=[{"op": "remove", "path": "/entity"}],
                     headers={**admin, "content-type": "application/json-patch+json"}),
        client.delete(f"/fhir/AuditEvent/{aid}", headers=admin),
        client.delete("/fhir/AuditEvent?outcome=0", headers=admin),
        client.post("/fhir", json={"resourceType": "Bundle", "type": "transaction", "entry": [post(some)]},
                    headers=admin),
    ]  # fmt: skip
    for response in attempts:
        assert response.status_code == 405, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [post(some)]}
    answer = client.post("/fhir", json=batch, headers=admin).json()
    assert answer["entry"][0]["response"]["status"].startswith("405")
    assert client.get(f"/fhir/AuditEvent/{aid}", headers=admin).json()["meta"]["versionId"] == "1"


def test_the_operator_searches_the_audit_log_and_others_need_its_scope(client, bearer, trail):
    admin = bearer("admin")
    trail.one(lambda: client.get("/fhir/Patient", headers=admin))
    operator, patients = bearer("ops"), bearer("patients")
    found = client.get("/fhir/AuditEvent", params={"altid": "admin", "subtype": "search-type"}, headers=operator)
    assert found.status_code == 200 and found.json()["total"] == 1
    event = trail.one(lambda: client.get("/fhir/AuditEvent", headers=operator))  # audited, not copied
    assert subtype(event) == "search-type" and references(event, "4") == []
    assert client.get("/fhir/AuditEvent", headers=patients).status_code == 403
    assert client.get("/fhir/Patient", headers=operator).status_code == 403  # no clinical search by its role
    event = trail.one(lambda: client.get("/hl7/messages", headers=operator))
    assert (event["action"], event["outcome"], event["entity"][0]["name"]) == ("R", "0", "GET /hl7/messages")
    assert client_agent(event)["role"] == [{"coding": [{"system": balp.CLIENT_ROLE, "code": "operator"}]}]


def test_the_audit_log_stays_out_of_the_system_history_and_search(client, bearer, trail):
    admin = bearer("admin")
    trail.one(lambda: client.post("/fhir/Patient", json=patient(), headers=admin))
    assert {e["resource"]["resourceType"] for e in client.get("/fhir/_history", headers=admin).json()["entry"]} == {
        "Patient"
    }
    assert client.get("/fhir?_count=50", headers=admin).json()["total"] == 1
    assert client.get("/fhir?_type=AuditEvent", headers=admin).json()["total"] >= 2


def test_reads_may_go_unaudited_but_refusals_never(db):
    with make_client(db, audit_reads=False) as client:
        trail, admin = Trail(client, db), token(client, "admin")
        assert trail.after(lambda: client.get("/fhir/Patient", headers=admin)) == []
        assert len(trail.after(lambda: client.get("/fhir/Patient"))) == 1
        assert len(trail.after(lambda: client.post("/fhir/Patient", json=patient(), headers=admin))) == 1


def test_a_request_naming_a_nul_is_audited_with_the_nul_escaped(client, bearer, trail):
    """PostgreSQL refuses a NUL in text: the event of ``GET Patient/a%00`` was lost there, not written."""
    patients = bearer("patients")
    event = trail.one(lambda: client.get("/fhir/Patient/a%00", headers=patients))
    assert (subtype(event), event["outcome"], references(event, "4")) == ("read", "4", ["Patient/a\\u0000"])
    assert "\0" not in orjson.dumps(event).decode()
