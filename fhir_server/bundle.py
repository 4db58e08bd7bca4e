"""Batch and transaction Bundles (R4 http.html#transaction).

A transaction is atomic: it runs inside the request's one database transaction and any
failing entry fails it whole. Entries are processed in the order the specification
prescribes (DELETE, POST, PUT/PATCH, GET/HEAD); after the DELETEs and before anything
else is written, conditional creates and updates are matched and ``urn:uuid:``/``fullUrl``
references between entries and conditional references (``Patient?identifier=...``) are
resolved. A batch runs each entry in a savepoint of its own.
"""

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from fhir_server import conditional
from fhir_server.access import Access, authorize, confine
from fhir_server.audit_log import refuse_write
from fhir_server.errors import FhirError, Issue, error
from fhir_server.http import FhirRequest, FhirResponse, version_headers
from fhir_server.repository import Repository, Stored
from fhir_server.validation import SUPPORTED_TYPES

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "PATCH": 2, "GET": 3, "HEAD": 3}
REASONS = {200: "OK", 201: "Created", 204: "No Content", 304: "Not Modified"}
Handler = Callable[[FhirRequest, Repository, str], FhirResponse]


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
    #: The canonical criteria of a conditional create or update (see ``_criteria``).
    criteria: tuple[tuple[str, str], ...] | None = None
    #: The resource a conditional create matched, as read when it was matched (under its lock).
    stored: Stored | None = None


Run = Callable[["Entry"], FhirResponse]


def process(
    body: Any, repo: Repository, base: str, handle: Handler, *, savepoint: bool = True, access: Access | None = None
) -> dict[str, Any]:
    """Run a batch or transaction; ``handle`` is the router, which runs each entry's request.

    ``savepoint=False``: the caller already runs this in a savepoint of its own that it rolls
    back on any exception (HL7 intake), so a transaction need not open another one. Each entry
    is a request of ``access`` (``fhir_server.access``): a transaction's are all checked first.
    """
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise error(400, "structure", "POST to the base needs a batch or transaction Bundle")
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise error(400, "invalid", f"Bundle.type must be batch or transaction, not {kind!r}", "Bundle.type")
    entries = [_entry(i, e) for i, e in enumerate(body.get("entry") or [])]
    _lock_in_order(entries, repo)
    run: Run = lambda entry: handle(_request(entry, base, access), repo, base)  # noqa: E731
    if kind == "transaction":
        _refuse_audit_writes(entries)
        _authorize(entries, repo, base, access)
        responses = _transaction(entries, repo, base, run) if savepoint else _run_transaction(entries, repo, base, run)
    else:
        responses = _batch(entries, repo, run)
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": f"{kind}-response",
        "entry": [_response_entry(r) for r in responses],
    }


def _refuse_audit_writes(entries: list[Entry]) -> None:
    """A transaction's creates do not pass ``handle``: an AuditEvent among them is refused here."""
    for entry in entries:
        with _at(entry):
            refuse_write(entry.method, entry.url)


def _authorize(entries: list[Entry], repo: Repository, base: str, access: Access | None) -> None:
    """Check a transaction's entries as the requests they are, in the client's compartment too, and
    its conditional references as the searches they are (its creates and references do not pass
    ``handle``): one refusal refuses it whole, before anything runs."""
    if access is None:
        return
    for entry in entries:
        with _at(entry):
            request = _request(entry, base, access)
            authorize(request)
            confine(request, repo.conn)
            for ref in _conditional_references(entry.resource):
                rtype, _, query = ref.partition("?")
                authorize(FhirRequest("GET", rtype, conditional.parse_qsl(query), access=access))


