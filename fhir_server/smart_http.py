"""SMART Backend Services over HTTP: the discovery document, the token endpoint, the bearer check.

``GET [base]/.well-known/smart-configuration`` (SMART App Launch 2.x §"SMART on FHIR
configuration"), ``POST [base]/auth/token`` (Backend Services), ``GET [base]/metadata`` with
``rest.security`` naming the token endpoint (the ``oauth-uris`` extension). ``BearerAuth`` answers
every other request without a valid access token 401 (RFC 6750 §3) and hands the core the
token's ``Access`` (in ``request.state.access``); the open routes are these three.
"""

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fhir_server import capability, scopes
from fhir_server.errors import error
from fhir_server.smart import ALGORITHMS, InvalidToken, Smart, TokenError

FHIR_JSON = "application/fhir+json"
TOKEN_PATH = "/auth/token"
CONFIGURATION_PATH = "/.well-known/smart-configuration"
OAUTH_URIS = "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
SCOPES_SUPPORTED = ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write", "system/*.*",
                    "system/hl7.r", "system/hl7.u", "system/hl7.*"]  # fmt: skip
#: A token request is a few fields and a signed JWT of a few kilobytes.
MAX_FORM_BYTES = 64 * 1024
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


Open = frozenset[tuple[str, str]]


def open_routes(prefix: str = "/fhir") -> Open:
    """The (method, path) answered without a token: the capability statement and how to get a token.
    By method too: another method on these paths would reach the FHIR API's catch-all route."""
    reads = [(m, prefix + p) for m in ("GET", "HEAD") for p in ("/metadata", CONFIGURATION_PATH)]
    return frozenset([*reads, ("POST", prefix + TOKEN_PATH)])


def routes(smart: Smart, prefix: str = "/fhir", base_url: str = "") -> list[Route]:
    """The open routes of ``open_routes``; mount them before the FHIR API's catch-all route."""

    def base(request: Request) -> str:
        return base_url.rstrip("/") or str(request.base_url).rstrip("/") + prefix

    async def configuration(request: Request) -> Response:
        return JSONResponse(configuration_document(base(request) + TOKEN_PATH))

    async def metadata(request: Request) -> Response:
        statement = capability.statement(base(request))
        statement["rest"][0]["security"] = security(base(request) + TOKEN_PATH)
        return Response(orjson.dumps(statement), media_type=FHIR_JSON)

    async def token(request: Request) -> Response:
        try:
            if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
                raise TokenError("invalid_request", "The body must be application/x-www-form-urlencoded")
            form = await _form(request)
            granted = await run_in_threadpool(smart.token, form, base(request) + TOKEN_PATH)
        except TokenError as exc:
            request.state.token_error = f"{exc.code}: {exc.description}"  # for the audit trail
            return _token_error(exc)
        request.state.token_client = granted.client_id
        return JSONResponse(granted.json(), headers=NO_STORE)

    return [
        Route(prefix + CONFIGURATION_PATH, configuration, methods=["GET"]),
        Route(prefix + "/metadata", metadata, methods=["GET"]),
        Route(prefix + TOKEN_PATH, token, methods=["POST"]),
    ]


async def _form(request: Request) -> dict[str, str]:
    """The form body's fields; each at most once (RFC 6749 §3.2), the body at most MAX_FORM_BYTES."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise TokenError("invalid_request", f"The body may have at most {MAX_FORM_BYTES} bytes")
    try:
        fields = parse_qsl(body.decode(), keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise TokenError("invalid_request", "The body is not a UTF-8 form") from None
    form = dict(fields)
    if len(form) != len(fields):
        raise TokenError("invalid_request", "A parameter was sent more than once")
    return form


def configuration_document(token_url: str) -> dict[str, Any]:
    return {
        "token_endpoint": token_url,
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "grant_types_supported": ["client_credentials"],
        "scopes_supported": SCOPES_SUPPORTED,
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    }


def security(token_url: str) -> dict[str, Any]:
    """CapabilityStatement.rest.security of a SMART server (SMART App Launch 2.x, "Conformance")."""
    smart = {"system": "http://terminology.hl7.org/CodeSystem/restful-security-service", "code": "SMART-on-FHIR"}
    return {
        "extension": [{"url": OAUTH_URIS, "extension": [{"url": "token", "valueUri": token_url}]}],
        "service": [{"coding": [smart]}],
        "description": "SMART Backend Services: client_credentials with a private_key_jwt assertion",
    }


def _token_error(exc: TokenError) -> Response:
    headers = dict(NO_STORE)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="overread"'
    return JSONResponse({"error": exc.code, "error_description": exc.description}, exc.status, headers)


class BearerAuth:
    """ASGI middleware: every HTTP request but those of ``open`` routes needs ``Authorization: Bearer``."""

    def __init__(self, app: ASGIApp, smart: Smart, open: Open) -> None:
        self.app, self.smart, self.open = app, smart, open

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.open:
            await self.app(scope, receive, send)
            return
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        kind, _, token = authorization.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            await _unauthorized("This server needs an access token (Authorization: Bearer)", "")(scope, receive, send)
            return
        try:
            access = self.smart.access(token.strip())
        except InvalidToken as exc:
            await _unauthorized(str(exc), ', error="invalid_token"')(scope, receive, send)
            return
        scope.setdefault("state", {})["access"] = access
        await self.app(scope, receive, send)


def _unauthorized(diagnostics: str, challenge: str) -> Response:
    body = error(401, "login", diagnostics).outcome
    headers = {"WWW-Authenticate": f'Bearer realm="overread"{challenge}'}
    return Response(orjson.dumps(body), 401, headers, media_type=FHIR_JSON)


def area_guard(area: str) -> Callable[[Request], None]:
    """A FastAPI dependency for the routes of one of this server's areas (``scopes.AREAS``): reading
    needs ``system/<area>.r``, anything else ``system/<area>.u``; 403 otherwise. No Access: auth is off."""
    from fastapi import HTTPException

    def guard(request: Request) -> None:
        access = getattr(request.state, "access", None)
        needed = "r" if request.method in ("GET", "HEAD") else "u"
        if access is not None and not scopes.allows(access.scopes, needed, area):
            raise HTTPException(403, f"The access token's scopes do not allow this; it needs system/{area}.{needed}")

    return guard
