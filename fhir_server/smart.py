"""SMART Backend Services (SMART App Launch 2.x, "SMART Backend Services"): clients, the token
endpoint's checks, and the access tokens.

A registered client authenticates with a JWT it signs with a key of its JWK Set
(``private_key_jwt``, RFC 7523): ``iss`` = ``sub`` = its client_id, ``aud`` = the token
endpoint, ``exp`` at most five minutes ahead, a ``jti`` never used before within its lifetime,
RS384 or ES384. It gets an access token granting the scopes it asked for within those it is
allowed (``scopes.granted``). Errors are RFC 6749 §5.2's.

Access tokens are JWTs the server signs (HS256) with a secret kept in the database
(``smart_store.signing_secret``): every server process on the database verifies them without a
lookup, and none needs the others. They are not revocable: they live ``token_seconds`` (5 minutes).
"""

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from threading import Lock
from typing import Any

import httpx
import orjson
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet, OctKey
from joserfc.jws import extract_compact

from fhir_server import scopes
from fhir_server.access import Access, Role, check_filters
from fhir_server.executor import Executor
from fhir_server.scopes import Scope, ScopeError
from fhir_server.smart_store import signing_secret, spend

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ("RS384", "ES384")
#: How far ahead an assertion's ``exp`` may be (Backend Services: "no more than five minutes in the future").
MAX_ASSERTION_SECONDS = 300
#: A JWK Set fetched from a client's jwks_url is fetched again on an unknown kid at most this often.
JWKS_REFETCH_SECONDS = 30.0
TOKEN_ALGORITHM = "HS256"
#: Verified access tokens kept (a few hundred bytes each), so a token's signature is checked once.
TOKENS_KEPT = 4096
ISSUER = "overread"
#: What the operator role may besides its scopes: read and search the audit log (docs/security.md).
AUDIT_READER = Scope("AuditEvent", frozenset("rs"))
Clock = Callable[[], float]


class TokenError(Exception):
    """A refused token request: RFC 6749 §5.2's error code and description, and its status."""

    def __init__(self, code: str, description: str, status: int = 400) -> None:
        super().__init__(description)
        self.code, self.description, self.status = code, description, status


def invalid_client(description: str) -> TokenError:
    return TokenError("invalid_client", description, 401)


class InvalidToken(Exception):
    """A bearer token that is not one of ours, or no longer valid (RFC 6750 §3.1 invalid_token)."""


@dataclass
class Jwks:
    """A client's JWK Set: given inline, or fetched from ``url`` (kept; fetched again on an unknown ``kid``)."""

    inline: KeySet | None = None
    url: str | None = None
    timeout: float = 10.0
    _fetched: KeySet | None = field(default=None, init=False)
    _fetched_at: float = field(default=float("-inf"), init=False)
    _lock: Lock = field(default_factory=Lock, init=False)

    def key(self, kid: str, now: float) -> Any:
        """The key ``kid`` names, or None."""
        if self.inline is not None:
            return _by_kid(self.inline, kid)
        with self._lock:
            found = _by_kid(self._fetched, kid) if self._fetched else None
            if found is None and now - self._fetched_at >= JWKS_REFETCH_SECONDS:
                self._fetched_at = now
                self._fetched = self._fetch()
                found = _by_kid(self._fetched, kid)
            return found

    def _fetch(self) -> KeySet:
        assert self.url is not None
        try:
            response = httpx.get(self.url, timeout=self.timeout, follow_redirects=False)
            response.raise_for_status()
            return KeySet.import_key_set(response.json())
        except (httpx.HTTPError, ValueError, JoseError) as exc:
            raise invalid_client(f"The client's jwks_url could not be read: {type(exc).__name__}") from None


def _by_kid(keys: KeySet, kid: str) -> Any:
    return next((k for k in keys.keys if k.kid == kid), None)


@dataclass(frozen=True)
class Client:
    """A registered client (OVERREAD_CONFIG ``auth.clients``)."""

    client_id: str
    jwks: Jwks
    #: The most it may be granted.
    scopes: tuple[Scope, ...]
    role: Role | None = None
    organization: str | None = None


@dataclass(frozen=True)
class Granted:
    access_token: str
    scope: str
    expires_in: int
    client_id: str

    def json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "bearer",
            "expires_in": self.expires_in,
            "scope": self.scope,
        }


