"""A generated run over the whole HTTP API with access control on (issue 17, "Shown by": no 5xx, no
route that answers without a token; issue 15: never a 5xx), on SQLite and PostgreSQL.

The routes are walked from the application (``app.routes``, included routers too), so a route
added later is covered without a change here. Each request is drawn from every shape of the API:
read, vread, history at three levels, searches with chains, ``_has``, includes, modifiers and
prefixes, create, update, patch and delete of valid (tests/builders.py) and mutated resources,
batch and transaction Bundles, ``$validate`` and ``$link-imaging``, the ``/hl7`` routes and the
token endpoint with generated forms. It is sent with no token or a bad one (401 but on the open
routes, an OperationOutcome body) and with tokens of several scope shapes and of each role: no
5xx, an error body an OperationOutcome (``/fhir``), RFC 6749 JSON (the token endpoint) or the HL7
store's ``{"detail"}`` (``/hl7``).

Hypothesis directly, not schemathesis: schemathesis needs an OpenAPI schema, and the FHIR API is
one catch-all Starlette route (``/fhir/{path:path}``) whose shapes no schema describes; only the
``/hl7`` routes have one. The store is testbed/roles.py's cases, loaded once per database.
"""

import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fhir_server.db import Database
from fhir_server.smart_http import open_routes
from testbed import roles
from testbed.roles import KEY, ORG, ORGANIZATIONS, ROUTING, Case
from testbed.smart_client import TOKEN_PATH, assertion, bearer, client_entry, form, smart_app, unsigned
from tests.builders import bundle, imaging_study, patient, service_request, task
from tests.search_data import module_database
from tests.test_fhir_properties import json_values, values

pytestmark = pytest.mark.slow

GENERATED = settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TOKEN_URL = f"http://testserver{TOKEN_PATH}"
#: client_id → (role, organization id, scopes) besides testbed.roles': more scope shapes.
SHAPES = {
    "v1-all": (None, None, "system/*.* system/hl7.read system/hl7.write"),
    "v1-read": (None, None, "system/*.read"),
    "patients": (None, None, "system/Patient.rs"),
    "labs": (None, None, "system/Observation.rs?category=laboratory system/Patient.r"),
    "orders": (None, None, "system/ServiceRequest.crus system/Task.rs"),
    "hl7-operator": ("operator", None, "system/hl7.r system/hl7.u system/*.rs"),
    "ehr-a-narrow": ("ordering", "hosp-a", "system/ServiceRequest.c system/Task.rs"),
}
CLIENTS = {**roles.CLIENTS, **SHAPES}
TYPES = ["Patient", "ServiceRequest", "Task", "DiagnosticReport", "Observation", "ImagingStudy", "Coverage",
         "Organization", "AuditEvent", "Subscription", "Binary", "Bundle", "Nope"]  # fmt: skip
PARAMS = ["_id", "subject", "subject:Patient.name", "patient.name", "focus:ServiceRequest.subject.family",
          "based-on.requester.identifier", "_has:Task:focus:status",
          "_has:ServiceRequest:subject:_has:Task:focus:owner",
          "_include", "_include:iterate", "_revinclude", "_revinclude:iterate", "_elements", "_summary", "_sort",
          "_count", "_offset", "_total", "_lastUpdated", "_type", "name", "name:exact", "name:contains", "family",
          "birthdate", "identifier", "identifier:of-type", "status", "status:not", "code:text", "owner",
          "requester", "insurance", "payor", "authored", "date", "value-quantity", "category", "focus",
          "performer:missing", "_tag", "_security", "_profile", "url:below", "nope"]  # fmt: skip
INCLUDES = ["*", "Task:focus", "ServiceRequest:subject", "Observation:based-on", "Task:owner",
            "ServiceRequest:insurance", "Coverage:payor", "DiagnosticReport:subject"]  # fmt: skip
HL7_PARAMS = ["status", "limit", "offset", "control_id", "since", "until", "destination", "report", "replayed",
              "message_type", "sending_application", "placer_number", "nope"]  # fmt: skip
TOKEN_FIELDS = ["grant_type", "client_assertion_type", "client_assertion", "scope"]
MUTATED = ["id", "status", "subject", "meta", "requester", "owner", "extension", "contained", "text"]
ENTRY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", 1]
PATCH_OPS = ["add", "replace", "remove", "test", "move"]
PATCH_PATHS = ["/status", "/subject", "/name/0", "/-", ""]
JSON_PATCH = {"content-type": "application/json-patch+json"}
MERGE_PATCH = {"content-type": "application/merge-patch+json"}
SCOPES = ["system/*.rs", "system/*.cruds", "system/*.read", "system/Patient.rs", "system/hl7.r", "system/*.*",
          "patient/*.read", "openid", "system/Observation.rs?category=laboratory", "system/Nope.rs",
          "system/Task.srs", "system/Task.rs?status=x&owner=y", ""]  # fmt: skip


