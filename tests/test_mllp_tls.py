"""The MLLP door over TLS and its sender allow-lists (docs/security.md): python's ``ssl`` client
against the listener of ``overread serve``, and our result sender against a TLS MLLP receiver."""

import asyncio
import socket
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from fhir_server import dates
from fhir_server.db import Database
from fhir_server.executor import for_database
from hl7_bridge.ack import acknowledge
from hl7_bridge.mllp import Deframer, MllpServer, current_connection, frame, running_in_thread, send
from hl7_bridge.sender import exchange
from hl7_bridge.store import PROCESSED, REFUSED, InboundMessage
from mappings.v2 import parse
from overread.app import mllp_listener
from overread.config import OverreadConfig, load
from overread.settings import Settings
from overread.tls import ServerTls, server_context
from tests.certificates import Certificates, Pair, make
from tests.hl7_golden import omi_order

Send = Callable[[bytes], bytes]
RIS = "CN=ris.example.org,O=St Olav,C=NO"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make(tmp_path_factory.mktemp("tls"))


def client_context(certs: Certificates, pair: Pair | None = None) -> ssl.SSLContext:
    """Python's TLS client: our CA trusted, the server's address checked, a client certificate if given."""
    context = ssl.create_default_context(cafile=certs.ca)
    if pair is not None:
        context.load_cert_chain(pair.cert, pair.key)
    return context


def exchange_over(port: int, raw: bytes, context: ssl.SSLContext) -> bytes:
    """One MLLP block over TLS with a plain ``ssl`` socket; the content of the reply block."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as tcp,
        context.wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
    ):
        tls.sendall(frame(raw))
        deframer, replies = Deframer(), list[bytes]()
        while not replies:
            if not (data := tls.recv(65536)):
                raise ConnectionResetError("closed without a reply")
            replies = deframer.feed(data)
        return replies[0]


@contextmanager
def listening(db: Database, tls: ServerTls, cfg: OverreadConfig | None = None) -> Iterator[int]:
    settings = Settings(database_url=db.url, mllp_port=0, mllp_tls=tls)
    with running_in_thread(mllp_listener(settings, for_database(db), cfg or OverreadConfig())) as port:
        yield port


def _msa(ack: bytes) -> tuple[str, str]:
    """MSA-1 and ERR-3.1 (table 0357; "" without an ERR)."""
    message = parse(ack)
    msa, err = message.segment("MSA"), message.segment("ERR")
    assert msa is not None
    return msa.field(1).value, err.field(3).component(1) if err is not None else ""


def _rows(db: Database) -> list[InboundMessage]:
    with db.transaction() as session:
        return list(session.scalars(select(InboundMessage).order_by(InboundMessage.pk)))


def test_an_order_over_tls_is_acknowledged_and_plain_tcp_is_not_served(db, certs):
    with listening(db, ServerTls(cert=certs.server.cert, key=certs.server.key)) as port:
        assert _msa(exchange_over(port, omi_order(1), client_context(certs))) == ("AA", "")
        with socket.create_connection(("127.0.0.1", port), timeout=20) as plain:
            plain.sendall(frame(omi_order(2)))
            assert b"MSA" not in plain.recv(65536)  # a TLS alert or the end of the stream, no ACK
    assert [(r.control_id, r.status) for r in _rows(db)] == [("MSG0001", PROCESSED)]


def test_mutual_tls_serves_a_client_with_a_certificate_and_refuses_one_without(db, certs, tmp_path):
    stranger = make(tmp_path)  # a certificate of another CA
    tls = ServerTls(cert=certs.server.cert, key=certs.server.key, client_ca=certs.ca)
    with listening(db, tls) as port:
        assert _msa(exchange_over(port, omi_order(1), client_context(certs, certs.client)))[0] == "AA"
        for context in (client_context(certs), client_context(certs, stranger.client)):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                exchange_over(port, omi_order(2), context)
    assert [r.control_id for r in _rows(db)] == ["MSG0001"]


def _config(tmp_path: Path, yaml: str) -> OverreadConfig:
    path = tmp_path / "overread.yaml"
    path.write_text(yaml, encoding="utf-8")
    return load(path)


ALLOW = f"""
hl7:
  senders:
    - name: st-olav-ris
      sending_application: MESA_OF
      allow: {{addresses: [127.0.0.0/8], subjects: ["{RIS}"]}}
    - name: far-ris
      sending_application: FAR
      allow: {{addresses: [10.1.0.0/16]}}
