"""HTTP adapter: request in, ``router.handle`` in one database transaction, response out.

The FHIR base is one plain Starlette route on the application (FastAPI's dependency
solving and response models have nothing to do for a catch-all route, and cost a fifth of
a read by id).
"""

import asyncio
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qsl

import orjson
from sqlalchemy.exc import IntegrityError, OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from fhir_server.db import Database
from fhir_server.errors import FhirError, error
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.repository import Hook, Repository
from fhir_server.router import handle, reads_one_row

FHIR_JSON = "application/fhir+json"
JSON_TYPES = (FHIR_JSON, "application/json", "application/json+fhir")
READ_METHODS = {"GET", "HEAD"}
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]
#: PostgreSQL's deadlock_detected and serialization_failure: the request lost a race and
#: was rolled back whole; the client can simply retry it (R4 http.html: 409 Conflict).
RETRYABLE_SQLSTATES = {"40P01", "40001"}
log = logging.getLogger(__name__)


def mount(app: Starlette, db: Database, hooks: Sequence[Hook] = (), base_url: str = "", prefix: str = "/fhir") -> None:
    """Serve the FHIR REST API of ``db`` under ``prefix``."""
    # A read of one resource (version) is one SELECT: it runs outside a transaction and,
    # on SQLite, on the event loop itself, where it takes less time than handing it to a
    # thread would. Other SQLite work runs on threads of its own: one writer (SQLite has
    # one writer; threads queueing for it only fight over the GIL) and a few readers.
    # PostgreSQL work (round trips, many concurrent writers) uses the shared thread pool.
    sqlite = db.engine.dialect.name == "sqlite"
    sqlite_threads = (
        {
            True: ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer"),
            False: ThreadPoolExecutor(4, thread_name_prefix="sqlite-reader"),
        }
        if sqlite
        else None
    )

    def read_one(req: FhirRequest, base: str) -> FhirResponse:
        with db.autocommit() as conn:
            return handle(req, Repository(conn, hooks), base)

    def run(req: FhirRequest, base: str, write: bool) -> FhirResponse:
        try:
            if reads_one_row(req):
                return read_one(req, base)
            with db.begin(write=write) as conn:
                repo = Repository(conn, hooks)
                response = handle(req, repo, base)
                if response.status >= 400:
                    conn.rollback()  # nothing half-written: an error undoes the whole request
                    return response
                repo.complete()
                return response
        except FhirError as exc:  # deferred work refused the request: all of it was rolled back
            return _outcome(exc)
        except IntegrityError:
            log.warning("conflicting concurrent write on %s %s", req.method, req.path, exc_info=True)
            return _outcome(error(409, "conflict", "A concurrent request changed the same resource; retry"))
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) not in RETRYABLE_SQLSTATES:
                log.exception("database error on %s %s", req.method, req.path)
                return _outcome(error(500, "exception", "Internal server error; see the server log"))
            log.warning("concurrent requests deadlocked on %s %s", req.method, req.path, exc_info=True)
            return _outcome(error(409, "conflict", "A concurrent request held what this one needed; retry"))
        except Exception:  # like pynetdicom: a failure status, never a dead server or a stack trace
            log.exception("internal error on %s %s", req.method, req.path)
            return _outcome(error(500, "exception", "Internal server error; see the server log"))

    async def fhir(request: Request) -> Response:
        base = base_url or _base(request, prefix)
        try:
            req = FhirRequest(
                method=request.method,
                path=request.path_params["path"],
                params=list(request.query_params.multi_items()),
                headers=dict(request.headers),  # Starlette's names are lower case already
            )
            if req.method not in READ_METHODS:
                await _read_body(request, req)
        except FhirError as exc:
            return _http(_outcome(exc), request)
        # POST _search reads, everything else that is not GET/HEAD may write.
        write = req.method not in READ_METHODS and not req.path.endswith("_search")
        if sqlite and reads_one_row(req):
            return _http(run(req, base, write), request)
        if sqlite_threads is None:
            return _http(await run_in_threadpool(run, req, base, write), request)
        threads = sqlite_threads[write]
        return _http(await asyncio.get_running_loop().run_in_executor(threads, run, req, base, write), request)

    app.add_route(f"{prefix}/{{path:path}}", fhir, methods=METHODS)


def _base(request: Request, prefix: str) -> str:
    """The FHIR base the client reached us by (what ``request.url`` would give, cheaper)."""
    scope = request.scope
    host = request.headers.get("host") or "{}:{}".format(*scope["server"])
    return f"{scope['scheme']}://{host}{scope.get('root_path', '')}{prefix}"


def _outcome(exc: FhirError) -> FhirResponse:
    return FhirResponse(exc.status, exc.outcome, dict(exc.headers))


async def _read_body(request: Request, req: FhirRequest) -> None:
    body = await request.body()
    if not body:
        return
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/x-www-form-urlencoded" and req.path.endswith("_search"):
        req.params += parse_qsl(body.decode(), keep_blank_values=True)
        return
    if content_type not in JSON_TYPES:
        raise error(415, "not-supported", f"Content-Type {content_type or 'none'} is not supported; use {FHIR_JSON}")
    try:
        req.body = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise error(400, "structure", f"The body is not valid JSON: {exc}") from None


def _http(response: FhirResponse, request: Request) -> Response:
    content = b"" if response.body is None else orjson.dumps(response.body, option=_pretty(request))
    if request.method == "HEAD":
        content = b""
    return Response(content or None, response.status, response.headers, media_type=FHIR_JSON if content else None)


def _pretty(request: Request) -> int:
    return orjson.OPT_INDENT_2 if request.query_params.get("_pretty") == "true" else 0
