"""A SMART Backend Services client: its keys (made here with joserfc), its signed client assertions,
and an app with auth on whose clients are given by scope."""

import base64
import time
import uuid
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OctKey, RSAKey

from fhir_server.db import Database
from fhir_server.smart import ASSERTION_TYPE
from overread.app import create_app
from overread.config import OverreadConfig
from overread.settings import Settings

TOKEN_PATH = "/fhir/auth/token"
Key = ECKey | RSAKey


def es384(kid: str = "es-1") -> ECKey:
    return ECKey.generate_key("P-384", {"kid": kid, "alg": "ES384"}, private=True)


def rs384(kid: str = "rs-1") -> RSAKey:
    return RSAKey.generate_key(2048, {"kid": kid, "alg": "RS384"}, private=True)


def jwks(*keys: Key) -> dict[str, Any]:
    return dict(KeySet(list(keys)).as_dict(private=False))


def assertion(key: Key | OctKey, client_id: str, token_url: str, alg: str = "ES384", **claims: Any) -> str:
    """A client assertion (Backend Services "Protocol details"); ``claims`` replace or add (None removes)."""
    now = int(time.time())
    body = {"iss": client_id, "sub": client_id, "aud": token_url, "exp": now + 240, "jti": str(uuid.uuid4()), **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": alg, "kid": key.kid}, body, key, algorithms=[alg])


def unsigned(client_id: str, aud: str, kid: str) -> str:
    """An ``alg: none`` assertion (RFC 7519 §6): a header and claims, no signature."""

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    claims = {"iss": client_id, "sub": client_id, "aud": aud, "exp": int(time.time()) + 240, "jti": str(uuid.uuid4())}
    return f"{part({'alg': 'none', 'kid': kid})}.{part(claims)}."


def form(signed: str, scope: str = "system/*.rs", **fields: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": signed,
        "scope": scope,
        **fields,
    }


def smart_app(
    db: Database, clients: list[dict[str, Any]], config: dict[str, Any] | None = None, **settings: Any
) -> FastAPI:
    """The application with OVERREAD_AUTH=smart and ``clients`` registered (``auth.clients`` entries),
    with the rest of OVERREAD_CONFIG from ``config``."""
    cfg = OverreadConfig.model_validate({**(config or {}), "auth": {"clients": clients}})
    return create_app(Settings(database_url=db.url, auth="smart", **settings), db, cfg)


def bearer(client: TestClient, key: Key, client_id: str, scope: str) -> dict[str, str]:
    """The Authorization header of an access token for ``client_id`` (of ``client``'s app), asking ``scope``."""
    data = form(assertion(key, client_id, f"http://testserver{TOKEN_PATH}"), scope)
    response = client.post(TOKEN_PATH, data=data, headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def client_entry(client_id: str, key: Key, scope: str, **extra: Any) -> dict[str, Any]:
    return {"client_id": client_id, "jwks": jwks(key), "scope": scope, **extra}
