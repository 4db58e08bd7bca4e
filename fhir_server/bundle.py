"""Batch and transaction Bundles (R4 http.html#transaction).

A transaction is atomic: it runs inside the request's one database transaction and any
failing entry fails it whole. Entries are processed in the order the specification
prescribes (DELETE, POST, PUT/PATCH, GET/HEAD); ``urn:uuid:``/``fullUrl`` references
between entries and conditional references (``Patient?identifier=...``) are resolved
before anything is written. A batch runs each entry in a savepoint of its own.
"""

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from fhir_server.errors import FhirError, Issue, error
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.repository import Repository
from fhir_server.validation import SUPPORTED_TYPES

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified"}


@dataclass
class Entry:
    index: int
    method: str
    url: str
    full_url: str | None
    resource: dict[str, Any] | None
    headers: dict[str, str]
    #: "Type/id" this entry's resource will have, once known.
    target: str | None = None
    #: A conditional create that matched: answer 200 with the existing resource.
    existing: bool = False


def process(body: Any, repo: Repository, base: str) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise error(400, "structure", "POST to the base needs a batch or transaction Bundle")
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise error(400, "invalid", f"Bundle.type must be batch or transaction, not {kind!r}", "Bundle.type")
    entries = [_entry(i, e) for i, e in enumerate(body.get("entry") or [])]
    responses = _transaction(entries, repo, base) if kind == "transaction" else _batch(entries, repo, base)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": f"{kind}-response",
        "entry": [_response_entry(r) for r in responses],
    }


def _entry(index: int, raw: Any) -> Entry:
    request = raw.get("request") if isinstance(raw, dict) else None
    if not isinstance(request, dict) or request.get("method") not in ORDER or not request.get("url"):
        raise error(
            400, "invalid", f"Entry {index} needs request.method and request.url", f"Bundle.entry[{index}]"
        )
    headers = {
        header: request[key]
        for key, header in (("ifMatch", "if-match"), ("ifNoneExist", "if-none-exist"),
                            ("ifNoneMatch", "if-none-match"), ("ifModifiedSince", "if-modified-since"))
        if request.get(key)
    }  # fmt: skip
    resource = raw.get("resource")
    return Entry(index, request["method"], request["url"].lstrip("/"), raw.get("fullUrl"), resource, headers)


def _request(entry: Entry, base: str) -> FhirRequest:
    parts = urlsplit(entry.url)
    path = parts.path
    if path.startswith(base):
        path = path[len(base) :]
    from fhir_server.router import parse_qsl

    return FhirRequest(
        entry.method, path.strip("/"), parse_qsl(parts.query), dict(entry.headers), entry.resource
    )


def _batch(entries: list[Entry], repo: Repository, base: str) -> list[FhirResponse]:
    from fhir_server.router import handle

    responses = []
    for entry in entries:
        savepoint = repo.session.begin_nested()
        response = handle(_request(entry, base), repo, base)
        if response.status >= 400:
            savepoint.rollback()
        else:
            savepoint.commit()
        responses.append(response)
    return responses


def _transaction(entries: list[Entry], repo: Repository, base: str) -> list[FhirResponse]:
    from fhir_server.router import handle

    ids = _assign_ids(entries, repo, base)
    for entry in entries:
        if entry.resource is not None:
            entry.resource = _rewrite(entry.resource, ids, repo, entries)
    responses: dict[int, FhirResponse] = {}
    for entry in sorted(entries, key=lambda e: ORDER[e.method]):
        if entry.method == "POST" and entry.target:
            rtype, rid = entry.target.split("/")
            if entry.existing:
                stored = repo.read(rtype, rid)
                response = FhirResponse(
                    200, None, {"Location": f"{base}/{rtype}/{rid}/_history/{stored.version}"}
                )
            else:
                stored = repo.create(entry.resource or {}, rid)
                response = FhirResponse(
                    201, None, {"Location": f"{base}/{rtype}/{rid}/_history/{stored.version}"}
                )
            from fhir_server.router import version_headers

            response.headers.update(version_headers(stored))
            response.body = orjson.Fragment(stored.content or "{}")
        else:
            response = handle(_request(entry, base), repo, base)
        if response.status >= 400:
            outcome = response.body or {}
            issues = [
                Issue(i.get("code", "processing"), f"Entry {entry.index} ({entry.method} {entry.url}): "
                      f"{i.get('diagnostics', '')}", expression=(f"Bundle.entry[{entry.index}]",))
                for i in outcome.get("issue", [])
            ]  # fmt: skip
            raise FhirError(response.status, issues)
        responses[entry.index] = response
    return [responses[e.index] for e in entries]


