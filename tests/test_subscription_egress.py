"""Outbound calls only where configured: which Subscription endpoints are refused, how
a delivery fails without telling why, and channel.header values that are never served.

Real receivers (``http.server`` on free 127.0.0.1 ports) and the real worker, on SQLite and
PostgreSQL; names resolve through an injected resolver where a test needs a name to point at a
chosen address (a loopback one, cloud metadata, one that changes between write and delivery).
"""

import ipaddress
import socket
import threading
from collections.abc import Iterator, Sequence
from datetime import timedelta

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from fhir_server import egress
from fhir_server.db import Database
from fhir_server.egress import Address, Egress, Prefix, Refused
from fhir_server.executor import for_database
from fhir_server.notifier import FAILED, Notifier
from fhir_server.outbox import Backoff
from fhir_server.repository import Repository
from fhir_server.subscriptions import hook
from overread.app import create_app, make_hooks
from overread.config import OverreadConfig, Subscriptions
from overread.server import running
from overread.settings import Settings
from testbed.ports import free_port
from tests.peers import HttpReceiver
from tests.test_subscriptions import deliver, rows, subscription

TEST_NET = ipaddress.ip_address("198.51.100.7")  # RFC 5737: an ordinary remote address, never this host's
CRITERIA = "DiagnosticReport?status=final"


class Names:
    """A resolver whose answers a test sets (and changes)."""

    def __init__(self, table: dict[str, list[Address]]) -> None:
        self.table = table

    def __call__(self, host: str, port: int) -> list[Address]:
        return self.table.get(host, [])


def resolver(table: dict[str, Sequence[str]]) -> Names:
    return Names({name: [ipaddress.ip_address(a) for a in addresses] for name, addresses in table.items()})


def allowing(*prefixes: str, names: Names | None = None) -> Egress:
    parsed = tuple(Prefix.parse(p) for p in prefixes)
    return Egress(parsed, names) if names is not None else Egress(parsed)


# -- the rules, without a database ----------------------------------------------------------


def test_a_prefix_matches_scheme_host_port_and_a_path_at_a_segment():
    names = resolver({"ehr.example.org": [str(TEST_NET)], "ehr.example.org.evil.test": [str(TEST_NET)]})
    allowed = allowing("https://ehr.example.org/fhir-notify", names=names)
    for url in ("https://ehr.example.org/fhir-notify", "https://EHR.example.org:443/fhir-notify/DiagnosticReport/1"):
        assert allowed.check(url) == TEST_NET
    for url in (
        "http://ehr.example.org/fhir-notify",  # another scheme
        "https://ehr.example.org:8443/fhir-notify",  # another port
        "https://ehr.example.org/fhir-notifyX",  # not at a segment
        "https://ehr.example.org/other",
        "https://ehr.example.org.evil.test/fhir-notify",  # the prefix's host as a prefix of another
    ):
        with pytest.raises(Refused, match="under none of subscriptions"):
            allowed.check(url)
    for url, why in (
        ("https://ehr.example.org@evil.test/fhir-notify", "credentials"),
        ("https://ehr.example.org/fhir-notify/%2e%2e/admin", "segments"),
        ("ftp://ehr.example.org/fhir-notify", "http"),
        ("/fhir-notify", "http"),
    ):
        with pytest.raises(Refused, match=why):
            allowed.check(url)
    with pytest.raises(Refused, match="under none"):
        Egress().check("https://ehr.example.org/fhir-notify")  # nothing configured: nothing allowed
    assert allowing("https://ehr.example.org/fhir-notify/", names=names).check("https://ehr.example.org/fhir-notify")


def test_a_request_goes_to_the_checked_address_under_its_own_name():
    names = resolver({"ehr.example.org": [str(TEST_NET)], "v6.example.org": ["2001:db8::7"]})
    allowed = allowing("https://ehr.example.org:8443/", "http://v6.example.org/", names=names)
    url, host, extensions = allowed.pinned("https://ehr.example.org:8443/notify/Task/1?x=1")
    assert (str(url), host, extensions) == (
        f"https://{TEST_NET}:8443/notify/Task/1?x=1",
        {"Host": "ehr.example.org:8443"},
        {"sni_hostname": "ehr.example.org"},  # the certificate is checked against the name
    )
    url, host, extensions = allowed.pinned("http://v6.example.org/notify")
    assert (str(url), host, extensions) == ("http://[2001:db8::7]/notify", {"Host": "v6.example.org"}, {})


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
    ],
)
def test_a_name_that_resolves_to_an_internal_address_is_refused(address: str, kind: str):
    names = resolver({"hooks.example.org": [str(TEST_NET), address]})  # one such address is enough
    with pytest.raises(Refused, match=f"reaches an? {kind} address") as refused:
        allowing("http://hooks.example.org/", names=names).check("http://hooks.example.org/hook")
    assert "does not name itself" in str(refused.value)


