"""The FHIR RESTful API (R4 http.html) as a function: ``handle(request, repo, base)``.

It knows nothing of HTTP servers: FastAPI (``fhir_server.api``) and transaction Bundles
(``fhir_server.bundle``) both call it. Every failure comes back as an OperationOutcome.
"""

import uuid
from typing import Any
from urllib.parse import urlencode

import orjson
from sqlalchemy import func, select

from fhir_server import access, bundle, capability, compartment, conditional, dates, limits, operations, search
from fhir_server.audit_log import refuse_write
from fhir_server.errors import FhirError, error, information
from fhir_server.http import FhirRequest, FhirResponse, version_headers
from fhir_server.patch import patch
from fhir_server.repository import Repository, Stored, readable
from fhir_server.schema import VersionRow
from fhir_server.stored import ReadTarget
from fhir_server.validation import SUPPORTED_TYPES, check_type

DEFAULT_HISTORY_COUNT = 50


def handle(request: FhirRequest, repo: Repository, base: str) -> FhirResponse:
    """Dispatch one interaction. Raises nothing: errors become OperationOutcome responses."""
    try:
        limits.check_params(request.params)
        return _dispatch(request, repo, base.rstrip("/"))
    except FhirError as exc:
        return FhirResponse.of(exc)


def read_target(req: FhirRequest) -> ReadTarget | None:
    """The resource (version) of a read or vread, one SELECT of one row and nothing else; else None."""
    if req.method not in ("GET", "HEAD"):
        return None
    parts = req.path.strip("/").split("/")
    if len(parts) == 2 and parts[1][:1] not in ("_", "$"):
        return ReadTarget(parts[0], parts[1], None)
    if len(parts) == 4 and parts[2] == "_history" and (version := _version(parts[3])) is not None:
        return ReadTarget(parts[0], parts[1], version)
    return None


def _version(vid: str) -> int | None:
    """A version id this server can have given (R4 http.html#vread), else None."""
    try:
        return limits.version_id(vid)
    except FhirError:
        return None


def read_response(req: FhirRequest, target: ReadTarget, found: Stored | None, base: str) -> FhirResponse:
    """The answer to a read or vread of ``target`` that found ``found`` (``handle``'s answer, for a
    caller that ran the SELECT itself: ``fhir_server.executor``)."""
    try:
        limits.check_params(req.params)
        check_type(target.type)
        access.authorize(req)
        access.confine(req, None)
        return _read(req, readable(*target, found), base)
    except FhirError as exc:
        return FhirResponse.of(exc)


def _dispatch(req: FhirRequest, repo: Repository, base: str) -> FhirResponse:
    parts = req.parts
    method = req.method.upper()
    refuse_write(method, req.path)
    access.authorize(req)
    access.confine(req, repo.conn)
    match parts, method:
        case [], "POST":
            return FhirResponse(200, bundle.process(req.body, repo, base, handle, access=req.access))
        case [], "GET" | "HEAD":
            return _search(repo, base, req, "")
        case ["_search"], "POST":
            return _search(repo, base, req, "")
        case ["metadata"], "GET":
            return FhirResponse(200, capability.statement(base))
        case ["_history"], "GET":
            return _history(repo, base, req, None, None)
        case [rtype], _ if rtype in SUPPORTED_TYPES or rtype[:1].isupper():
            check_type(rtype)
            match method:
                case "GET":
                    return _search(repo, base, req, rtype)
                case "POST":
                    return _create(repo, base, req, rtype)
                case "PUT":
                    return _conditional_update(repo, base, req, rtype)
                case "DELETE":
                    return _conditional_delete(repo, req, rtype)
                case "PATCH":
                    return _conditional_patch(repo, base, req, rtype)
        case [rtype, name], _ if name.startswith("$"):
            check_type(rtype)
            return operations.type_level(repo, req, rtype, name)
        case [rtype, "_search"], "POST":
            return _search(repo, base, req, rtype)
        case [rtype, "_history"], "GET":
            check_type(rtype)  # an unknown type has no history: 404, not an empty Bundle
            return _history(repo, base, req, rtype, None)
        case [rtype, rid], _ if not rid.startswith("_") and not rid.startswith("$"):
            match method:
                case "GET" | "HEAD":
                    return _read(req, repo.read(rtype, rid), base)
                case "PUT":
                    stored, created = repo.update(rtype, rid, _body(req), req.header("if-match"))
                    return _written(req, stored, base, 201 if created else 200)
                case "PATCH":
                    check_type(rtype)
                    return _written(req, patch(repo, rtype, rid, req.body, req.header("if-match")), base, 200)
                case "DELETE":
                    check_type(rtype)
                    if repo.current(rtype, rid) is None:
                        raise error(404, "not-found", f"{rtype}/{rid} is not known")
                    deleted = repo.delete(rtype, rid, req.header("if-match"))
                    headers = {"ETag": deleted.etag} if deleted else {}
                    return FhirResponse(200, information(f"Deleted {rtype}/{rid}"), headers, deleted)
        case [rtype, rid, name], _ if name.startswith("$"):
            check_type(rtype)
            return operations.instance(repo, req, rtype, rid, name)
        case [rtype, rid, "_history"], "GET":
            check_type(rtype)
            if repo.current(rtype, rid) is None:
                raise error(404, "not-found", f"{rtype}/{rid} is not known")
            return _history(repo, base, req, rtype, rid)
        case [rtype, rid, "_history", vid], "GET":
            return _read(req, repo.vread(rtype, rid, limits.version_id(vid)), base)
    if parts and parts[0] not in SUPPORTED_TYPES and parts[0] not in ("metadata", "_history"):
        check_type(parts[0])
    raise error(405, "not-supported", f"{method} /{req.path} is not an interaction this server supports")


