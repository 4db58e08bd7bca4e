"""Bad input to the FHIR API is answered 4xx with an OperationOutcome, never 500 (issue 15, "500s").

Each case is one request the hardening review found answered 500 (some as plain text) on SQLite
or PostgreSQL; R4 http.html#2.21.0.4 ("Handling errors"). Valid input at the edge of what a
database holds (a dateTime whose UTC instant lies past 9999-12-31) is stored, not refused.
"""

import base64
import http.client
import json
import urllib.parse
from typing import Any

import pytest

from tests.builders import assert_outcome, patient

BIG = 2**63
PID = "p-1"


def nested_extension(depth: int) -> dict[str, Any]:
    ext: dict[str, Any] = {"url": "urn:x", "valueString": "x"}
    for _ in range(depth):
        ext = {"url": "urn:x", "extension": [ext]}
    return ext


def binary_patch(data: bytes) -> dict[str, Any]:
    return {
        "resourceType": "Binary",
        "contentType": "application/json-patch+json",
        "data": base64.b64encode(data).decode(),
    }


def bundle(*entries: Any) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "transaction", "entry": list(entries)}


def entry(**request: Any) -> dict[str, Any]:
    return {"resource": patient(), "request": {"method": "POST", "url": "Patient", **request}}


FORM = {"content-type": "application/x-www-form-urlencoded"}
MERGE = {"content-type": "application/merge-patch+json"}
JSON_PATCH = {"content-type": "application/json-patch+json"}

#: (name, method, path, request keyword arguments, expected status)
CASES: list[tuple[str, str, str, dict[str, Any], int]] = [
    ("_count not an ASCII digit", "GET", "/fhir/Patient?_count=%C2%B2", {}, 400),
    ("_offset not an ASCII digit", "GET", "/fhir/Patient?_offset=%C2%B2", {}, 400),
    ("history _count not an ASCII digit", "GET", "/fhir/Patient/_history?_count=%C2%B2", {}, 400),
    ("vread version not an ASCII digit", "GET", f"/fhir/Patient/{PID}/_history/%C2%B2", {}, 404),
    ("vread version 2^63", "GET", f"/fhir/Patient/{PID}/_history/{BIG}", {}, 404),
    ("vread version 2^31", "GET", f"/fhir/Patient/{PID}/_history/{2**31}", {}, 404),
    ("a line break before the id (no route matched)", "GET", f"/fhir/Patient/%0A{PID}", {}, 404),
    ("a line break after the id (read without it)", "GET", f"/fhir/Patient/{PID}%0A", {}, 404),
    ("_offset 2^63", "GET", f"/fhir/Patient?_offset={BIG}", {}, 400),
    ("conditional update, the body's id no string", "PUT", "/fhir/Patient?_id=x",
     {"json": {**patient(), "id": True}}, 400),
    ("_offset 2^31", "GET", f"/fhir/Patient?_offset={2**31}", {}, 400),
    ("history _offset 2^63", "GET", f"/fhir/_history?_offset={BIG}", {}, 400),
    ("form _search not UTF-8", "POST", "/fhir/Patient/_search", {"content": b"name=\xff\xfe", "headers": FORM}, 400),
    ("quantity 1e-999999999", "GET", "/fhir/Observation?value-quantity=1e-999999999", {}, 400),
    ("quantity 1e999999999", "GET", "/fhir/Observation?value-quantity=1e999999999", {}, 400),
    ("60 KB name", "GET", "/fhir/Patient?name=" + "a" * 60_000, {}, 400),
    ("$validate parameter not a list", "POST", "/fhir/Patient/$validate",
     {"json": {"resourceType": "Parameters", "parameter": {"name": "resource"}}}, 400),
    ("$validate parameter items not objects", "POST", "/fhir/Patient/$validate",
     {"json": {"resourceType": "Parameters", "parameter": ["resource", 7]}}, 400),
    ("Bundle entry url not a string", "POST", "/fhir", {"json": bundle(entry(url=7))}, 400),
    ("Bundle entry method not a string", "POST", "/fhir", {"json": bundle(entry(method=["POST"]))}, 400),
    ("Bundle entry ifNoneExist not a string", "POST", "/fhir", {"json": bundle(entry(ifNoneExist={"a": 1}))}, 400),
    ("Bundle entry ifMatch not a string", "POST", "/fhir", {"json": bundle(entry(ifMatch=3))}, 400),
    ("Bundle entry resource not an object", "POST", "/fhir",
     {"json": bundle({"resource": "Patient", "request": {"method": "POST", "url": "Patient"}})}, 400),
    ("Bundle entry resource a list", "POST", "/fhir",
     {"json": bundle({"resource": [patient()], "request": {"method": "PUT", "url": "Patient/x"}})}, 400),
    ("Bundle entry fullUrl not a string", "POST", "/fhir", {"json": bundle({**entry(), "fullUrl": 5})}, 400),
    ("PATCH Binary data an integer", "PATCH", f"/fhir/Patient/{PID}", {"json": binary_patch(b"7")}, 400),
    ("PATCH Binary data deeply nested", "PATCH", f"/fhir/Patient/{PID}",
     {"json": binary_patch(b"[" * 100_000 + b"]" * 100_000)}, 400),
    ("PATCH Binary data not base64 text", "PATCH", f"/fhir/Patient/{PID}",
     {"json": {"resourceType": "Binary", "contentType": "application/json-patch+json", "data": 5}}, 400),
    ("merge-patch 1,000 levels deep", "PATCH", f"/fhir/Patient/{PID}",
     {"content": '{"a":' * 1000 + "1" + "}" * 1000, "headers": MERGE}, 400),
    ("extensions 250 deep", "POST", "/fhir/Patient", {"json": patient(extension=[nested_extension(250)])}, 400),
    ("body 100,000 arrays deep", "POST", "/fhir/Patient", {"content": b"[" * 100_000 + b"]" * 100_000}, 400),
    ("NUL in a string on create", "POST", "/fhir/Patient", {"json": patient(family="Hau\u0000gen")}, 400),
    ("NUL in a key on create", "POST", "/fhir/Patient", {"json": {**patient(), "gen\u0000der": "female"}}, 400),
    ("NUL in a search value", "GET", "/fhir/Patient?name=Hau%00gen", {}, 400),
    ("NUL in a token search", "GET", "/fhir/Patient?identifier=urn:x%7CA%00B", {}, 400),
    ("NUL in an id", "GET", "/fhir/Patient/a%00b", {}, 404),
    ("NUL in a vread's id", "GET", "/fhir/Patient/a%00b/_history/1", {}, 404),
    ("NUL in a history's id", "GET", "/fhir/Patient/a%00b/_history", {}, 404),
    ("NUL in a deleted id", "DELETE", "/fhir/Patient/a%00b", {}, 404),
    ("NUL in a patched id", "PATCH", "/fhir/Patient/a%00b", {"json": [], "headers": JSON_PATCH}, 404),
    ("NUL in If-None-Exist", "POST", "/fhir/Patient",
     {"json": patient(), "headers": {"if-none-exist": "identifier=a%00b"}}, 400),
    ("NUL in conditional update criteria", "PUT", "/fhir/Patient?identifier=a%00b", {"json": patient()}, 400),
    ("NUL in a Bundle's ifNoneExist", "POST", "/fhir", {"json": bundle(entry(ifNoneExist="identifier=a%00b"))}, 400),
    ("NUL in a Bundle entry's URL", "POST", "/fhir",
     {"json": bundle({"request": {"method": "GET", "url": "Patient?name=a%00b"}})}, 400),
    ("Quantity.system over 255", "POST", "/fhir/Observation",
     {"json": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
               "valueQuantity": {"value": 1, "system": "urn:" + "s" * 300, "code": "mm"}}}, 422),
    ("PUT id ..", "PUT", "/fhir/Patient/%2E%2E", {"json": {**patient(), "id": ".."}}, 400),
    ("PUT id .", "PUT", "/fhir/Patient/%2E", {"json": {**patient(), "id": "."}}, 400),
    ("PUT body id ..", "PUT", "/fhir/Patient?identifier=urn:x|none", {"json": {**patient(), "id": ".."}}, 400),
]  # fmt: skip


