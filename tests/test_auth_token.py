"""The token endpoint: ONC Inferno's SMART Backend Services checks, ported (smart_app_launch_test_kit,
"Backend Services Authorization"), on SQLite and PostgreSQL.

Each refusal is RFC 6749 §5.2 JSON with 400 or 401; a valid request gets a bearer token of the
scopes asked within those allowed, and the jti of its assertion can never be used again, by this
or another server process on the same database.
"""

import re
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from fastapi.testclient import TestClient
from joserfc.jwk import OctKey
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.smart import JWKS_REFETCH_SECONDS, InvalidToken, Smart, TokenError
from overread.config import OverreadConfig
from overread.server import running
from testbed.smart_client import TOKEN_PATH, assertion, client_entry, es384, form, jwks, rs384, smart_app, unsigned

AUD = f"http://testserver{TOKEN_PATH}"
KEY, RSA_KEY = es384(), rs384()
KID = "es-1"


@pytest.fixture
def app(db: Database) -> Any:
    return smart_app(
        db,
        [
            client_entry("ehr", KEY, "system/*.rs system/ServiceRequest.c"),
            client_entry("rsa-client", RSA_KEY, "system/Patient.read"),
        ],
    )


@pytest.fixture
def client(app: Any) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://testserver") as c:
        yield c


def token(client: TestClient, data: dict[str, str]) -> httpx.Response:
    return client.post(TOKEN_PATH, data=data)


def refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert body["error_description"]
    assert response.headers["cache-control"] == "no-store"


def test_discovery_and_metadata_are_open(client: TestClient) -> None:
    config = client.get("/fhir/.well-known/smart-configuration")
    assert config.status_code == 200
    doc = config.json()
    assert doc["token_endpoint"] == AUD
    assert doc["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert doc["token_endpoint_auth_signing_alg_values_supported"] == ["RS384", "ES384"]
    assert doc["grant_types_supported"] == ["client_credentials"]
    assert "system/*.rs" in doc["scopes_supported"]
    assert "client-confidential-asymmetric" in doc["capabilities"]
    security = client.get("/fhir/metadata").json()["rest"][0]["security"]
    uris = security["extension"][0]
    assert uris["url"].endswith("/oauth-uris")
    assert uris["extension"] == [{"url": "token", "valueUri": AUD}]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"


def test_a_valid_request_gets_a_token(client: TestClient) -> None:
    response = token(client, form(assertion(KEY, "ehr", AUD), "system/Patient.rs system/ServiceRequest.c"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 300
    assert body["scope"] == "system/Patient.rs system/ServiceRequest.c"
    assert response.headers["cache-control"] == "no-store"
    read = client.get("/fhir/Patient", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert read.status_code == 200


def test_an_rs384_client_gets_a_token(client: TestClient) -> None:
    response = token(client, form(assertion(RSA_KEY, "rsa-client", AUD, alg="RS384"), "system/Patient.read"))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "system/Patient.read"


def test_the_grant_is_what_was_asked_within_what_is_allowed(client: TestClient) -> None:
    asked = "system/*.cruds system/hl7.r launch openid"
    response = token(client, form(assertion(KEY, "ehr", AUD), asked))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "system/*.rs system/ServiceRequest.c"


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
        ({"grant_type": ""}, 400, "invalid_request"),
        ({"client_assertion_type": "not_an_assertion_type"}, 400, "invalid_request"),
        ({"client_assertion": ""}, 400, "invalid_request"),
        ({"client_assertion": "not.a.jwt"}, 401, "invalid_client"),
        ({"scope": ""}, 400, "invalid_request"),
        ({"scope": "system/Patient.xyz"}, 400, "invalid_scope"),
        ({"scope": "system/Observation.rs?value-quantity=5"}, 400, "invalid_scope"),  # a filter on no token parameter
        ({"scope": "system/hl7.r"}, 400, "invalid_scope"),  # nothing of it is allowed
        ({"scope": "patient/*.rs"}, 400, "invalid_scope"),
    ],
)
def test_malformed_requests(client: TestClient, change: dict[str, str], status: int, code: str) -> None:
    refused(token(client, {**form(assertion(KEY, "ehr", AUD)), **change}), status, code)


def test_a_body_that_is_no_form_or_repeats_a_field(client: TestClient) -> None:
    refused(client.post(TOKEN_PATH, json=form(assertion(KEY, "ehr", AUD))), 400, "invalid_request")
    repeated = urlencode([*form(assertion(KEY, "ehr", AUD)).items(), ("scope", "system/*.cruds")])
    form_type = {"content-type": "application/x-www-form-urlencoded"}
    refused(client.post(TOKEN_PATH, content=repeated, headers=form_type), 400, "invalid_request")
    refused(client.post(TOKEN_PATH, content=b"scope=\xff", headers=form_type), 400, "invalid_request")


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": "someone-else"},  # Inferno: invalid iss
        {"sub": "someone-else"},
        {"aud": "https://elsewhere.example.org/token"},  # Inferno: invalid aud
        {"aud": None},
        {"exp": int(time.time()) - 10},  # expired
        {"exp": int(time.time()) + 600},  # more than 5 minutes ahead
        {"exp": None},
        {"exp": "soon"},
        {"jti": None},
    ],
    ids=["iss", "sub", "aud", "no-aud", "expired", "far-future", "no-exp", "exp-not-a-number", "no-jti"],
)
def test_bad_claims_are_invalid_client(client: TestClient, claims: dict[str, Any]) -> None:
    refused(token(client, form(assertion(KEY, "ehr", AUD, **claims))), 401, "invalid_client")


def test_an_unknown_kid_is_invalid_client(client: TestClient) -> None:
    refused(token(client, form(assertion(es384("not-registered"), "ehr", AUD))), 401, "invalid_client")