class Smart:
    """The token endpoint's work and the access tokens' verification, for ``clients``; units through ``executor``."""

    def __init__(
        self, executor: Executor, clients: Mapping[str, Client], token_seconds: int = 300, clock: Clock = time.time
    ):
        self.executor, self.clients, self.token_seconds, self.clock = executor, clients, token_seconds, clock
        self._key: OctKey | None = None
        # A client sends its token with every request: its signature is verified once, not each time.
        self._verified = lru_cache(maxsize=TOKENS_KEPT)(self._verify)

    def token(self, form: Mapping[str, str], token_url: str) -> Granted:
        """Answer a client_credentials request (Backend Services, "Obtaining an access token")."""
        if not form.get("grant_type"):
            raise TokenError("invalid_request", "grant_type is required")
        if form["grant_type"] != "client_credentials":
            raise TokenError("unsupported_grant_type", "Only grant_type=client_credentials is supported")
        if form.get("client_assertion_type") != ASSERTION_TYPE:
            raise TokenError("invalid_request", f"client_assertion_type must be {ASSERTION_TYPE}")
        if not form.get("client_assertion"):
            raise TokenError("invalid_request", "client_assertion is required")
        if not form.get("scope"):
            raise TokenError("invalid_request", "scope is required")
        client, claims = self._assertion(form["client_assertion"], token_url)
        granted = self._granted(client, form["scope"])
        now = self.clock()
        with self.executor.begin() as conn:
            if not spend(conn, client.client_id, str(claims["jti"]), _utc(claims["exp"]), _utc(now)):
                raise invalid_client("The assertion's jti was used before")
        scope, lifetime = " ".join(map(str, granted)), self.token_seconds
        token = {"iss": ISSUER, "sub": client.client_id, "scope": scope, "iat": int(now), "exp": int(now) + lifetime,
                 "jti": secrets.token_urlsafe(16)}  # fmt: skip
        signed = jwt.encode({"alg": TOKEN_ALGORITHM}, token, self._secret(), [TOKEN_ALGORITHM])
        return Granted(signed, scope, lifetime, client.client_id)

    def _assertion(self, assertion: str, token_url: str) -> tuple[Client, dict[str, Any]]:
        """The client that signed ``assertion`` and its claims, every check passed; else invalid_client."""
        try:
            unverified = extract_compact(assertion.encode())
            header = unverified.headers()
        except (JoseError, ValueError):
            raise invalid_client("client_assertion is not a JWS in compact form") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise invalid_client(f"The assertion is signed with {alg!r}; use one of {', '.join(ALGORITHMS)}")
        if not isinstance(kid, str) or not kid:
            raise invalid_client("The assertion's header has no kid")
        claims = _payload(unverified.payload)
        client = self.clients.get(str(claims.get("iss")))
        if client is None:
            raise invalid_client("The assertion's iss is no registered client")
        now = self.clock()
        key = client.jwks.key(kid, now)
        if key is None:
            raise invalid_client(f"No key of the client's JWK Set has kid {kid!r}")
        try:
            claims = jwt.decode(assertion, key, algorithms=[alg]).claims
        except JoseError:
            raise invalid_client("The assertion's signature does not verify with the client's key") from None
        _check_claims(claims, client.client_id, token_url, now)
        return client, claims

    def _granted(self, client: Client, requested: str) -> list[Scope]:
        try:
            wanted = scopes.parse_all(requested)
            check_filters(wanted)
        except ScopeError as exc:
            raise TokenError("invalid_scope", str(exc)) from None
        granted = scopes.granted(wanted, client.scopes)
        if not granted:
            raise TokenError("invalid_scope", "None of the requested scopes is allowed to this client")
        return granted

    def access(self, token: str) -> Access:
        """The Access an access token grants; InvalidToken if it is not ours, expired, or its client is gone."""
        access, exp = self._verified(token)
        if exp <= self.clock():
            raise InvalidToken("The access token has expired")
        return access

    def _verify(self, token: str) -> tuple[Access, int]:
        """The Access of a token this server signed, and its expiry."""
        try:
            claims = jwt.decode(token, self._secret(), algorithms=[TOKEN_ALGORITHM]).claims
        except (JoseError, ValueError):
            raise InvalidToken("The access token is not one this server issued") from None
        exp, client = claims.get("exp"), self.clients.get(str(claims.get("sub")))
        if claims.get("iss") != ISSUER or not isinstance(exp, int) or client is None:
            raise InvalidToken("The access token's client is no longer registered")
        scope = _scopes(str(claims.get("scope", "")))
        if client.role == "operator":
            scope += (AUDIT_READER,)
        return Access(client.client_id, scope, client.role, client.organization), exp

    def _secret(self) -> OctKey:
        if self._key is None:  # a benign race: every process and thread reads the one stored secret
            with self.executor.begin() as conn:
                self._key = OctKey.import_key(signing_secret(conn, _utc(self.clock())))
        return self._key


def _payload(payload: bytes) -> dict[str, Any]:
    try:
        claims = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise invalid_client("The assertion's payload is not JSON") from None
    if not isinstance(claims, dict):
        raise invalid_client("The assertion's payload is not a JSON object")
    return claims


def _check_claims(claims: Mapping[str, Any], client_id: str, token_url: str, now: float) -> None:
    """Backend Services' "Protocol details": iss, sub, aud, exp and jti of a client assertion."""
    if claims.get("sub") != client_id:
        raise invalid_client("The assertion's sub must be its iss, the client_id")
    aud = claims.get("aud")
    if aud != token_url and not (isinstance(aud, list) and token_url in aud):
        raise invalid_client(f"The assertion's aud must be the token endpoint, {token_url}")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise invalid_client("The assertion has no exp")
    if exp <= now:
        raise invalid_client("The assertion has expired")
    if exp > now + MAX_ASSERTION_SECONDS:
        raise invalid_client(f"The assertion's exp is more than {MAX_ASSERTION_SECONDS} seconds ahead")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti or len(jti) > 255:
        raise invalid_client("The assertion needs a jti (a string of at most 255 characters)")


@lru_cache(maxsize=1024)
def _scopes(text: str) -> tuple[Scope, ...]:
    """A token's granted scopes, parsed once per distinct scope string."""
    return tuple(scopes.parse_all(text))


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)
