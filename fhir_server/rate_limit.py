"""Per-client request rate limits: a token bucket per client, 429 with Retry-After beyond it.

RFC 6585 §4 (429 Too Many Requests, with ``Retry-After``, RFC 9110 §10.2.3), answered with an
OperationOutcome whose issue code is ``throttled`` (R4 valueset-issue-type). A client is the
``client_id`` of its access token (``BearerAuth`` runs first and sets it), else its address:
with auth off, and on the open routes (the token endpoint, metadata). Each client's bucket holds
up to ``burst`` requests and refills at ``per_second``; each request takes one.

The buckets live in the process (several server processes each allow the rate), on the event
loop (no lock), at most ``MAX_CLIENTS`` of them: the least recently seen is forgotten first,
which only ever gives that client a full bucket again.
"""

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from fhir_server.errors import error

MAX_CLIENTS = 65_536


@dataclass(frozen=True)
class Rate:
    """Requests per second on average (more than 0), and at once."""

    per_second: float
    burst: int


class Buckets:
    """A token bucket per key, on ``clock`` (seconds, monotonic)."""

    def __init__(self, rate: Rate, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.clock = rate, clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key → (tokens, at)

    def take(self, key: str) -> float:
        """0 when ``key`` may go ahead (its request takes a token), else the seconds until it may."""
        now, burst = self.clock(), float(self.rate.burst)
        tokens, at = self.buckets.pop(key, (burst, now))
        tokens = min(burst, tokens + (now - at) * self.rate.per_second)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate.per_second
        self.buckets[key] = (tokens - 1 if not wait else tokens, now)
        if len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        return wait


class RateLimit:
    """ASGI middleware: a request over its client's rate is answered 429, not served."""

    def __init__(self, app: ASGIApp, buckets: Buckets) -> None:
        self.app, self.buckets = app, buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            access = scope.get("state", {}).get("access")
            client = scope.get("client")
            key = f"client {access.client_id}" if access is not None else f"address {client[0] if client else ''}"
            if wait := self.buckets.take(key):
                await _throttled(wait)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _throttled(wait: float) -> Response:
    seconds = math.ceil(wait)
    issue = error(429, "throttled", f"Too many requests from this client: try again in {seconds} s")
    body = orjson.dumps(issue.outcome)
    return Response(body, 429, {"Retry-After": str(seconds)}, media_type="application/fhir+json")
