"""HTTP adapter: request in, ``router.handle`` as one unit of work, response out.

A unit is a database transaction of its own, or on SQLite, for a write, a savepoint in the
writer's group of requests queued at the same moment (``db.WriteGroups``).

The FHIR base is one plain Starlette route on the application: FastAPI's dependency
solving and response models have nothing to do for a catch-all route.
"""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl

import orjson
from sqlalchemy import Connection
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.applications import Starlette
from starlette.convertors import PathConvertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Lifespan

from fhir_server import balp, compartment, dates
from fhir_server.audit_log import READS, AuditLog, writes
from fhir_server.db import Rollback
from fhir_server.errors import FhirError, error
from fhir_server.executor import Executor
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.limits import DEFAULT, Limits, check_body
from fhir_server.patch import JSON_PATCH, MERGE_PATCH
from fhir_server.repository import Hook, Repository
from fhir_server.router import handle, read_response, read_target
from fhir_server.stored import ReadTarget

FHIR_JSON = "application/fhir+json"
JSON_TYPES = (FHIR_JSON, "application/json", "application/json+fhir", JSON_PATCH, MERGE_PATCH)
#: Bytes of body up to which a write of one resource is ``light``.
INLINE_BODY = 256 * 1024
#: Resources in a page up to which a search is ``light``.
LIGHT_PAGE = 100
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
#: PostgreSQL's deadlock_detected and serialization_failure: the request lost a race and
#: was rolled back whole; the client can simply retry it (R4 http.html: 409 Conflict).
RETRYABLE_SQLSTATES = {"40P01", "40001"}
log = logging.getLogger(__name__)


def mount(
    app: Starlette,
    executor: Executor,
    hooks: Sequence[Hook] = (),
    base_url: str = "",
    prefix: str = "/fhir",
    limits: Limits = DEFAULT,
    audit: AuditLog | None = None,
) -> None:
    """Serve the FHIR REST API of ``executor``'s database under ``prefix``, refusing requests over
    ``limits``; ``audit``: every write succeeded is audited in its transaction (the rest by ``audit_http``).

    Each request runs where ``executor`` puts it: a read of one resource as ``Executor.read``,
    anything else as one unit of ``Executor.run``; the application's lifespan keeps the executor
    ``opened``."""
    app.router.lifespan_context = _also(executor.opened, app.router.lifespan_context)

    def unit(req: FhirRequest, base: str) -> Callable[[Connection], FhirResponse]:
        def work(conn: Connection) -> FhirResponse:
            repo = Repository(conn, hooks, base)
            response = handle(req, repo, base)
            if response.status >= 400:
                raise Rollback(response)  # nothing half-written: an error undoes the whole request
            repo.complete()
            if audit is not None and writes(req):  # in the write's transaction: committed or undone with it
                audit.write(repo, balp.rest(req, response, dates.now(), balp.Agent.of(req.access, req.peer)))
            return response

        return work

    async def fhir(request: Request) -> Response:
        base = base_url or _base(request, prefix)
        try:
            req = FhirRequest(
                method=request.method,
                path=request.path_params.get("path", ""),
                params=list(request.query_params.multi_items()),
                headers=_headers(request, limits),
                access=getattr(request.state, "access", None),  # set by smart_http.BearerAuth when auth is on
                peer=request.client.host if request.client else None,
            )
            size = 0 if req.method in READS else await _read_body(request, req, limits)
        except FhirError as exc:
            return _http(FhirResponse.of(exc), request)
        response = await answer(req, base, size)
        request.state.fhir = (req, response)  # for the audit trail (fhir_server.audit_http)
        return _http(response, request)

    async def answer(req: FhirRequest, base: str, size: int) -> FhirResponse:
        # A client with a compartment: its read also asks whether the resource is in it, in a unit.
        if (target := read_target(req)) is not None and compartment.of(req.access) is None:
            return await _answered(req, _read(executor, req, target, base))
        return await _answered(req, executor.run(unit(req, base), write=writes(req), light=light(req, size)))

    # [base] itself, as FHIR clients write it (a transaction POSTed to ".../fhir"): no redirect to "/fhir/".
    app.add_route(prefix, fhir, methods=METHODS)
    app.add_route(f"{prefix}/{{path:{ANY_PATH}}}", fhir, methods=METHODS)


class _AnyPath(PathConvertor):
    """``path``, line breaks included: ``.*`` stops at one, so ``Patient/a%0A`` would read ``Patient/a``
    and ``Patient/%0Aa`` miss the route (the framework's 404, not an OperationOutcome)."""

    regex = "(?s:.*)"


ANY_PATH = "fhir_any_path"
register_url_convertor(ANY_PATH, _AnyPath())


def light(req: FhirRequest, body_size: int) -> bool:
    """Whether a request may run on the event loop (``Executor.run(light=True)``), where it holds up
    other requests while it runs: a write of one resource with a body of at most INLINE_BODY bytes,
    or a search of one type with a page of at most LIGHT_PAGE and no _include or _revinclude."""
    parts = req.path.strip("/").split("/")
    if req.method in READS:
        return _light_search(req, parts)
    if parts[-1] == "_search":
        return False  # POSTed search parameters: their page and includes are in the body
    return bool(parts[0]) and len(parts) <= 2 and not any(p.startswith("$") for p in parts) and body_size <= INLINE_BODY


