"""The repository's lookups and conditional updates for code that is not the REST API (bridges, workers)."""

from __future__ import annotations

from typing import Any

import pytest

from fhir_server.db import Database
from fhir_server.errors import FhirError
from fhir_server.repository import Repository, same_content
from fhir_server.transaction import transaction

CONNECTION = "http://terminology.hl7.org/CodeSystem/endpoint-connection-type"
TAGS = [{"system": "urn:tags", "code": "kept"}]
ENDPOINT: dict[str, Any] = {
    "resourceType": "Endpoint",
    "identifier": [{"system": "urn:peer", "value": "main"}],
    "status": "active",
    "connectionType": {
        "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
        "code": "dicom-qido-rs",
    },
    "payloadType": [{"text": "DICOM"}],
    "address": "http://pacs/dicom-web",
    "meta": {"tag": TAGS},
}


def test_search_finds_what_the_rest_api_would(db: Database) -> None:
    with db.begin() as conn:
        repo = Repository(conn)
        stored = repo.create(ENDPOINT)
        repo.create({**ENDPOINT, "identifier": [{"system": "urn:peer", "value": "other"}]})
        assert [s.id for s in repo.search("Endpoint", [("identifier", "urn:peer|main")])] == [stored.id]
        assert len(repo.search("Endpoint", [("status", "active"), ("_count", "1")])) == 1  # the first page
        with pytest.raises(FhirError):
            repo.search("Endpoint", [("_sort", "nonsense")])


def test_update_if_changed_writes_only_new_content_and_keeps_the_meta(db: Database) -> None:
    with db.begin() as conn:
        repo = Repository(conn)
        stored = repo.create(ENDPOINT)
        untagged = {k: v for k, v in ENDPOINT.items() if k != "meta"}
        assert repo.update_if_changed(stored, {**untagged, "id": "ignored"}) is None  # same content: no version
        moved = repo.update_if_changed(stored, {**untagged, "address": "http://pacs2/dicom-web"})
        assert moved is not None and moved.version == 2 and moved.id == stored.id
        assert moved.resource["meta"]["tag"] == TAGS
        with pytest.raises(FhirError) as stale:  # a current that is no longer current
            repo.update_if_changed(stored, {**untagged, "address": "http://pacs3/dicom-web"})
        assert stale.value.status == 412
    assert same_content({"id": "a", "meta": {"versionId": "1"}, "status": "x"}, {"status": "x"})
    assert not same_content({"status": "x"}, {"status": "y"})


def test_a_transaction_bundle_runs_without_the_http_api_and_a_batch_is_refused(db: Database) -> None:
    entry = {"fullUrl": "urn:uuid:1", "resource": ENDPOINT, "request": {"method": "POST", "url": "Endpoint"}}
    with db.begin() as conn:
        repo = Repository(conn)
        response = transaction(repo, {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, "urn:test")
        assert response["type"] == "transaction-response"
        assert response["entry"][0]["response"]["status"].startswith("201")
        with pytest.raises(FhirError):
            transaction(repo, {"resourceType": "Bundle", "type": "batch", "entry": [entry]}, "urn:test")
        assert len(repo.search("Endpoint", [])) == 1