@dataclass(repr=False)
class Store:
    client: TestClient
    cases: list[Case]
    #: client_id → its Authorization header.
    tokens: dict[str, dict[str, str]] = field(default_factory=dict)

    def routes(self) -> list[tuple[str, str]]:
        return sorted(set(walk(self.client.app.routes)))  # type: ignore[attr-defined]

    def ids(self) -> list[str]:
        return [ref.split("/")[1] for case in self.cases for ref in roles.refs(case)]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """testbed.roles' cases on a database of each kind, served with auth on, a token for every client."""
    with module_database(request, tmp_path_factory) as db, TestClient(app(db), base_url="http://testserver") as client:
        client.headers.update({"content-type": "application/fhir+json"})
        loaded = Store(client, roles.load(client, count=4))
        loaded.tokens = {name: bearer(client, KEY, name, scope) for name, (_, _, scope) in CLIENTS.items()}
        yield loaded


def app(db: Database) -> FastAPI:
    entries = []
    for client_id, (role, org, scope) in CLIENTS.items():
        extra: dict[str, Any] = {"role": role} if role else {}
        if org:
            extra["organization"] = f"{ORG}|{ORGANIZATIONS[org]}"
        entries.append(client_entry(client_id, KEY, scope, **extra))
    return smart_app(db, entries, ROUTING, http_rate_per_second=0)  # the run's pace is not what is tested


# -- the routes --------------------------------------------------------------------------------


def walk(routes: list[Any]) -> Iterator[tuple[str, str]]:
    """(method, path template) of every route, those of included routers too."""
    for route in routes:
        if included := getattr(route, "original_router", None):
            yield from walk(included.routes)
        elif sub := getattr(route, "routes", None):
            yield from walk(sub)
        else:
            yield from ((method, route.path) for method in sorted(route.methods))


PATH_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")
OPEN = open_routes()


# -- what is sent -------------------------------------------------------------------------------