def test_an_address_of_this_host_is_refused_and_one_named_in_a_prefix_is_allowed():
    own = _own_address()
    names = resolver({"overread.example.org": [own]})
    with pytest.raises(Refused, match="this host's own address"):
        allowing("http://overread.example.org:8080/", names=names).check("http://overread.example.org:8080/hl7")
    assert str(allowing(f"http://{own}:8080/").check(f"http://{own}:8080/hook")) == own  # named: allowed
    loopback = allowing("http://127.0.0.1:9000/hook", "http://localhost:9001/")
    assert str(loopback.check("http://127.0.0.1:9000/hook")) == "127.0.0.1"
    assert loopback.check("http://localhost:9001/hook").is_loopback
    with pytest.raises(Refused, match="loopback"):  # a loopback address spelt otherwise is not named
        allowing("http://127.1:9000/").check("http://127.1:9000/hook")


def _own_address() -> str:
    """A non-loopback address of this host (the one it would reach the documentation net by)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.200", 9))  # no packet is sent: this only picks the route
        except OSError:
            pytest.skip("this host has no route beyond loopback")
        address = str(probe.getsockname()[0])
    if ipaddress.ip_address(address).is_loopback:
        pytest.skip("this host has no address beyond loopback")
    return address


def test_a_name_that_takes_too_long_to_resolve_is_refused(monkeypatch: pytest.MonkeyPatch):
    answered = threading.Event()
    monkeypatch.setattr(egress, "RESOLVE_SECONDS", 0.05)
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: answered.wait(10) and [])
    try:
        with pytest.raises(Refused, match=r"did not resolve within 0\.05 s"):
            allowing("http://slow.example.org/").check("http://slow.example.org/hook")
    finally:
        answered.set()
    assert egress.resolve("192.0.2.9", 80) == [ipaddress.ip_address("192.0.2.9")]  # a literal: no lookup


def test_allowed_endpoints_are_checked_when_the_configuration_is_read():
    assert Subscriptions(allowed_endpoints=["https://ehr.example.org/hooks/"]).egress().allowed
    for bad in ("ehr.example.org", "https://user:pw@ehr.example.org/", "https://ehr.example.org/?a=1"):
        with pytest.raises(ValueError, match="allowed_endpoints"):
            Subscriptions(allowed_endpoints=[bad])


# -- at the door: 422, nothing written ------------------------------------------------------


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def receiver(port: int) -> Iterator[HttpReceiver]:
    r = HttpReceiver(port).start()
    yield r
    r.stop()


@pytest.fixture
def cfg(port: int) -> OverreadConfig:
    return OverreadConfig(subscriptions=Subscriptions(allowed_endpoints=[f"http://127.0.0.1:{port}/hook"]))


@pytest.fixture
def client(db: Database, cfg: OverreadConfig) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(database_url=db.url), db, cfg), base_url="http://testserver") as c:
        yield c


def notifier(db: Database, allowed: Egress, timeout: float = 5) -> Notifier:
    backoff = Backoff(max_attempts=5, first_delay=timedelta(seconds=30))
    return Notifier(for_database(db), make_hooks(OverreadConfig()), backoff, timeout, egress=allowed)


def deliver_once(db: Database, allowed: Egress, timeout: float = 5) -> None:
    """Every due row, by a worker of its own that may call only ``allowed``."""
    worker = notifier(db, allowed, timeout)
    try:
        deliver(worker)
    finally:
        worker.close()


def test_endpoints_outside_the_allow_list_are_refused_at_create_and_update(db: Database, cfg: OverreadConfig, port):
    app = create_app(Settings(database_url=db.url), db, cfg)
    with running(app) as root, httpx.Client(base_url=f"{root}/fhir") as client:
        for endpoint in (
            f"{root}/hl7/messages/1/replay",  # this server's own listener: an anonymous HL7 replay once
            f"http://127.0.0.1:{port}/hl7/messages/1/replay",  # the allowed port, another path
            f"http://127.0.0.1:{port % 65535 + 1}/hook",  # loopback, another port (never the allowed one)
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/fhir/Patient",
            "file:///etc/passwd",
        ):
            refused = client.post("/Subscription", json=subscription(endpoint, CRITERIA))
            assert refused.status_code == 422, endpoint
            (issue,) = refused.json()["issue"]
            assert issue["expression"] == ["Subscription.channel.endpoint"], endpoint
            assert "subscriptions.allowed_endpoints" in issue["diagnostics"] or "http(s)" in issue["diagnostics"]
        assert client.get("/Subscription").json()["total"] == 0

        created = client.post("/Subscription", json=subscription(f"http://127.0.0.1:{port}/hook", CRITERIA)).json()
        moved = {k: v for k, v in created.items() if k != "meta"}
        moved["channel"] = {**moved["channel"], "endpoint": "http://169.254.169.254/latest/meta-data/"}
        assert client.put(f"/Subscription/{created['id']}", json=moved).status_code == 422
        assert client.get(f"/Subscription/{created['id']}").json()["meta"]["versionId"] == "1"


def test_a_write_asks_no_resolver_and_the_delivery_refuses_a_name_of_loopback(db: Database):
    names = resolver({"overread.example.org": ["127.0.0.1"]})  # our own listener, by a name
    calls: list[str] = []

    def counting(host: str, port: int) -> list[Address]:
        calls.append(host)
        return names(host, port)

    allowed = Egress((Prefix.parse("http://overread.example.org:8080/"),), counting)
    with db.transaction() as session:  # a slow resolver here would hold every request on the loop up
        Repository(session, (hook(allowed),)).create(subscription("http://overread.example.org:8080/hl7/x", CRITERIA))
    assert calls == []
    with pytest.raises(Refused, match="loopback"):
        allowed.pinned("http://overread.example.org:8080/hl7/x")
    assert calls == ["overread.example.org"]


# -- at delivery --------------------------------------------------------------------------


def test_an_allowed_endpoint_gets_its_handshake_at_the_checked_address(db: Database, receiver: HttpReceiver):
    names = resolver({"localhost": ["127.0.0.1"]})
    allowed = allowing(f"http://localhost:{receiver.port}/", names=names)
    url = f"http://localhost:{receiver.port}/hook"
    with db.transaction() as session:
        Repository(session, (hook(allowed),)).create(subscription(url, CRITERIA, "requested"))
    deliver_once(db, allowed)
    (hello,) = receiver.requests
    assert (hello.method, hello.path, hello.headers["host"]) == ("POST", "/hook", f"localhost:{receiver.port}")
    assert [r.status for r in rows(db)] == ["done"]


def test_a_name_that_turns_to_loopback_after_the_write_is_refused_at_delivery(db: Database, receiver: HttpReceiver):
    names = resolver({"hooks.example.org": [str(TEST_NET)]})
    allowed = allowing(f"http://hooks.example.org:{receiver.port}/", names=names)
    with db.transaction() as session:
        repo = Repository(session, (hook(allowed),))
        sub = repo.create(subscription(f"http://hooks.example.org:{receiver.port}/hook", CRITERIA, "requested"))
    names.table["hooks.example.org"] = [ipaddress.ip_address("127.0.0.1")]  # DNS rebinding
    deliver_once(db, allowed)
    assert receiver.requests == []  # never connected
    (row,) = rows(db)
    assert row.status == "pending" and "loopback" in (row.last_error or "")
    with db.begin(write=False) as conn:
        now = Repository(conn).read("Subscription", sub.id).resource
    assert (now["status"], now["error"]) == ("error", FAILED)


def test_a_redirect_is_a_failed_delivery_and_is_not_followed(
    client: TestClient, db: Database, receiver: HttpReceiver, cfg: OverreadConfig
):
    elsewhere = HttpReceiver().start()
    try:
        receiver.status, receiver.headers = 307, {"Location": elsewhere.url}
        allowed = allowing(*cfg.subscriptions.allowed_endpoints, f"http://127.0.0.1:{elsewhere.port}/")
        sid = client.post("/fhir/Subscription", json=subscription(receiver.url, CRITERIA, "requested")).json()["id"]
        deliver_once(db, allowed)
        assert len(receiver.requests) == 1 and elsewhere.requests == []
    finally:
        elsewhere.stop()
    failed = client.get(f"/fhir/Subscription/{sid}").json()
    assert (failed["status"], failed["error"]) == ("error", FAILED)
    assert "HTTP 307" in (rows(db)[0].last_error or "")


def test_every_failure_reads_the_same_on_the_subscription(client: TestClient, db: Database, receiver: HttpReceiver):
    """An HTTP 404, a refused connection and a read timeout: one reason for clients, three for operators."""
    receiver.status = 404
    closed = free_port()
    with socket.socket() as silent:  # listens, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        endpoints = [receiver.url, f"http://127.0.0.1:{closed}/hook", f"http://127.0.0.1:{silent.getsockname()[1]}/"]
        allowed = allowing(*endpoints)
        ids = []
        # The silent endpoint alone gets a short timeout: on a loaded machine the 404 may take longer.
        for endpoint, timeout in zip(endpoints, (5, 5, 0.5), strict=True):
            with db.transaction() as session:
                ids.append(
                    Repository(session, (hook(allowed),)).create(subscription(endpoint, CRITERIA, "requested")).id
                )
            deliver_once(db, allowed, timeout=timeout)
    errors = {client.get(f"/fhir/Subscription/{sid}").json()["error"] for sid in ids}
    assert errors == {FAILED}
    details = [row.last_error or "" for row in rows(db)]
    assert ["HTTP 404" in details[0], "ConnectError" in details[1], "ReadTimeout" in details[2]] == [True] * 3


# -- channel.header: write-only -------------------------------------------------------------


def test_header_values_are_used_but_never_served(client: TestClient, db: Database, receiver: HttpReceiver):
    secret = "Bearer t0k3n-0f-th3-r3c31v3r"
    sub = subscription(receiver.url, CRITERIA, "requested", header=[f"Authorization: {secret}", "X-Referrer: st-olav"])
    created = client.post("/fhir/Subscription", json=sub)
    sid = created.json()["id"]
    masked = ["Authorization: ***", "X-Referrer: ***"]
    assert created.json()["channel"]["header"] == masked
    read = {"request": {"method": "GET", "url": f"Subscription/{sid}"}}
    batch = {"resourceType": "Bundle", "type": "batch", "entry": [read]}
    answers = [
        client.get(f"/fhir/Subscription/{sid}"),
        client.get(f"/fhir/Subscription/{sid}/_history/1"),
        client.get("/fhir/Subscription", params={"_id": sid}),
        client.post("/fhir/Subscription/_search", data={"status": "requested"}),
        client.get(f"/fhir/Subscription/{sid}/_history"),
        client.get("/fhir/Subscription/_history"),
        client.get("/fhir/_history"),
        client.post("/fhir", json=batch),
    ]
    for answer in answers:
        assert answer.status_code == 200 and "t0k3n" not in answer.text and "st-olav" not in answer.text
        assert "Authorization: ***" in answer.text
    with db.begin(write=False) as conn:  # nor any stored version
        stored = conn.execute(text("SELECT content FROM resource_version WHERE type = 'Subscription'")).scalars()
        assert all("t0k3n" not in (content or "") for content in stored)

    worker = notifier(db, allowing(receiver.url))
    try:
        deliver(worker)  # the handshake: with the values
        assert receiver.requests[-1].headers["authorization"] == secret
        # An update sending the masked values back keeps them; a new value replaces its own only.
        current = client.get(f"/fhir/Subscription/{sid}").json()
        again = {k: v for k, v in current.items() if k != "meta"} | {"status": "requested"}
        again["channel"] = {**current["channel"], "header": ["authorization: ***", "X-Referrer: ward-7"]}
        updated = client.put(f"/fhir/Subscription/{sid}", json=again)
        assert updated.status_code == 200 and updated.json()["channel"]["header"] == masked
        deliver(worker)
    finally:
        worker.close()
    last = receiver.requests[-1].headers
    assert (last["authorization"], last["x-referrer"]) == (secret, "ward-7")

    unknown = {**again, "channel": {**again["channel"], "header": ["X-Api-Key: ***"]}}
    refused = client.put(f"/fhir/Subscription/{sid}", json=unknown)
    assert refused.status_code == 422 and "X-Api-Key" in refused.text
    for servers in ("Host: admin.internal", "content-length: 0", "Transfer-Encoding: chunked"):
        sub = subscription(receiver.url, CRITERIA, header=[servers])
        assert client.post("/fhir/Subscription", json=sub).status_code == 422, servers


def test_the_migration_masks_stored_subscriptions_and_keeps_their_values(db: Database):
    from alembic import command

    from overread.migrate import alembic_config

    def migrate(revision: str) -> None:
        with db.engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            (command.downgrade if revision != "head" else command.upgrade)(config, revision)

    with db.transaction() as session:  # written without the hook: as before the migration
        created = Repository(session).create(subscription("http://ehr.example.org/", CRITERIA, header=["X-Key: k3y"]))
    migrate("0007")
    migrate("head")
    with db.begin(write=False) as conn:
        current = Repository(conn).read("Subscription", created.id).resource
        assert current["channel"]["header"] == ["X-Key: ***"]
        versions = conn.execute(text("SELECT content FROM resource_version WHERE type = 'Subscription'")).scalars()
        assert all("k3y" not in (content or "") for content in versions)
        kept = conn.execute(text("SELECT lines FROM subscription_header")).scalar_one()
    assert kept == '["X-Key: k3y"]'
