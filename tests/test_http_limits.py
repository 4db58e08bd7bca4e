"""The FHIR door's limits (docs/reliability.md#http-and-fhir): each configurable, each answered
with an OperationOutcome naming it before work grows with the input, nothing stored."""

import asyncio
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from fhir_server.db import Database
from overread.app import create_app
from overread.settings import Settings
from tests.builders import assert_outcome, patient

FHIR_JSON = {"content-type": "application/fhir+json"}


def limited(db: Database, **limits: Any) -> TestClient:
    return TestClient(create_app(Settings(database_url=db.url, **limits), db), base_url="http://testserver")


@pytest.fixture
def small(db: Database) -> Iterator[TestClient]:
    """A client of a server with small limits, set as ``OVERREAD_*`` settings are."""
    limits = {"http_max_headers": 40, "http_max_header_bytes": 4096, "http_max_body_bytes": 20_000,
              "fhir_max_json_depth": 12, "fhir_max_string": 100, "fhir_max_bundle_entries": 3}  # fmt: skip
    with limited(db, **limits) as c:
        c.headers.update(FHIR_JSON)
        yield c


def transaction(count: int) -> dict[str, Any]:
    entry = {"resource": patient(), "request": {"method": "POST", "url": "Patient"}}
    return {"resourceType": "Bundle", "type": "transaction", "entry": [entry] * count}


def stored(client: TestClient) -> int:
    total: int = client.get("/fhir/Patient").json()["total"]
    return total


def asgi_get(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> tuple[int, dict[str, Any]]:
    """GET ``path`` straight through ASGI: httpx's own header handling is quadratic too."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "server": ("testserver", 80), "client": ("127.0.0.1", 1)}  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], orjson.loads(body)


def test_twenty_thousand_headers_are_refused_431_by_default(db):
    """The 229 KB GET that froze the process for 7 s (dict(request.headers) is quadratic)."""
    app = create_app(Settings(database_url=db.url), db)
    status, body = asgi_get(app, "/fhir/Patient", [(f"x-h{i}".encode(), b"v") for i in range(20_000)])
    assert status == 431, body
    assert body["resourceType"] == "OperationOutcome"
    assert "100 header lines" in body["issue"][0]["diagnostics"]
    wide = create_app(Settings(database_url=db.url, http_max_headers=30_000, http_max_header_bytes=10**6), db)
    status, body = asgi_get(wide, "/fhir/Patient", [(f"x-h{i}".encode(), b"v") for i in range(20_000)])
    assert (status, body["total"]) == (200, 0)  # read in one pass: the old dict(headers) took many seconds


def test_header_count_and_size_limits(small):
    assert small.get("/fhir/Patient", headers=[(f"x-h{i}", "v") for i in range(30)]).status_code == 200
    assert_outcome(small.get("/fhir/Patient", headers=[(f"x-h{i}", "v") for i in range(41)]), 431)
    assert_outcome(small.get("/fhir/Patient", headers={"x-big": "v" * 5000}), 431)


def test_the_first_of_repeated_headers_counts(client):
    headers = [("prefer", "return=minimal"), ("prefer", "return=OperationOutcome")]
    r = client.post("/fhir/Patient", json=patient(), headers=headers)
    assert r.status_code == 201 and r.content == b""


def test_a_body_over_the_limit_is_refused_413_while_it_arrives(small):
    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"resourceType": "Patient", "name": ['
        for _ in range(1000):
            yield b'{"family": "Haugen"},'
        yield b'{"family": "Haugen"}]}'

    assert_outcome(small.post("/fhir/Patient", content=chunks()), 413)
    big = patient(name=[{"family": "Haugen"}] * 1000)
    assert_outcome(small.post("/fhir/Patient", json=big), 413)  # refused by its Content-Length
    assert small.post("/fhir/Patient", json=patient()).status_code == 201
    assert stored(small) == 1


def test_bundle_entries_over_the_limit_are_refused_413(small):
    assert_outcome(small.post("/fhir", json=transaction(4)), 413)
    assert stored(small) == 0
    assert small.post("/fhir", json=transaction(3)).status_code == 200
    assert stored(small) == 3


def test_a_string_over_the_limit_is_refused_422(small):
    body = assert_outcome(small.post("/fhir/Patient", json=patient(family="H" * 101)), 422)
    assert body["issue"][0]["code"] == "too-long"
    assert small.post("/fhir/Patient", json=patient(family="H" * 100)).status_code == 201
    assert stored(small) == 1


def test_json_nested_over_the_limit_is_refused_400(small):
    ext: dict[str, Any] = {"url": "urn:x", "valueString": "x"}
    for _ in range(6):  # 6 nested extensions are 14 levels below the Patient
        ext = {"url": "urn:x", "extension": [ext]}
    assert_outcome(small.post("/fhir/Patient", json=patient(extension=[ext])), 400)
    assert stored(small) == 0
