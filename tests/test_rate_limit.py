"""Per-client rate limits (issue 17): a token bucket per client, 429 with Retry-After, on an
injected clock; through the whole application with real access tokens."""

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fhir_server.db import Database
from fhir_server.rate_limit import Buckets, Rate
from overread.app import create_app
from overread.settings import Settings
from testbed.smart_client import TOKEN_PATH, assertion, bearer, client_entry, es384, form, smart_app

KEY = es384()
SCOPE = "system/Patient.rs"
FORM = {"content-type": "application/x-www-form-urlencoded"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_its_rate():
    clock = Clock()
    buckets = Buckets(Rate(per_second=2, burst=3), clock)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token comes back every half second
    assert buckets.take("b") == 0  # each key its own bucket
    clock.now += 0.5
    assert (buckets.take("a"), buckets.take("a")) == (0, pytest.approx(0.5))
    clock.now += 60
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled up to the burst, no more


def buckets_of(app: FastAPI) -> Buckets:
    """The buckets of the application's RateLimit middleware (given to it as an argument)."""
    (buckets,) = [b for m in app.user_middleware if isinstance(b := m.kwargs.get("buckets"), Buckets)]
    return buckets


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def smart(db: Database, clock: Clock) -> Iterator[TestClient]:
    clients = [client_entry(name, KEY, SCOPE) for name in ("ehr", "ris")]
    app = smart_app(db, clients, http_rate_per_second=1, http_rate_burst=2)
    buckets_of(app).clock = clock
    with TestClient(app, base_url="http://testserver") as client:
        yield client


def test_each_client_is_throttled_by_its_own_bucket_then_allowed_again(smart: TestClient, clock: Clock):
    ehr, ris = (bearer(smart, KEY, name, SCOPE) for name in ("ehr", "ris"))  # two token requests: the address's burst
    assert [smart.get("/fhir/Patient", headers=ehr).status_code for _ in range(2)] == [200, 200]
    throttled = smart.get("/fhir/Patient", headers=ehr)
    assert throttled.status_code == 429 and throttled.headers["retry-after"] == "1"
    assert throttled.headers["content-type"].startswith("application/fhir+json")
    (issue,) = throttled.json()["issue"]
    assert (throttled.json()["resourceType"], issue["code"]) == ("OperationOutcome", "throttled")
    assert smart.get("/fhir/Patient", headers=ris).status_code == 200  # another client: its own bucket
    more = smart.post(TOKEN_PATH, data=form(assertion(KEY, "ehr", f"http://testserver{TOKEN_PATH}")), headers=FORM)
    assert more.status_code == 429  # the token endpoint: by address, and this one spent its burst

    clock.now += 1
    assert smart.get("/fhir/Patient", headers=ehr).status_code == 200
    assert smart.get("/fhir/Patient", headers=ehr).status_code == 429


def test_with_auth_off_each_address_has_a_bucket(db: Database, clock: Clock):
    app = create_app(Settings(database_url=db.url, http_rate_per_second=0.5, http_rate_burst=1), db)
    buckets_of(app).clock = clock
    with TestClient(app) as client:
        assert client.get("/fhir/metadata").status_code == 200
        refused = client.get("/fhir/metadata")
        assert (refused.status_code, refused.headers["retry-after"]) == (429, "2")
        clock.now += 2
        assert client.get("/fhir/metadata").status_code == 200


def test_a_rate_of_zero_is_no_limit(db: Database):
    app = create_app(Settings(database_url=db.url, http_rate_per_second=0, http_rate_burst=1), db)
    assert not [m for m in app.user_middleware if isinstance(m.kwargs.get("buckets"), Buckets)]
