"""Concurrent writes against a real server, on SQLite and on PostgreSQL.

Many threads start their request at the same moment (a barrier) against a uvicorn server
(``live_server``). Race-free means: one conditional create wins and the rest find it; one
of several updates with the same ``If-Match`` wins and the rest get 412; transactions that
create the same Patient conditionally share one Patient. No 409 or 500 is acceptable here,
because the server serialises these cases itself (locks), the client need not retry.
"""

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.builders import bundle, case_transaction, mrn_query, patient, post

pytestmark = pytest.mark.server


@pytest.fixture
def http(live_server: str) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(
        base_url=live_server, headers={"content-type": "application/fhir+json"}, limits=limits, timeout=60
    ) as c:
        yield c


def at_once(n: int, request: Callable[[int], httpx.Response]) -> list[httpx.Response]:
    """Run ``request(i)`` for i in range(n) in n threads released together."""
    barrier = threading.Barrier(n)

    def run(i: int) -> httpx.Response:
        barrier.wait(timeout=30)
        return request(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(run, range(n)))


def statuses(responses: list[httpx.Response]) -> Counter[int]:
    return Counter(r.status_code for r in responses)


def total(http: httpx.Client, query: str) -> Any:
    r = http.get(query)
    assert r.status_code == 200, r.text
    return r.json()["total"]


def test_32_identical_conditional_creates_make_exactly_one_resource(http):
    responses = at_once(
        32, lambda i: http.post("/Patient", json=patient(given=f"Try{i}"), headers={"If-None-Exist": mrn_query()})
    )
    assert statuses(responses) == {201: 1, 200: 31}, [r.text for r in responses if r.status_code >= 400]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    assert len({r.headers["location"] for r in responses}) == 1
    assert total(http, f"/Patient?{mrn_query()}") == 1
    assert total(http, "/Patient/_history") == 1


def test_16_conditional_creates_on_an_identifier_past_255_characters_make_one_resource(http):
    # The index held the first 255 characters and the lookup compared the whole value: every POST created.
    criteria = f"identifier=urn:x|{'V' * 300}"
    body = {**patient(), "identifier": [{"system": "urn:x", "value": "V" * 300}]}
    responses = at_once(16, lambda i: http.post("/Patient", json=body, headers={"If-None-Exist": criteria}))
    assert statuses(responses) == {201: 1, 200: 15}, [r.text for r in responses if r.status_code >= 400]
    assert len({r.json()["id"] for r in responses}) == 1
    assert total(http, f"/Patient?{criteria}") == 1


def test_16_updates_with_the_same_if_match_have_exactly_one_winner(http):
    created = http.put("/Patient/p-race", json={**patient(), "id": "p-race"})
    assert created.status_code == 201
    responses = at_once(
        16,
        lambda i: http.put(
            "/Patient/p-race", json={**patient(family=f"Writer{i}"), "id": "p-race"}, headers={"If-Match": 'W/"1"'}
        ),
    )
    assert statuses(responses) == {200: 1, 412: 15}, [r.text for r in responses if r.status_code not in (200, 412)]
    (winner,) = (r for r in responses if r.status_code == 200)
    for loser in (r for r in responses if r.status_code == 412):
        assert loser.json()["resourceType"] == "OperationOutcome"
    current = http.get("/Patient/p-race")
    assert current.headers["etag"] == 'W/"2"'
    assert current.json()["name"] == winner.json()["name"]
    assert total(http, "/Patient/p-race/_history") == 2


def test_16_concurrent_update_as_creates_of_one_id_make_one_resource_with_16_versions(http):
    responses = at_once(16, lambda i: http.put("/Patient/mrn-7", json={**patient(family=f"W{i}"), "id": "mrn-7"}))
    assert statuses(responses) == {201: 1, 200: 15}, [r.text for r in responses if r.status_code >= 400]
    assert sorted(int(r.json()["meta"]["versionId"]) for r in responses) == list(range(1, 17))
    assert total(http, "/Patient/mrn-7/_history") == 16


def test_16_identical_conditional_updates_make_exactly_one_resource(http):
    responses = at_once(16, lambda i: http.put(f"/Patient?{mrn_query()}", json=patient(family=f"W{i}")))
    assert statuses(responses) == {201: 1, 200: 15}, [r.text for r in responses if r.status_code >= 400]
    assert len({r.json()["id"] for r in responses}) == 1
    assert total(http, f"/Patient?{mrn_query()}") == 1


def test_concurrent_transactions_for_one_patient_share_the_patient(http):
    """16 orders for the same person at once: one Patient, 16 ServiceRequests and Tasks."""
    responses = at_once(16, lambda i: http.post("", json=case_transaction(accession=f"ACSN-{i:04d}")))
    assert statuses(responses) == {200: 16}, [r.text for r in responses if r.status_code != 200]
    patient_statuses = Counter(r.json()["entry"][0]["response"]["status"] for r in responses)
    assert patient_statuses == {"201 Created": 1, "200 OK": 15}
    patients = {r.json()["entry"][0]["response"]["location"].split("/_history")[0] for r in responses}
    assert len(patients) == 1
    (patient_url,) = patients
    patient_ref = "/".join(patient_url.split("/")[-2:])

    assert total(http, f"/Patient?{mrn_query()}") == 1
    assert total(http, f"/ServiceRequest?subject={patient_ref}") == 16
    assert total(http, "/Task") == 16
    for r in responses:
        sr_location = r.json()["entry"][1]["response"]["location"]
        sr = http.get(sr_location.split("/fhir", 1)[1]).json()
        assert sr["subject"]["reference"] == patient_ref


def test_concurrent_transactions_that_fail_leave_nothing_behind(http):
    """Half of the transactions are invalid at their last entry; only the valid half is stored."""

    def send(i: int) -> httpx.Response:
        body = case_transaction(mrn=f"MRN-{i}", accession=f"ACSN-{i:04d}")
        if i % 2:
            body["entry"][-1]["resource"]["intent"] = "on-fire"  # not a code of RequestIntent
        response: httpx.Response = http.post("", json=body)
        return response

    responses = at_once(12, send)
    assert [r.status_code for r in responses] == [200, 422] * 6
    assert total(http, "/Patient") == total(http, "/ServiceRequest") == total(http, "/Task") == 6
    assert total(http, "/_history") == 18


def test_bundles_touching_the_same_patients_in_opposite_orders_all_succeed(http):
    """No deadlock (PostgreSQL) between Bundles that lock the same criteria in another order.

    Transactions and batches alike: a batch's entries share one database transaction too.
    """

    def send(i: int) -> httpx.Response:
        mrns = ["MRN-A", "MRN-B", "MRN-C"] if i % 2 else ["MRN-C", "MRN-B", "MRN-A"]
        kind = "transaction" if i % 4 < 2 else "batch"
        body = bundle(kind, *(post(patient(mrn=m), if_none_exist=mrn_query(m)) for m in mrns))
        response: httpx.Response = http.post("", json=body)
        return response

    responses = at_once(16, send)
    assert statuses(responses) == {200: 16}, [r.text for r in responses if r.status_code != 200]
    for r in responses:
        assert all(e["response"]["status"][:3] in ("200", "201") for e in r.json()["entry"]), r.text
    assert total(http, "/Patient") == 3