def _body(req: FhirRequest) -> dict[str, Any]:
    if not isinstance(req.body, dict):
        raise error(400, "structure", "This interaction needs a FHIR resource as its JSON body")
    return req.body


def _location(base: str, stored: Stored) -> str:
    return f"{base}/{stored.type}/{stored.id}/_history/{stored.version}"


def _read(req: FhirRequest, stored: Stored, base: str) -> FhirResponse:
    if not access.may_read(req.access, stored):  # answered as missing: the answer tells nothing
        readable(stored.type, stored.id, target.version if (target := read_target(req)) else None, None)
    if req.header("if-none-match") in (stored.etag, f'"{stored.version}"'):
        return FhirResponse(304, None, version_headers(stored), stored)
    elements = access.view(req.access, stored.type, _elements(req))
    body: Any = orjson.Fragment(stored.content or "{}")
    if elements is not None or any(k == "_summary" for k, _ in req.params):
        body = search.shape(stored.resource, dict(req.params).get("_summary"), elements)
    return FhirResponse(200, body, version_headers(stored), stored)


def _elements(req: FhirRequest) -> list[str] | None:
    for key, value in req.params:
        if key == "_elements":
            return [e.strip() for e in value.split(",") if e.strip()]
    return None


def _written(req: FhirRequest, stored: Stored, base: str, status: int) -> FhirResponse:
    """The response to a create or update, shaped by Prefer: return= (R4 http.html#ops)."""
    headers = {**version_headers(stored), "Location": _location(base, stored)}
    match req.prefer("return"):
        case "minimal":
            return FhirResponse(status, None, headers, stored)
        case "OperationOutcome":
            stored_text = information(f"Stored {stored.type}/{stored.id} version {stored.version}")
            return FhirResponse(status, stored_text, headers, stored)
    return FhirResponse(status, orjson.Fragment(stored.content or "{}"), headers, stored)


def _create(repo: Repository, base: str, req: FhirRequest, rtype: str) -> FhirResponse:
    resource = _body(req)
    if resource.get("resourceType") != rtype:
        raise error(400, "invalid", f"Expected a {rtype} but the body is a {resource.get('resourceType')}")
    if_none_exist = req.header("if-none-exist")
    if if_none_exist:
        found = conditional.matches(repo, rtype, if_none_exist)
        if len(found) > 1:
            raise error(412, "duplicate", f"If-None-Exist {if_none_exist} matches {len(found)} resources")
        if found:
            return _written(req, found[0], base, 200)
    return _written(req, repo.create({k: v for k, v in resource.items() if k != "id"}), base, 201)


def _conditional_update(repo: Repository, base: str, req: FhirRequest, rtype: str) -> FhirResponse:
    resource = _body(req)
    found = conditional.matches(repo, rtype, urlencode(req.params))
    if len(found) > 1:
        raise error(412, "multiple-matches", f"The criteria match {len(found)} resources")
    if found:
        rid = found[0].id
        if resource.get("id", rid) != rid:
            raise error(400, "invalid", f"The body's id {resource['id']!r} is not the matched {rid!r}")
    else:
        rid = resource.get("id") or str(uuid.uuid4())
    stored, created = repo.update(rtype, rid, {**resource, "id": rid}, req.header("if-match"))
    return _written(req, stored, base, 201 if created else 200)


