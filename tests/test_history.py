"""Instance, type and system history (R4 http.html#history): newest first, paged, _since."""

import time
from typing import Any
from urllib.parse import urlsplit

from tests.builders import Json, assert_outcome, patient, service_request


def create(client: Any, resource: Json) -> Json:
    r = client.post(f"/fhir/{resource['resourceType']}", json=resource)
    assert r.status_code == 201, r.text
    body: Json = r.json()
    return body


def path_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def link(bundle: Json, relation: str) -> str | None:
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == relation), None)


def versions(bundle: Json) -> list[tuple[str, str, str]]:
    """(id, etag, request.method) of each history entry, in order."""
    return [
        (e["fullUrl"].rsplit("/", 1)[1], e["response"]["etag"], e["request"]["method"]) for e in bundle.get("entry", [])
    ]


def test_instance_history_is_newest_first_and_shows_the_delete(client):
    rid = create(client, patient())["id"]
    client.put(f"/fhir/Patient/{rid}", json={**patient(family="Berg"), "id": rid})
    client.delete(f"/fhir/Patient/{rid}")
    client.put(f"/fhir/Patient/{rid}", json={**patient(family="Lie"), "id": rid})

    r = client.get(f"/fhir/Patient/{rid}/_history")
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "history" and bundle["total"] == 4
    assert versions(bundle) == [
        (rid, 'W/"4"', "PUT"),
        (rid, 'W/"3"', "DELETE"),
        (rid, 'W/"2"', "PUT"),
        (rid, 'W/"1"', "POST"),
    ]
    newest, deletion, second, first = bundle["entry"]
    assert newest["resource"]["name"][0]["family"] == "Lie"
    assert "resource" not in deletion
    assert deletion["request"]["url"] == f"Patient/{rid}"
    assert second["resource"]["meta"]["versionId"] == "2"
    assert first["request"]["url"] == "Patient" and first["response"]["status"].startswith("201")
    for entry in bundle["entry"]:
        assert entry["response"]["lastModified"]


def test_instance_history_of_an_unknown_resource_is_404(client):
    assert_outcome(client.get("/fhir/Patient/nobody/_history"), 404)


def test_type_history_holds_only_that_type(client):
    a = create(client, patient())["id"]
    b = create(client, patient(mrn="MRN-2"))["id"]
    create(client, service_request(f"Patient/{a}"))
    client.put(f"/fhir/Patient/{a}", json={**patient(family="Berg"), "id": a})

    bundle = client.get("/fhir/Patient/_history").json()
    assert bundle["total"] == 3
    assert [(rid, etag) for rid, etag, _ in versions(bundle)] == [(a, 'W/"2"'), (b, 'W/"1"'), (a, 'W/"1"')]
    assert all(e["fullUrl"].split("/")[-2] == "Patient" for e in bundle["entry"])


def test_system_history_holds_every_type(client):
    pid = create(client, patient())["id"]
    sr = create(client, service_request(f"Patient/{pid}"))["id"]
    client.delete(f"/fhir/ServiceRequest/{sr}")

    bundle = client.get("/fhir/_history").json()
    assert bundle["type"] == "history" and bundle["total"] == 4
    assert [(e["fullUrl"].split("/")[-2], e["request"]["method"]) for e in bundle["entry"]] == [
        ("ServiceRequest", "DELETE"),
        ("Task", "POST"),  # the case the order opened, in the same transaction
        ("ServiceRequest", "POST"),
        ("Patient", "POST"),
    ]


def test_history_pages_follow_next_links_without_gaps_or_repeats(client):
    rid = create(client, patient())["id"]
    for n in range(6):
        client.put(f"/fhir/Patient/{rid}", json={**patient(family=f"F{n}"), "id": rid})
    other = create(client, patient(mrn="MRN-2"))["id"]

    seen: list[tuple[str, str]] = []
    pages = 0
    url: str | None = "/fhir/Patient/_history?_count=3"
    while url:
        bundle = client.get(url).json()
        pages += 1
        assert len(bundle.get("entry", [])) <= 3
        assert bundle["total"] == 8
        seen += [(i, etag) for i, etag, _ in versions(bundle)]
        following = link(bundle, "next")
        url = path_of(following) if following else None
        assert pages < 10
    assert pages == 3
    assert seen == [(other, 'W/"1"')] + [(rid, f'W/"{v}"') for v in range(7, 0, -1)]

    second = client.get("/fhir/Patient/_history?_count=3&_offset=3").json()
    assert path_of(link(second, "previous") or "") == "/fhir/Patient/_history?_count=3"


def test_history_since_keeps_only_later_versions(client):
    old = create(client, patient())["id"]
    time.sleep(0.01)  # lastUpdated has millisecond precision
    new = create(client, patient(mrn="MRN-2"))
    since = new["meta"]["lastUpdated"]
    client.put(f"/fhir/Patient/{new['id']}", json={**patient(mrn="MRN-2", family="Berg"), "id": new["id"]})

    r = client.get("/fhir/Patient/_history", params={"_since": since})
    assert r.status_code == 200
    ids = [i for i, _, _ in versions(r.json())]
    assert ids == [new["id"], new["id"]] and old not in ids
    # The _since parameter is kept in the paging links.
    assert "_since=" in (link(r.json(), "self") or "")

    system = client.get("/fhir/_history", params={"_since": since}).json()
    assert system["total"] == 2


def test_history_with_a_bad_since_or_count_is_400(client):
    assert_outcome(client.get("/fhir/_history?_since=yesterday"), 400)
    assert_outcome(client.get("/fhir/_history?_count=-1"), 400)


def test_history_of_an_empty_store_is_an_empty_bundle(client):
    bundle = client.get("/fhir/_history").json()
    assert bundle["total"] == 0 and "entry" not in bundle and link(bundle, "next") is None