def _assign_ids(entries: list[Entry], repo: Repository, base: str) -> dict[str, str]:
    """Decide the id of every created resource before anything is written."""
    from fhir_server.router import conditional_matches

    ids: dict[str, str] = {}
    for entry in entries:
        if entry.method != "POST":
            continue
        rtype = entry.url.split("?")[0]
        if rtype not in SUPPORTED_TYPES:
            raise error(400, "invalid", f"Entry {entry.index}: POST to {entry.url!r} is not a create")
        query = entry.headers.get("if-none-exist")
        found = conditional_matches(repo, rtype, query) if query else []
        if len(found) > 1:
            raise error(412, "duplicate", f"Entry {entry.index}: If-None-Exist {query} matches {len(found)}")
        entry.existing = bool(found)
        entry.target = f"{rtype}/{found[0].id if found else uuid.uuid4()}"
        if entry.full_url:
            ids[entry.full_url] = entry.target
    for entry in entries:  # PUT Type/id: other entries may refer to its fullUrl
        if entry.method == "PUT" and entry.full_url and "?" not in entry.url:
            ids[entry.full_url] = entry.url
    return ids


def _rewrite(value: Any, ids: dict[str, str], repo: Repository, entries: list[Entry]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, ids, repo, entries) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str):
            if ref in ids:
                out["reference"] = ids[ref]
            elif "?" in ref and ref.split("?")[0] in SUPPORTED_TYPES:
                out["reference"] = _conditional_reference(ref, repo, entries)
            elif ref.startswith("urn:uuid:"):
                raise error(400, "invalid", f"Reference {ref} names no entry of this Bundle")
        return out
    if isinstance(value, list):
        return [_rewrite(v, ids, repo, entries) for v in value]
    return value


def _conditional_reference(ref: str, repo: Repository, entries: list[Entry]) -> str:
    """Resolve ``Type?criteria`` to the one resource it matches (http.html#trules).

    A resource created by this very transaction with the same If-None-Exist criteria
    counts as a match, so a Bundle can create a Patient and refer to it conditionally.
    """
    from fhir_server.router import conditional_matches

    rtype, _, query = ref.partition("?")
    found = [f"{s.type}/{s.id}" for s in conditional_matches(repo, rtype, query)]
    if not found:
        found = [e.target for e in entries if e.target and e.url.split("?")[0] == rtype
                 and e.headers.get("if-none-exist") == query]  # fmt: skip
    if len(found) != 1:
        raise error(412 if found else 404, "not-found" if not found else "multiple-matches",
                    f"Conditional reference {ref} matches {len(found)} resources, not one")  # fmt: skip
    return found[0]


def _response_entry(response: FhirResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"status": f"{response.status} {REASONS.get(response.status, '')}".strip()}
    if "Location" in response.headers:
        out["location"] = response.headers["Location"]
    if "ETag" in response.headers:
        out["etag"] = response.headers["ETag"]
    if response.status >= 400:
        out["outcome"] = response.body
    entry: dict[str, Any] = {"response": out}
    if response.body is not None and response.status < 400:
        entry["resource"] = response.body
    return entry