def _conditional_patch(repo: Repository, base: str, req: FhirRequest, rtype: str) -> FhirResponse:
    """``PATCH [type]?[criteria]``: the one match is patched; none is 404, several 412 (R4 http.html#patch)."""
    found = conditional.matches(repo, rtype, urlencode(req.params))
    if len(found) > 1:
        raise error(412, "multiple-matches", f"The criteria match {len(found)} resources")
    if not found:
        raise error(404, "not-found", f"No {rtype} matches the criteria")
    return _written(req, patch(repo, rtype, found[0].id, req.body, req.header("if-match")), base, 200)


def _conditional_delete(repo: Repository, req: FhirRequest, rtype: str) -> FhirResponse:
    found = conditional.matches(repo, rtype, urlencode(req.params))
    if len(found) > 1:
        raise error(412, "multiple-matches", f"The criteria match {len(found)} resources")
    if not found:
        return FhirResponse(204)
    deleted = repo.delete(rtype, found[0].id)
    return FhirResponse(200, information(f"Deleted {rtype}/{found[0].id}"), about=deleted)


def _search(repo: Repository, base: str, req: FhirRequest, rtype: str) -> FhirResponse:
    """Search one type, or the whole system when ``rtype`` is "" (R4 http.html#search)."""
    strict = req.prefer("handling") == "strict"
    query = search.parse(rtype, req.params, strict=strict, base=base)
    access.authorize_query(req.access, query, repo.conn)
    result = search.execute(repo.conn, query)
    result.included = [s for s in result.included if access.may_read(req.access, s)]
    return FhirResponse(200, search.bundle(result, base))


def _history(repo: Repository, base: str, req: FhirRequest, rtype: str | None, rid: str | None) -> FhirResponse:
    """Instance, type and system history (R4 http.html#history), newest first, paged."""
    count, offset, since = DEFAULT_HISTORY_COUNT, 0, None
    for key, value in req.params:
        if key == "_count":
            count = min(limits.whole(key, value), search.MAX_COUNT)
        elif key == "_offset":
            offset = limits.whole(key, value)
        elif key == "_since":
            try:
                since = dates.parse_range(value)[0]
            except ValueError as exc:
                raise error(400, "invalid", str(exc), "_since") from None
    v = VersionRow
    stmt = select(v.type, v.id, v.version, v.last_updated, v.content, v.method)
    stmt = stmt.where(VersionRow.type == rtype) if rtype else stmt.where(VersionRow.type.not_in(search.APART))
    if rid:
        stmt = stmt.where(VersionRow.id == rid)
    if since:
        stmt = stmt.where(VersionRow.last_updated >= since)
    if (held := compartment.of(req.access)) is not None:
        stmt = stmt.where(held.at(repo.conn).within(VersionRow.resource_pk, rtype))
    total = repo.conn.scalar(select(func.count()).select_from(stmt.subquery()))
    rows = repo.conn.execute(
        stmt.order_by(v.last_updated.desc(), v.resource_pk.desc(), v.version.desc()).limit(count).offset(offset)
    ).all()
    path = "/".join(p for p in (rtype, rid, "_history") if p)
    kept = [(k, v) for k, v in req.params if k not in ("_offset",)]
    entries = []
    for row in rows:
        stored = Stored(*row[:5])
        entry: dict[str, Any] = {"fullUrl": f"{base}/{row.type}/{row.id}"}
        if row.content is not None:
            entry["resource"] = orjson.Fragment(row.content)
        method = "DELETE" if row.method == "DELETE" else ("POST" if row.version == 1 else "PUT")
        entry["request"] = {"method": method, "url": row.type if method == "POST" else f"{row.type}/{row.id}"}
        entry["response"] = {
            "status": {"POST": "201 Created", "PUT": "200 OK", "DELETE": "204 No Content"}[method],
            "etag": stored.etag,
            "lastModified": dates.instant(row.last_updated),
        }
        entries.append(entry)
    return FhirResponse(200, search.page_bundle("history", base, path, kept, total, offset, count, entries))