#: Valid searches at the edges of the calendar: their UTC instants lie before year 1 or after 9999.
EDGE_SEARCHES = [
    "/fhir/Patient?birthdate=9999-12-31T23:00:00-05:00",
    "/fhir/Patient?birthdate=0001-01-01T00:30:00%2B05:00",
    "/fhir/Patient?birthdate=ap9999",
    "/fhir/Patient?birthdate=ap0001-01-01",
    "/fhir/Patient?_lastUpdated=ap0001",
    "/fhir/Patient?_lastUpdated=ap9999-12-31T23:59:59Z",
    "/fhir/_history?_since=9999-12-31T23:00:00-05:00",
]


@pytest.fixture
def pid(client) -> str:
    assert client.put(f"/fhir/Patient/{PID}", json={**patient(), "id": PID}).status_code == 201
    return PID


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_answered_with_an_operation_outcome(client, pid, method, path, kwargs, status):
    assert_outcome(client.request(method, path, **kwargs), status)
    assert client.get("/fhir/Patient").json()["total"] == 1  # nothing stored beside the fixture's patient


def test_searches_at_the_edges_of_the_calendar_are_answered(client, pid):
    for path in EDGE_SEARCHES:
        r = client.get(path)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        assert r.json()["resourceType"] == "Bundle"


def test_a_valid_datetime_past_9999_in_utc_is_stored_and_found(client):
    """R4 allows any zone on any dateTime; 9999-12-31T23:30-05:00 is 10000-01-01 in UTC, past what
    Python's datetime and the index hold, so the index clamps it to the calendar's end."""
    body = {**patient(), "id": "late", "deceasedDateTime": "9999-12-31T23:30:00-05:00"}
    r = client.put("/fhir/Patient/late", json=body)
    assert r.status_code == 201, r.text
    assert client.get("/fhir/Patient/late").json()["deceasedDateTime"] == "9999-12-31T23:30:00-05:00"
    found = client.get("/fhir/Patient?death-date=ge9999-12-31").json()
    assert [e["resource"]["id"] for e in found.get("entry", [])] == ["late"]
    early = {**patient(), "id": "early", "birthDate": "0001-01-01", "deceasedDateTime": "0001-01-01T00:30:00+05:00"}
    assert client.put("/fhir/Patient/early", json=early).status_code == 201


@pytest.mark.server
@pytest.mark.parametrize("segment", ["..", "."])
def test_a_dot_segment_as_id_sent_raw_is_400(live_server: str, segment: str) -> None:
    """``PUT /fhir/Patient/..`` as a client sends it unnormalised (httpx would resolve the dot segment
    before sending, so this speaks HTTP/1.1 itself): no resource is created under that id."""
    url = urllib.parse.urlsplit(live_server)
    conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
    try:
        body = json.dumps({**patient(), "id": segment})
        conn.request("PUT", f"{url.path}/Patient/{segment}", body, {"content-type": "application/fhir+json"})
        response = conn.getresponse()
        outcome = json.loads(response.read())
    finally:
        conn.close()
    assert (response.status, outcome["resourceType"]) == (400, "OperationOutcome")
