"""Every HTTP request audited: an ASGI middleware around the whole application.

It is the outermost layer, so it sees every answer, the bearer check's 401s included, and
records one AuditEvent per request once the answer is sent (``AuditLog.arecord``). The FHIR
route leaves its request and response in ``scope["state"]["fhir"]`` (``api.mount``); a
write that succeeded was audited in its own transaction there, and is not recorded again.
The token endpoint leaves the client it granted a token in ``scope["state"]["token_client"]``,
or why it refused one in ``scope["state"]["token_error"]``.
"""

from datetime import datetime
from functools import partial
from urllib.parse import parse_qsl

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fhir_server import balp, dates
from fhir_server.audit_log import AuditLog, Pending, writes
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.smart_http import TOKEN_PATH


class AuditTrail:
    """ASGI middleware: one AuditEvent per HTTP request of ``app`` into ``log``."""

    def __init__(self, app: ASGIApp, log: AuditLog, prefix: str = "/fhir") -> None:
        self.app, self.log, self.prefix = app, log, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorded, status = dates.now(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            pending = self._event(scope, status, recorded)
            if pending is not None:
                await self.log.arecord(pending)

    def _event(self, scope: Scope, status: int, recorded: datetime) -> Pending | None:
        state, path = scope.get("state", {}), scope["path"]
        address = scope["client"][0] if scope.get("client") else None
        agent = balp.Agent.of(state.get("access"), address)
        if path == self.prefix + TOKEN_PATH:
            return partial(balp.token, status, state.get("token_client"), state.get("token_error"), recorded, address)
        exchange: tuple[FhirRequest, FhirResponse] | None = state.get("fhir")
        if exchange is None and (not path.startswith(self.prefix + "/") or "/.well-known/" in path):
            return partial(balp.http, scope["method"], path, status, recorded, agent)
        if exchange is None:  # refused before it reached the FHIR route (401), or the open metadata
            params = parse_qsl(scope["query_string"].decode("latin-1"))
            exchange = FhirRequest(scope["method"], path[len(self.prefix) :], params), FhirResponse(status)
        req, response = exchange
        if writes(req) and response.status < 400:
            return None  # audited in its own transaction
        if not self.log.reads and not writes(req) and response.status < 400:
            return None  # a successful read, with OVERREAD_AUDIT_READS=false
        return partial(balp.rest, req, response, recorded, agent)