def _entry(index: int, raw: Any) -> Entry:
    """An entry of the Bundle, its JSON types checked (R4 bundle.html: request.method a code,
    request.url a uri, its headers strings, fullUrl a uri, resource a resource)."""
    at = f"Bundle.entry[{index}]"
    request = raw.get("request") if isinstance(raw, dict) else None
    method = request.get("method") if isinstance(request, dict) else None
    if not isinstance(request, dict) or not isinstance(method, str) or method not in ORDER or not request.get("url"):
        raise error(400, "invalid", f"Entry {index} needs request.method and request.url", at)
    headers = {
        header: request[key]
        for key, header in (("ifMatch", "if-match"), ("ifNoneExist", "if-none-exist"),
                            ("ifNoneMatch", "if-none-match"), ("ifModifiedSince", "if-modified-since"))
        if request.get(key)
    }  # fmt: skip
    resource, full_url = raw.get("resource"), raw.get("fullUrl")
    for name, value in [("request.url", request["url"]), ("fullUrl", full_url), *headers.items()]:
        if value is not None and not isinstance(value, str):
            raise error(400, "invalid", f"Entry {index}: {name} must be a string", f"{at}.{name}")
    if resource is not None and not isinstance(resource, dict):
        raise error(400, "invalid", f"Entry {index}: resource must be a JSON object", f"{at}.resource")
    return Entry(index, method, request["url"].lstrip("/"), full_url, resource, headers)


def _lock_in_order(entries: list[Entry], repo: Repository) -> None:
    """Take every lock the entries will need, sorted, before processing any of them.

    Locks are held until the database transaction ends, and a batch shares one database
    transaction too. Two Bundles that take the same locks in opposite orders (conditional
    creates of Patients A then B, and B then A) would deadlock on PostgreSQL; taking them
    in one global order first cannot. Taking a lock again later is harmless (re-entrant).
    """
    keys: set[str] = set()
    for entry in entries:
        rtype, _, query = entry.url.partition("?")
        if entry.method == "POST" and entry.headers.get("if-none-exist"):
            keys.add(conditional.criteria_key(rtype, entry.headers["if-none-exist"]))
        elif entry.method in ("PUT", "DELETE") and query:
            keys.add(conditional.criteria_key(rtype, query))
        elif entry.method == "PUT" and rtype.count("/") == 1:
            keys.add(rtype)  # Repository.update's key
        if entry.resource is not None:
            keys.update(conditional.criteria_key(*ref.split("?", 1)) for ref in _conditional_references(entry.resource))
    repo.lock_all(sorted(keys))


def _conditional_references(value: Any) -> Iterator[str]:
    """Every ``Type?criteria`` reference in a resource."""
    if isinstance(value, dict):
        ref = value.get("reference")
        if isinstance(ref, str) and "?" in ref and ref.split("?")[0] in SUPPORTED_TYPES:
            yield ref
        for v in value.values():
            yield from _conditional_references(v)
    elif isinstance(value, list):
        for v in value:
            yield from _conditional_references(v)


def _request(entry: Entry, base: str, access: Access | None) -> FhirRequest:
    parts = urlsplit(entry.url)
    path = parts.path
    if path.startswith(base):
        path = path[len(base) :]
    params = conditional.parse_qsl(parts.query)
    return FhirRequest(entry.method, path.strip("/"), params, dict(entry.headers), entry.resource, access)


def _batch(entries: list[Entry], repo: Repository, run: Run) -> list[FhirResponse]:
    responses = []
    for entry in entries:
        savepoint = repo.conn.begin_nested()
        response = run(entry)
        if response.status >= 400:
            savepoint.rollback()
        else:
            savepoint.commit()
        responses.append(response)
    return responses


def _transaction(entries: list[Entry], repo: Repository, base: str, run: Run) -> list[FhirResponse]:
    """Run a transaction all or nothing (http.html#transaction).

    It runs in a savepoint of its own, so a failed transaction undoes its writes even when
    the caller (an HL7 or worker door, not only the HTTP adapter) goes on to commit its own
    transaction, e.g. to log the failure.
    """
    savepoint = repo.conn.begin_nested()
    try:
        responses = _run_transaction(entries, repo, base, run)
    except BaseException:
        savepoint.rollback()
        raise
    savepoint.commit()
    return responses