"""


def _as(application: bytes, raw: bytes) -> bytes:
    return raw.replace(b"|MESA_OF|", b"|" + application + b"|", 1)


def test_allow_lists_admit_a_listed_sender_and_refuse_others_with_ar_207(db, certs, tmp_path):
    cfg = _config(tmp_path, ALLOW)
    tls = ServerTls(cert=certs.server.cert, key=certs.server.key, client_ca=certs.ca)
    ris, other = client_context(certs, certs.client), client_context(certs, certs.authority.client("pacs.example.org"))
    with listening(db, tls, cfg) as port:
        answers = [
            exchange_over(port, omi_order(1), ris),  # the subject and address of its entry
            exchange_over(port, _as(b"FAR", omi_order(2)), ris),  # another sender's entry: not from here
            exchange_over(port, _as(b"NOBODY", omi_order(3)), ris),  # no entry at all
            exchange_over(port, omi_order(4), other),  # its entry's address, another subject
        ]
    assert [_msa(a) for a in answers] == [("AA", ""), ("AR", "207"), ("AR", "207"), ("AR", "207")]
    rows = _rows(db)
    assert [(r.control_id, r.status, r.sender_key is None) for r in rows] == [
        ("MSG0001", PROCESSED, False),
        ("MSG0002", REFUSED, True),
        ("MSG0003", REFUSED, True),
        ("MSG0004", REFUSED, True),
    ]
    assert rows[1].error == "not allowed: sender far-ris is not allowed from 127.0.0.1 (" + RIS + ")"
    assert rows[2].error.startswith("not allowed: no sender matches MSH-3 'NOBODY'")
    assert rows[3].error.endswith("(CN=pacs.example.org,O=Overread tests,C=NO)")


def test_a_refused_message_takes_no_key_so_the_same_one_from_its_sender_goes_through(db, certs, tmp_path):
    cfg = _config(tmp_path, ALLOW)
    tls = ServerTls(cert=certs.server.cert, key=certs.server.key, client_ca=certs.ca)
    other = client_context(certs, certs.authority.client("pacs.example.org"))
    with listening(db, tls, cfg) as port:
        refused = exchange_over(port, omi_order(1), other)
        accepted = exchange_over(port, omi_order(1), client_context(certs, certs.client))
    assert [_msa(refused)[0], _msa(accepted)[0]] == ["AR", "AA"]


def test_without_tls_an_address_list_alone_admits_by_address(db, tmp_path):
    cfg = _config(tmp_path, "hl7: {senders: [{sending_application: MESA_OF, allow: {addresses: [127.0.0.1]}}]}")
    settings = Settings(database_url=db.url, mllp_port=0)
    with running_in_thread(mllp_listener(settings, for_database(db), cfg)) as port:
        ack = asyncio.run(send("127.0.0.1", port, omi_order(1), timeout=20))
    assert _msa(ack) == ("AA", "")


def test_a_config_with_an_allow_list_on_some_senders_only_stops_start_up(tmp_path):
    yaml = ALLOW + "    - name: open-ris\n      sending_application: OPEN\n"
    with pytest.raises(ValueError, match=r"every one needs it; these have none: \['open-ris'\]"):
        _config(tmp_path, yaml)


# -- results to a destination over TLS -------------------------------------------------------


@contextmanager
def tls_receiver(certs: Certificates) -> Iterator[tuple[int, list[str]]]:
    """An MLLP receiver that wants a client certificate; answers AA and notes each client's subject."""
    subjects: list[str] = []

    async def handler(message: bytes) -> bytes:
        connection = current_connection()
        assert connection is not None and connection.peer_certificate is not None
        subjects.append(str(connection.peer_certificate["subject"]))
        return acknowledge(parse(message), None, control_id="ACK1", now=dates.now())

    server = MllpServer(handler, port=0, ssl=server_context(certs.server.cert, certs.server.key, certs.ca))
    with running_in_thread(server) as port:
        yield port, subjects


def test_results_go_to_a_destination_over_mutual_tls(certs, tmp_path):
    with tls_receiver(certs) as (port, subjects):
        cfg = _config(
            tmp_path,
            f"""
hl7:
  destinations:
    - name: ehr
      host: 127.0.0.1
      port: {port}
      tls: {{ca: {certs.ca}, cert: {certs.client.cert}, key: {certs.client.key}}}
    - {{name: untrusting, host: 127.0.0.1, port: {port}, tls: true}}
    - {{name: plain, host: 127.0.0.1, port: {port}, ack_timeout_seconds: 2}}
""",
        )
        ehr, untrusting, plain = cfg.hl7.destinations
        raw = omi_order(7)
        sent = exchange(ehr, raw, "MSG0007")
        refused = exchange(untrusting, raw, "MSG0007")  # our test CA is not among the system's
        unencrypted = exchange(plain, raw, "MSG0007")
    assert (sent.sent, sent.ack_code) == (True, "AA")
    assert len(subjects) == 1 and "ris.example.org" in subjects[0]
    assert refused.error is not None and refused.error.startswith("TLS with 127.0.0.1")
    assert "CERTIFICATE_VERIFY_FAILED" in refused.error
    assert not unencrypted.sent


def test_the_listeners_tls_settings_come_from_the_environment(monkeypatch, certs):
    monkeypatch.setenv("OVERREAD_MLLP_TLS__CERT", str(certs.server.cert))
    monkeypatch.setenv("OVERREAD_MLLP_TLS__KEY", str(certs.server.key))
    monkeypatch.setenv("OVERREAD_MLLP_TLS__CLIENT_CA", str(certs.ca))
    context = Settings().mllp_tls.context()
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    monkeypatch.delenv("OVERREAD_MLLP_TLS__KEY")
    with pytest.raises(ValueError, match="both cert and key"):
        Settings()


def test_tls_files_that_cannot_be_read_stop_start_up(tmp_path):
    with pytest.raises(ValueError, match="TLS"):
        _config(tmp_path, "hl7: {destinations: [{name: ehr, host: h, port: 1, tls: {ca: missing.pem}}]}")