def _light_search(req: FhirRequest, parts: list[str]) -> bool:
    if len(parts) != 1 or not parts[0][:1].isupper():
        return False  # not a search of a resource type: the system's history or search, an operation
    for name, value in req.params:
        if name.startswith(("_include", "_revinclude")):
            return False
        if name == "_count" and not (
            value.isascii() and value.isdigit() and len(value) <= 3 and int(value) <= LIGHT_PAGE
        ):
            return False
    return True


def _also(opened: Callable[[], AbstractAsyncContextManager[None]], lifespan: Lifespan[Any]) -> Lifespan[Any]:
    """The application's ``lifespan`` with ``opened()`` around it."""

    @asynccontextmanager
    async def both(app: Any) -> AsyncIterator[Any]:
        async with opened(), lifespan(app) as state:
            yield state

    return both


async def _answered(req: FhirRequest, pending: Awaitable[FhirResponse]) -> FhirResponse:
    """What ``pending`` answers, or the OperationOutcome of its exception (``_failure``)."""
    try:
        return await pending
    except Exception as exc:
        return _failure(exc, req)


async def _read(executor: Executor, req: FhirRequest, target: ReadTarget, base: str) -> FhirResponse:
    return read_response(req, target, await executor.read(target), base)


def _failure(exc: Exception, req: FhirRequest) -> FhirResponse:
    """The OperationOutcome of a request whose transaction (or savepoint) was rolled back."""
    if isinstance(exc, FhirError):  # deferred work refused the request
        return FhirResponse.of(exc)
    if isinstance(exc, IntegrityError):
        log.warning("conflicting concurrent write on %s %s", req.method, req.path, exc_info=True)
        return FhirResponse.of(error(409, "conflict", "A concurrent request changed the same resource; retry"))
    if isinstance(exc, OperationalError) and getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
        log.warning("concurrent requests deadlocked on %s %s", req.method, req.path, exc_info=True)
        return FhirResponse.of(error(409, "conflict", "A concurrent request held what this one needed; retry"))
    # like pynetdicom: a failure status, never a dead server or a stack trace
    log.error("internal error on %s %s", req.method, req.path, exc_info=exc)
    return FhirResponse.of(error(500, "exception", "Internal server error; see the server log"))


def _base(request: Request, prefix: str) -> str:
    """The FHIR base the client reached us by (what ``request.url`` would give, cheaper)."""
    scope = request.scope
    host = request.headers.get("host") or "{}:{}".format(*scope["server"])
    return f"{scope['scheme']}://{host}{scope.get('root_path', '')}{prefix}"


def _headers(request: Request, limits: Limits) -> dict[str, str]:
    """The request's headers by lower-case name, the first of repeated ones, within ``limits``
    (431, RFC 6585 §5). One pass over the raw list: ``dict(request.headers)`` looks each name
    up again from the start, quadratic in the header count."""
    raw: list[tuple[bytes, bytes]] = request.scope["headers"]
    if len(raw) > limits.max_headers:
        raise error(431, "too-costly", f"A request may have at most {limits.max_headers} header lines")
    if sum(len(k) + len(v) for k, v in raw) > limits.max_header_bytes:
        raise error(431, "too-costly", f"A request's headers may have at most {limits.max_header_bytes} bytes")
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in reversed(raw)}


async def _read_body(request: Request, req: FhirRequest, limits: Limits) -> int:
    """Read the body into ``req`` (a form ``_search``'s into its params); its size in bytes."""
    body = await _body(request, limits.max_body_bytes)
    if not body:
        return 0
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded" and req.path.endswith("_search"):
        try:
            req.params += parse_qsl(body.decode(), keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise error(400, "structure", "The form body is not UTF-8 (HTML 4.01 §17.13.4)") from None
        return len(body)
    if content_type not in JSON_TYPES:
        raise error(415, "not-supported", f"Content-Type {content_type or 'none'} is not supported; use {FHIR_JSON}")
    try:
        req.body = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise error(400, "structure", f"The body is not valid JSON: {exc}") from None
    check_body(req.body, limits)
    return len(body)


async def _body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (413) as soon as more than ``max_bytes`` arrived or were announced."""
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and (len(declared) > 15 or int(declared) > max_bytes):
        raise error(413, "too-costly", f"A request body may have at most {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise error(413, "too-costly", f"A request body may have at most {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _http(response: FhirResponse, request: Request) -> Response:
    content = b"" if response.body is None else orjson.dumps(response.body, option=_pretty(request))
    if request.method == "HEAD":
        content = b""
    return Response(content or None, response.status, response.headers, media_type=FHIR_JSON if content else None)


def _pretty(request: Request) -> int:
    return orjson.OPT_INDENT_2 if request.query_params.get("_pretty") == "true" else 0