def _run_transaction(entries: list[Entry], repo: Repository, base: str, run: Run) -> list[FhirResponse]:
    responses: dict[int, FhirResponse] = {}
    # DELETEs come first (http.html#trules step 1), before conditional creates and updates
    # are matched: a resource this transaction deletes must not satisfy an If-None-Exist.
    for entry in entries:
        if entry.method == "DELETE":
            with _at(entry):
                responses[entry.index] = _succeeded(run(entry))
    # Every conditional create's, update's and reference's criteria that a direct token lookup
    # answers, in one query: nothing is written between here and the end of _rewrite.
    known = conditional.prefetch(repo, _all_criteria(entries))
    ids = _assign_ids(entries, repo, known)
    for entry in entries:
        if entry.resource is not None:
            with _at(entry):
                entry.resource = _rewrite(entry.resource, ids, repo, entries, known)
    # Then POST, PUT/PATCH, GET/HEAD; sorted() is stable, so Bundle order holds within each.
    for entry in sorted((e for e in entries if e.method != "DELETE"), key=lambda e: ORDER[e.method]):
        with _at(entry):
            if entry.method == "POST" and entry.target:
                rtype, rid = entry.target.split("/")
                if entry.existing:
                    # Matched under the criteria's lock in this transaction: no need to read it again.
                    stored, status = entry.stored or repo.read(rtype, rid), 200
                else:
                    stored, status = repo.create(entry.resource or {}, rid), 201
                headers = {**version_headers(stored), "Location": f"{base}/{rtype}/{rid}/_history/{stored.version}"}
                response = FhirResponse(status, orjson.Fragment(stored.content or "{}"), headers)
            else:
                response = _succeeded(run(entry))
            responses[entry.index] = response
    return [responses[e.index] for e in entries]


def _succeeded(response: FhirResponse) -> FhirResponse:
    """The response of a transaction entry, or its OperationOutcome raised: one failure fails all."""
    if response.status < 400:
        return response
    issues = [
        Issue(i.get("code", "processing"), i.get("diagnostics", ""), i.get("severity", "error"),
              tuple(i.get("expression", ())))
        for i in (response.body or {}).get("issue", [])
    ]  # fmt: skip
    raise FhirError(response.status, issues, dict(response.headers))


@contextmanager
def _at(entry: Entry) -> Iterator[None]:
    """Name the entry in every issue of an error raised while processing it.

    Expressions relative to the entry's resource (``Task.intent``) become relative to the
    Bundle (``Bundle.entry[2].resource.intent``) so the client can find the culprit.
    """
    try:
        yield
    except FhirError as exc:
        where = f"Bundle.entry[{entry.index}]"
        rtype = (entry.resource or {}).get("resourceType")

        def rebase(expression: str) -> str:
            if isinstance(rtype, str) and expression.startswith(f"{rtype}."):
                return f"{where}.resource{expression[len(rtype) :]}"
            return where

        issues = [
            Issue(i.code, f"Entry {entry.index} ({entry.method} {entry.url}): {i.diagnostics}", i.severity,
                  tuple(dict.fromkeys(rebase(e) for e in i.expression or (where,))))
            for i in exc.issues
        ]  # fmt: skip
        raise FhirError(exc.status, issues, exc.headers) from None


def _criteria(query: str) -> tuple[tuple[str, str], ...]:
    """Search criteria in one canonical form, however they were percent-encoded or ordered."""
    return tuple(sorted(conditional.parse_qsl(query)))


def _all_criteria(entries: list[Entry]) -> Iterator[tuple[str, str]]:
    """``(type, query string)`` of every conditional create, update and reference of the entries."""
    for entry in entries:
        rtype, _, query = entry.url.partition("?")
        if entry.method == "POST" and entry.headers.get("if-none-exist"):
            yield rtype, entry.headers["if-none-exist"]
        elif entry.method == "PUT" and query:
            yield rtype, query
        if entry.resource is not None:
            for ref in _conditional_references(entry.resource):
                ref_type, _, ref_query = ref.partition("?")
                yield ref_type, ref_query


def _matches(repo: Repository, rtype: str, query: str, known: dict[tuple[str, str], list[Stored]]) -> list[Stored]:
    found = known.get((rtype, query))
    return conditional.matches(repo, rtype, query) if found is None else found