@dataclass
class Call:
    method: str
    path: str
    query: list[tuple[str, str]] = field(default_factory=list)
    body: Any = None
    #: A form body (``_search``, the token endpoint) rather than JSON.
    form: dict[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def send(self, client: TestClient, auth: dict[str, str]) -> Any:
        url = self.path + "".join(
            ("&" if n else "?") + f"{quote(k, safe=':')}={quote(v, safe='')}" for n, (k, v) in enumerate(self.query)
        )
        headers = {**self.headers, **auth}
        if self.form is not None:
            headers["content-type"] = "application/x-www-form-urlencoded"
            return client.request(self.method, url, content=urlencode(self.form), headers=headers)
        if self.body is None:
            return client.request(self.method, url, headers=headers)
        return client.request(self.method, url, json=self.body, headers=headers)


def calls(ids: list[str]) -> st.SearchStrategy[Call]:
    """Every shape of request the HTTP API takes, on ``ids`` of the store and made-up ones."""
    rtype = st.sampled_from(TYPES)
    made_up = st.text(max_size=8).map(lambda i: quote(i, safe=""))
    rid = st.one_of(st.sampled_from(ids), st.sampled_from(["missing", "..", "a" * 80, "%C2%B2", "%00"]), made_up)
    vid = st.sampled_from(["1", "2", "0", "-1", str(2**63), "x"])
    ref = st.sampled_from(ids).map(lambda i: f"Patient/{i}")
    query = st.lists(st.tuples(st.sampled_from(PARAMS), st.one_of(values, st.sampled_from(INCLUDES), ref)), max_size=4)
    valid = st.one_of(
        st.builds(patient, mrn=st.text(min_size=1, max_size=10)),
        st.builds(service_request, ref),
        st.builds(task, ref.map(lambda r: r.replace("Patient", "ServiceRequest")), ref),
        st.builds(imaging_study, ref, ref),
    )
    mutated = st.builds(lambda r, k, v: {**r, k: v}, valid, st.sampled_from(MUTATED), json_values)
    resource = st.one_of(valid, mutated, json_values)
    url = st.one_of(
        st.builds("{}/{}".format, rtype, rid), rtype, st.builds(lambda t, q: f"{t}?{urlencode(q)}", rtype, query)
    )
    request = st.fixed_dictionaries({"method": st.sampled_from(ENTRY_METHODS), "url": st.one_of(url, json_values)})
    entry = st.fixed_dictionaries(
        {"request": request}, optional={"resource": resource, "fullUrl": st.just(f"urn:uuid:{uuid.UUID(int=1)}")}
    )
    kinds = st.sampled_from(["batch", "transaction", "history", "x"])
    bundles = st.builds(lambda kind, entries: bundle(kind, *entries), kinds, st.lists(entry, max_size=4))
    operation = st.fixed_dictionaries(
        {"op": st.sampled_from(PATCH_OPS), "path": st.sampled_from(PATCH_PATHS), "value": json_values}
    )
    parameters = st.builds(lambda p: {"resourceType": "Parameters", "parameter": p}, json_values)
    return st.one_of(
        st.builds(lambda t, i: Call("GET", f"/fhir/{t}/{i}"), rtype, rid),
        st.builds(lambda t, i, v: Call("GET", f"/fhir/{t}/{i}/_history/{v}"), rtype, rid, vid),
        st.builds(lambda t, i, q: Call("GET", f"/fhir/{t}/{i}/_history", q), rtype, rid, query),
        st.builds(lambda t, q: Call("GET", f"/fhir/{t}/_history", q), rtype, query),
        st.builds(lambda q: Call("GET", "/fhir/_history", q), query),
        st.builds(lambda t, q: Call("GET", f"/fhir/{t}", q), rtype, query),
        st.builds(lambda q: Call("GET", "/fhir", q), query),
        st.builds(lambda t, q: Call("POST", f"/fhir/{t}/_search", form=dict(q)), rtype, query),
        st.builds(lambda t, r: Call("POST", f"/fhir/{t}", body=r), rtype, resource),
        st.builds(
            lambda r, q: Call("POST", f"/fhir/{r['resourceType']}", body=r, headers=if_none_exist(q)), valid, query
        ),
        st.builds(lambda t, i, r: Call("PUT", f"/fhir/{t}/{i}", body=r), rtype, rid, resource),
        st.builds(lambda t, q, r: Call("PUT", f"/fhir/{t}", q, body=r), rtype, query, resource),
        st.builds(
            lambda t, i, p: Call("PATCH", f"/fhir/{t}/{i}", body=p, headers=JSON_PATCH),
            rtype,
            rid,
            st.one_of(st.lists(operation, max_size=3), json_values),
        ),
        st.builds(
            lambda t, i, p: Call("PATCH", f"/fhir/{t}/{i}", body=p, headers=MERGE_PATCH), rtype, rid, json_values
        ),
        st.builds(lambda t, i: Call("DELETE", f"/fhir/{t}/{i}"), rtype, rid),
        st.builds(lambda t, q: Call("DELETE", f"/fhir/{t}", q), rtype, query),
        st.builds(lambda b: Call("POST", "/fhir", body=b), bundles),
        st.builds(lambda t, p: Call("POST", f"/fhir/{t}/$validate", body=p), rtype, st.one_of(parameters, resource)),
        st.builds(lambda i, p: Call("POST", f"/fhir/ServiceRequest/{i}/$link-imaging", body=p), rid, parameters),
        hl7_calls(),
        st.builds(lambda f: Call("POST", TOKEN_PATH, form=f), token_forms()),
    )


def if_none_exist(query: list[tuple[str, str]]) -> dict[str, str]:
    return {"If-None-Exist": urlencode(query)}


def hl7_calls() -> st.SearchStrategy[Call]:
    """The /hl7 routes, each with generated ids and parameters."""
    message_id = st.one_of(st.integers(min_value=-1, max_value=2**64).map(str), st.text(max_size=6))
    value = st.one_of(values, st.integers(min_value=-(2**64), max_value=2**64).map(str))
    params = st.lists(st.tuples(st.sampled_from(HL7_PARAMS), value), max_size=3)
    area = st.sampled_from(["messages", "outbound"])
    return st.one_of(
        st.builds(lambda a, q: Call("GET", f"/hl7/{a}", q), area, params),
        st.builds(lambda a, i: Call("GET", f"/hl7/{a}/{quote(i, safe='')}"), area, message_id),
        st.builds(lambda a, i: Call("POST", f"/hl7/{a}/{quote(i, safe='')}/replay"), area, message_id),
    )


def token_forms() -> st.SearchStrategy[dict[str, str]]:
    """Token requests: a good assertion or a bad one, with fields right, wrong, missing or made up."""
    client_id = st.sampled_from([*CLIENTS, "unknown", ""])
    signed = st.one_of(
        st.builds(lambda c: assertion(KEY, c, TOKEN_URL), client_id),
        st.builds(lambda c: assertion(KEY, c, "http://elsewhere/token"), client_id),
        st.builds(lambda c: assertion(KEY, c, TOKEN_URL, exp=int(time.time()) - 10), client_id),
        st.builds(lambda c: unsigned(c, TOKEN_URL, str(KEY.kid)), client_id),
        st.text(max_size=30),
    )
    fields = st.one_of(st.text(max_size=20), st.sampled_from(["client_credentials", "authorization_code"]))
    return st.builds(
        lambda good, extra, drop: {k: v for k, v in {**good, **extra}.items() if k not in drop},
        st.builds(form, signed, st.sampled_from(SCOPES)),
        st.dictionaries(st.sampled_from([*TOKEN_FIELDS, "client_id", "nope"]), fields, max_size=2),
        st.sets(st.sampled_from(TOKEN_FIELDS), max_size=1),
    )


def routed(routes: list[tuple[str, str]]) -> st.SearchStrategy[Call]:
    """A request to one of ``routes`` (method, path template), its path parameters drawn."""
    fhir_path = st.builds(lambda t, i: f"{t}/{quote(i, safe='')}", st.sampled_from(TYPES), st.text(max_size=8))
    segment = st.one_of(
        st.integers(min_value=-1, max_value=2**64).map(str),
        st.text(min_size=1, max_size=8).map(lambda i: quote(i, safe="")),
    )

    @st.composite
    def call(draw: Any) -> Call:
        method, template = draw(st.sampled_from(routes))
        return Call(method, PATH_PARAM.sub(lambda m: draw(fhir_path if m.group(1) == "path" else segment), template))

    return call()


# -- the checks ---------------------------------------------------------------------------------

RFC6749_ERRORS = {"invalid_request", "invalid_client", "invalid_grant", "unauthorized_client",
                  "unsupported_grant_type", "invalid_scope"}  # fmt: skip


def assert_answered(call: Call, response: Any) -> None:
    """No 5xx; an error body in the format of the route that answered."""
    assert response.status_code < 500, f"{call}: {response.status_code} {response.text[:500]}"
    if response.status_code < 400 or call.method == "HEAD":
        return
    body = response.json()
    if call.path == TOKEN_PATH and call.method == "POST":
        assert body["error"] in RFC6749_ERRORS and isinstance(body["error_description"], str), body
    elif call.path.startswith("/hl7") and response.status_code != 401:
        assert isinstance(body["detail"], str), body
    else:
        assert body["resourceType"] == "OperationOutcome", f"{call}: {body}"


def assert_refused(call: Call, response: Any) -> None:
    """401 with an OperationOutcome and a Bearer challenge."""
    assert response.status_code == 401, f"{call}: {response.status_code} {response.text[:300]}"
    assert response.headers["www-authenticate"].startswith("Bearer"), response.headers
    if call.method != "HEAD":
        assert response.json()["resourceType"] == "OperationOutcome", response.text[:300]


BAD_AUTH = [{}, {"Authorization": "Bearer"}, {"Authorization": "Bearer x.y.z"}, {"Authorization": "Basic YTpi"},
            {"Authorization": "bearer " + "a" * 500}]  # fmt: skip


def test_every_route_refuses_a_request_without_a_token(store: Store) -> None:
    """Each walked route, by each method, its path parameters filled: 401 but the open routes."""
    routes = store.routes()
    assert ("POST", "/hl7/messages/{message_id}/replay") in routes  # included routers walked too
    assert any(template.startswith("/fhir/{path:") for _, template in routes)
    for method, template in routes:
        path = PATH_PARAM.sub(lambda m: "Patient/1" if m.group(1) == "path" else "1", template)
        for auth in BAD_AUTH:
            call = Call(method, path)
            response = call.send(store.client, auth)
            if (method, path) in OPEN:
                assert response.status_code != 401, f"{call}: {response.text[:300]}"
                assert_answered(call, response)
            else:
                assert_refused(call, response)


@GENERATED
@given(data=st.data())
def test_no_generated_request_is_answered_without_a_token(store: Store, data: st.DataObject) -> None:
    routes = store.routes()
    call = data.draw(st.one_of(routed(routes), calls(store.ids())))
    response = call.send(store.client, data.draw(st.sampled_from(BAD_AUTH)))
    if (call.method, call.path) in OPEN:
        assert_answered(call, response)
    else:
        assert_refused(call, response)


@settings(GENERATED, max_examples=250)
@given(data=st.data())
def test_no_generated_request_with_a_token_gets_a_5xx(store: Store, data: st.DataObject) -> None:
    """Tokens of each scope shape and role; every shape of request."""
    call = data.draw(calls(store.ids()))
    response = call.send(store.client, store.tokens[data.draw(st.sampled_from(sorted(CLIENTS)))])
    event(f"{call.method} {call.path.split('/')[1]}: {response.status_code}")  # --hypothesis-show-statistics
    assert_answered(call, response)