def test_a_bad_signature_is_invalid_client(client: TestClient) -> None:
    impostor = es384(KID)  # another key that says it is the registered one
    refused(token(client, form(assertion(impostor, "ehr", AUD))), 401, "invalid_client")


def test_alg_none_and_hmac_are_refused(client: TestClient) -> None:
    refused(token(client, form(unsigned("ehr", AUD, KID))), 401, "invalid_client")
    shared = OctKey.import_key(b"k" * 48, {"kid": KID})
    refused(token(client, form(assertion(shared, "ehr", AUD, alg="HS384"))), 401, "invalid_client")


def test_a_replayed_jti_is_refused(client: TestClient) -> None:
    signed = assertion(KEY, "ehr", AUD)
    assert token(client, form(signed)).status_code == 200
    refused(token(client, form(signed)), 401, "invalid_client")
    # another assertion with the same jti, freshly signed, is a replay too
    jti = "the-same-jti"
    assert token(client, form(assertion(KEY, "ehr", AUD, jti=jti))).status_code == 200
    refused(token(client, form(assertion(KEY, "ehr", AUD, jti=jti))), 401, "invalid_client")


def test_a_jti_is_refused_by_another_server_process_on_the_same_database(db: Database) -> None:
    entries = [client_entry("ehr", KEY, "system/*.rs")]
    other_db = Database(db.url)  # a second process has its own engine and pools
    try:
        with (
            TestClient(smart_app(db, entries), base_url="http://testserver") as first,
            TestClient(smart_app(other_db, entries), base_url="http://testserver") as second,
        ):
            signed = assertion(KEY, "ehr", AUD)
            granted = token(first, form(signed))
            assert granted.status_code == 200
            refused(token(second, form(signed)), 401, "invalid_client")
            # and the token one process issued, the other honours
            bearer = {"Authorization": f"Bearer {granted.json()['access_token']}"}
            assert second.get("/fhir/Patient", headers=bearer).status_code == 200
    finally:
        other_db.dispose()


def test_an_expired_access_token_is_refused(db: Database) -> None:
    cfg = OverreadConfig.model_validate({"auth": {"clients": [client_entry("ehr", KEY, "system/*.rs")]}})
    now = [time.time()]
    smart = Smart(for_database(db), cfg.auth.registered(), token_seconds=300, clock=lambda: now[0])
    granted = smart.token(form(assertion(KEY, "ehr", AUD)), AUD)
    assert smart.access(granted.access_token).client_id == "ehr"
    now[0] += 300
    with pytest.raises(InvalidToken):
        smart.access(granted.access_token)


def test_keys_from_a_jwks_url_are_fetched_again_for_a_new_kid(db: Database) -> None:
    """A client that publishes its keys: the set is fetched over HTTP, kept, and fetched again when an
    assertion names a kid it lacks (key rotation), at most once per JWKS_REFETCH_SECONDS."""
    old, new = es384("2025"), es384("2026")
    published = {"keys": jwks(old)["keys"]}
    fetched: list[int] = []

    async def keys(request: Request) -> JSONResponse:
        fetched.append(1)
        return JSONResponse(published)

    with running(Starlette(routes=[Route("/jwks.json", keys)])) as root:
        entry = {"client_id": "ehr", "jwks_url": f"{root}/jwks.json", "scope": "system/*.rs"}
        cfg = OverreadConfig.model_validate({"auth": {"clients": [entry]}})
        now = [time.time()]
        smart = Smart(for_database(db), cfg.auth.registered(), clock=lambda: now[0])
        smart.token(form(assertion(old, "ehr", AUD)), AUD)
        smart.token(form(assertion(old, "ehr", AUD)), AUD)
        assert len(fetched) == 1  # kept
        published["keys"] = jwks(old, new)["keys"]
        with pytest.raises(TokenError, match="kid"):  # fetched a moment ago: not again yet
            smart.token(form(assertion(new, "ehr", AUD)), AUD)
        now[0] += JWKS_REFETCH_SECONDS
        assert smart.token(form(assertion(new, "ehr", AUD, exp=int(now[0]) + 60)), AUD).scope == "system/*.rs"
        assert len(fetched) == 2  # fetched again for the new kid


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"scopes": "system/*.rs"}, "Extra inputs are not permitted"),  # a misspelt key
        ({"jwks_url": "https://ehr.example.org/jwks.json"}, "jwks or jwks_url"),  # both
        ({"jwks": None}, "jwks or jwks_url"),  # neither
        ({"jwks": {"keys": [KEY.as_dict(private=True)]}}, "private key"),
        ({"jwks": {"keys": [{"kty": "EC"}]}}, "not a JWK Set"),
        ({"scope": "system/Task.sr"}, "in that order"),
        ({"scope": "openid launch"}, "no system/ scope"),
        ({"scope": "system/*.rs?category=x"}, "one resource type"),
        ({"role": "admin"}, "role"),
        ({"organization": "STOLAV"}, "system|value"),
        ({"role": "insurer"}, "role insurer but no organization"),  # its compartment is its organization's
    ],
)
def test_a_bad_client_registration_stops_start_up(change: dict[str, Any], complaint: str) -> None:
    entry = {**client_entry("ehr", KEY, "system/*.rs"), **change}
    entry = {k: v for k, v in entry.items() if v is not None}
    with pytest.raises(ValidationError, match=re.escape(complaint)):
        OverreadConfig.model_validate({"auth": {"clients": [entry]}})


def test_client_ids_are_unique() -> None:
    entry = client_entry("ehr", KEY, "system/*.rs")
    with pytest.raises(ValidationError, match="unique"):
        OverreadConfig.model_validate({"auth": {"clients": [entry, entry]}})