def _assign_ids(entries: list[Entry], repo: Repository, known: dict[tuple[str, str], list[Stored]]) -> dict[str, str]:
    """Decide the target of every POST and PUT before anything is written.

    Conditional creates (``ifNoneExist``) and conditional updates (``PUT Type?criteria``,
    http.html#cond-update) are matched here, under the criteria's lock, so other entries
    can refer to them by ``fullUrl`` and by the same conditional reference. A matched
    conditional update becomes an update of that id; an unmatched one an update-as-create.
    """
    ids: dict[str, str] = {}
    for entry in entries:
        if entry.method not in ("POST", "PUT"):
            continue
        with _at(entry):
            rtype, _, query = entry.url.partition("?")
            if entry.method == "POST":
                if rtype not in SUPPORTED_TYPES:
                    raise error(400, "invalid", f"POST to {entry.url!r} is not a create")
                if (entry.resource or {}).get("resourceType") != rtype:
                    raise error(400, "invalid", f"POST to {rtype} needs a {rtype} resource", "resourceType")
                query = entry.headers.get("if-none-exist", "")
                found = _matches(repo, rtype, query, known) if query else []
                if len(found) > 1:
                    raise error(412, "duplicate", f"If-None-Exist {query} matches {len(found)} resources")
                entry.stored = found[0] if found else None
                # Two entries of one Bundle with the same criteria make one resource, not two.
                twin = None if found or not query else _twin(entries, entry, rtype, query)
                entry.existing = bool(found) or twin is not None
                entry.target = twin or f"{rtype}/{found[0].id if found else uuid.uuid4()}"
            elif query:
                found = _matches(repo, rtype, query, known)
                if len(found) > 1:
                    raise error(412, "multiple-matches", f"The criteria {query} match {len(found)} resources")
                body_id = (entry.resource or {}).get("id")
                rid = found[0].id if found else (body_id or str(uuid.uuid4()))
                if found and body_id not in (None, rid):
                    raise error(400, "invalid", f"The body's id {body_id!r} is not the matched {rid!r}", "id")
                entry.target = entry.url = f"{rtype}/{rid}"
                if isinstance(entry.resource, dict):
                    entry.resource = {**entry.resource, "id": rid}
            elif rtype.count("/") == 1:
                entry.target = rtype
            if query:
                entry.criteria = _criteria(query)
            if entry.full_url and entry.target:
                ids[entry.full_url] = entry.target
    return ids


def _twin(entries: list[Entry], entry: Entry, rtype: str, query: str) -> str | None:
    """The target of an earlier conditional create of this Bundle with the same criteria."""
    wanted = _criteria(query)
    for other in entries:
        if other is entry:
            return None
        if other.target and other.target.split("/")[0] == rtype and other.criteria == wanted:
            return other.target
    return None


def _rewrite(
    value: Any, ids: dict[str, str], repo: Repository, entries: list[Entry], known: dict[tuple[str, str], list[Stored]]
) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, ids, repo, entries, known) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str):
            if ref in ids:
                out["reference"] = ids[ref]
            elif "?" in ref and ref.split("?")[0] in SUPPORTED_TYPES:
                out["reference"] = _conditional_reference(ref, repo, entries, known)
            elif ref.startswith("urn:uuid:"):
                raise error(400, "invalid", f"Reference {ref} names no entry of this Bundle")
        return out
    if isinstance(value, list):
        return [_rewrite(v, ids, repo, entries, known) for v in value]
    return value


def _conditional_reference(
    ref: str, repo: Repository, entries: list[Entry], known: dict[tuple[str, str], list[Stored]]
) -> str:
    """Resolve ``Type?criteria`` to the one resource it matches (http.html#trules).

    A resource this very transaction creates by a conditional create or update with the
    same criteria counts as a match, so a Bundle can create a Patient and refer to it
    conditionally. Criteria compare decoded and in any order.
    """
    rtype, _, query = ref.partition("?")
    found = [f"{s.type}/{s.id}" for s in _matches(repo, rtype, query, known)]
    if not found:
        wanted = _criteria(query)
        found = [e.target for e in entries if e.target and e.target.split("/")[0] == rtype
                 and e.criteria == wanted]  # fmt: skip
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
