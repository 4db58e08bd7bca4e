"""The insurer's view, over HTTP with a real token on SQLite and PostgreSQL: the Task and ServiceRequest
of the cases it pays for, their status elements only, read-only.

A seeded generator makes requests over every search feature (parameters, chains, ``_has``,
includes, ``_elements``, ``_summary``, ``_sort``, history, paging links, POST ``_search``, system
searches, batch and transaction GETs) against a store with clinical content; no response may hold
a byte of it (the names, birth dates, reasons, notes, report texts and findings stored, nor the id
of a resource the insurer may not see), and a request about a resource it may not see is answered
byte for byte as the same request about a missing one (ids aside)."""

import random
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from testbed.roles import Case, ids, token

REQUESTS = 240
Json = dict[str, Any]
#: Search parameters on the status elements: allowed.
ALLOWED = {
    "Task": ["status=requested", "intent=order", "business-status=x", "priority=routine", "code=x",
             "identifier=x", "authored-on=ge2000", "modified=ge2000", "due=ge2000", "owner=Organization/read-1",
             "_lastUpdated=ge2000", "status:not=completed", "due:missing=false"],
    "ServiceRequest": ["status=active", "intent=order", "priority=routine", "code=24627-2", "identifier=ACSN-1",
                       "authored=ge2000", "_lastUpdated=ge2000", "code:not=x"],
}  # fmt: skip
#: On anything else, or reaching further: refused.
REFUSED = {
    "Task": ["focus=ServiceRequest/x", "patient=Patient/x", "subject=Patient/x", "period=ge2000", "based-on=x",
             "requester=Organization/hosp-a", "part-of=Task/x", "encounter=x", "performer=x",
             "focus:ServiceRequest.subject:Patient.family=Secret", "_has:Task:part-of:status=requested",
             "subject:Patient.birthdate=1940", "_sort=period", "_include=Task:focus", "_revinclude=Task:part-of",
             "_include:iterate=Task:patient", "_include=*"],
    "ServiceRequest": ["subject=Patient/x", "patient=Patient/x", "requester=Organization/hosp-a", "performer=x",
                       "insurance=Coverage/x", "encounter=x", "body-site=x", "performer-type=group-1",
                       "based-on=x", "occurrence=ge2000", "subject:Patient.family=Secret", "requester.name=Org",
                       "_has:Observation:based-on:value-string=Secret", "_has:Task:focus:status=requested",
                       "_include=ServiceRequest:subject", "_revinclude=DiagnosticReport:based-on",
                       "_revinclude=*", "_sort=-occurrence", "insurance:Coverage.payor.name=Org"],
}  # fmt: skip
CONTROLS = ["_count=1", "_count=2", "_count=3", "_total=accurate", "_total=none", "_summary=true", "_summary=text",
            "_summary=data", "_summary=count", "_sort=-_lastUpdated", "_sort=status", "_sort=_id", "_offset=1",
            "_pretty=true"]  # fmt: skip
ELEMENTS = ["status", "note", "reasonCode", "subject", "for", "focus", "restriction", "intent", "code", "text",
            "insurance", "supportingInfo", "owner", "description", "input", "businessStatus", "requester"]  # fmt: skip
OTHERS = ["Patient", "DiagnosticReport", "Observation", "Coverage", "ImagingStudy", "Organization"]


@pytest.fixture
def case_count() -> int:
    """Twelve cases: insurer-1 pays for eight of them, not for four."""
    return 12


def paid(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.payor == "pay-1"]


def test_the_insurer_sees_where_its_cases_stand_and_nothing_else(client: TestClient, cases: list[Case]) -> None:
    insurer = token(client, "insurer-1")
    tasks = client.get("/fhir/Task?_total=accurate", headers=insurer).json()
    assert ids(tasks) == {c.task for c in paid(cases)}
    assert tasks["total"] == len(paid(cases))
    orders = client.get("/fhir/ServiceRequest?_summary=count", headers=insurer).json()
    assert orders["total"] == len(paid(cases))
    task = client.get(f"/fhir/Task/{paid(cases)[0].task}", headers=insurer).json()
    assert set(task) == {"resourceType", "id", "meta", "status", "intent", "priority", "authoredOn",
                         "owner", "restriction"}  # fmt: skip
    assert set(task["restriction"]) == {"period"}
    order = client.get(f"/fhir/ServiceRequest/{paid(cases)[0].order}?_elements=status,note", headers=insurer).json()
    assert set(order) == {"resourceType", "id", "meta", "status"}
    unpaid = next(c for c in cases if c.payor != "pay-1")
    assert client.get(f"/fhir/Task/{unpaid.task}", headers=insurer).status_code == 404
    refused = client.get("/fhir/ServiceRequest?subject=Patient/x", headers=insurer)
    assert refused.status_code == 403
    assert "subject" in refused.json()["issue"][0]["diagnostics"]
    assert client.get("/fhir/Task?_include=Task:focus", headers=insurer).status_code == 403
    assert client.get(f"/fhir/Task/{paid(cases)[0].task}/_history", headers=insurer).status_code == 403
    assert client.put(f"/fhir/Task/{paid(cases)[0].task}", json=task, headers=insurer).status_code == 403
    assert client.post("/fhir/ServiceRequest/$validate", json={}, headers=insurer).status_code == 403


def test_generated_insurer_requests_return_no_clinical_byte(client: TestClient, cases: list[Case]) -> None:
    insurer = token(client, "insurer-1")
    visible = {x for c in paid(cases) for x in (c.task, c.order)}
    hidden = [(t, getattr(c, a)) for c in cases for t, a in _TYPES if getattr(c, a) not in visible]
    secrets = [s for c in cases for s in c.secrets] + [rid for _, rid in hidden] + ["Patient/"]
    rng = random.Random(17)
    answered = 0

    def check(response: Response, asked: str) -> Json | None:
        nonlocal answered
        answered += 1
        assert response.status_code < 500, (asked, response.text)
        leaked = [s for s in secrets if s in response.text and s not in asked]
        assert not leaked, (asked, leaked, response.text[:2000])
        return response.json() if response.content else None

    while answered < REQUESTS:
        kind = rng.choice(["search", "search", "refused", "form", "system", "other", "read", "history", "bundle"])
        if kind == "bundle":
            entries = [_request(rng, cases, hidden, k) for k in rng.choices(["search", "refused", "read"], k=4)]
            bundle = {"resourceType": "Bundle", "type": rng.choice(["batch", "transaction"]),
                      "entry": [{"request": {"method": "GET", "url": url}} for url, _ in entries]}  # fmt: skip
            response = client.post("/fhir", json=bundle, headers=insurer)
            body = check(response, str(bundle))
            if bundle["type"] == "batch":
                expected = [status for _, status in entries]
                assert [int(e["response"]["status"][:3]) for e in body["entry"]] == expected, bundle  # type: ignore[index]
            else:  # a transaction fails whole at a failing entry
                assert response.status_code in ({s for _, s in entries} - {200} or {200}), (bundle, response.text)
            continue
        url, status = _request(rng, cases, hidden, kind)
        if kind == "form":
            path, _, query = url.partition("?")
            response = client.post(f"/fhir/{path}/_search", content=query, headers={
                **insurer, "content-type": "application/x-www-form-urlencoded"})  # fmt: skip
        else:
            response = client.get(f"/fhir/{url}", headers=insurer)
        assert response.status_code == status, (url, response.text)
        body = check(response, url)
        parts = url.split("?")[0].split("/")
        if kind in ("read", "history") and len(parts) > 1 and not parts[1].startswith("_"):
            rid = parts[1]
            missing = client.get(f"/fhir/{url.replace(rid, 'missing-id')}", headers=insurer)
            check(missing, url)
            assert (missing.status_code, missing.text) == (status, response.text.replace(rid, "missing-id")), url
        for link in (body or {}).get("link", []):
            if link["relation"] == "next" and body and body.get("resourceType") == "Bundle":
                following = client.get(link["url"].removeprefix("http://testserver"), headers=insurer)
                assert following.status_code == 200, link
                check(following, link["url"])
    assert answered >= REQUESTS


_TYPES = [("Patient", "patient"), ("Coverage", "coverage"), ("ServiceRequest", "order"), ("Task", "task"),
          ("DiagnosticReport", "report"), ("Observation", "observation"), ("ImagingStudy", "study")]  # fmt: skip


def _request(rng: random.Random, cases: list[Case], hidden: list[tuple[str, str]], kind: str) -> tuple[str, int]:
    """A request of ``kind`` (a URL below the base) and the status it must be answered with."""
    rtype = rng.choice(["Task", "ServiceRequest"])
    controls = rng.sample(CONTROLS, rng.randint(0, 3))
    if rng.random() < 0.4:
        controls.append("_elements=" + ",".join(rng.sample(ELEMENTS, rng.randint(1, 5))))
    own = [p.replace("=x", f"={rng.choice(cases).order}") for p in rng.sample(ALLOWED[rtype], rng.randint(0, 2))]
    match kind:
        case "search" | "form":
            return _url(rtype, own + controls), 200
        case "refused":
            return _url(rtype, [*own, rng.choice(REFUSED[rtype]), *controls]), 403
        case "system":
            return _url("", ["_type=Task,ServiceRequest", *rng.sample(["_lastUpdated=ge2000", "_count=2"], 1)]), 200
        case "other":
            other = rng.choice(OTHERS)
            if rng.random() < 0.5:
                unsorted = [c for c in controls if not c.startswith("_sort")]  # on no element it may see
                return _url(other, [f"_id={rng.choice(hidden)[1]}", *unsorted]), 200
            return _url(other, rng.choice([["identifier=MRN-1"], ["_lastUpdated=ge2000", "identifier=x"]])), 403
        case "read":
            rtype, rid = rng.choice(hidden)
            return f"{rtype}/{rid}" + rng.choice(["", "?_elements=status", "?_summary=true"]), 404
    rtype, rid = rng.choice(hidden + [("Task", c.task) for c in cases])
    return rng.choice([f"{rtype}/{rid}/_history", f"{rtype}/{rid}/_history/1", f"{rtype}/_history", "_history"]), 403


def _url(path: str, params: list[str]) -> str:
    pairs = (p.split("=", 1) for p in params)
    return f"{path}?" + "&".join(f"{name}={quote(value, safe=':,/|')}" for name, value in pairs)
