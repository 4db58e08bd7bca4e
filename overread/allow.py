"""Allow-lists of the MLLP and DICOM doors (docs/security.md, "Allow-lists"): who a peer is, and
whether an entry admits it.

A peer is its source address and, over mutual TLS, its verified client certificate's subject. An
address entry is a network in CIDR notation or one address; a subject entry is a certificate's
whole subject in RFC 4514 form (``CN=ris.example.org,O=St Olav,C=NO``, as
``openssl x509 -noout -subject -nameopt RFC2253`` prints it) or, without ``=``, its common name.
"""

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from hl7_bridge.mllp import ConnectionInfo

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of a connection."""

    address: str
    #: The subject of its verified TLS client certificate; None without one.
    subject: x509.Name | None = None

    @classmethod
    def of(cls, connection: ConnectionInfo) -> "Peer":
        der = connection.peer_certificate_der
        subject = x509.load_der_x509_certificate(der).subject if der else None
        return cls(address(connection.peername), subject)

    def __str__(self) -> str:
        return self.address if self.subject is None else f"{self.address} ({self.subject.rfc4514_string()})"


def address(peername: Any) -> str:
    """The host of a socket's peer name (an IPv6 one is a 4-tuple), without an IPv4-mapped prefix."""
    host = str(peername[0] if isinstance(peername, tuple) else peername)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return str(mapped or ip)


def in_networks(host: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def subject(entry: str) -> x509.Name | str:
    """A subject entry as it is compared: a whole subject, or a common name; ValueError if malformed."""
    return x509.Name.from_rfc4514_string(entry) if "=" in entry else entry


def subject_matches(entries: Sequence[x509.Name | str], name: x509.Name | None) -> bool:
    if name is None:
        return False
    common = {a.value for a in name.get_attributes_for_oid(NameOID.COMMON_NAME)}
    return any(entry == name if isinstance(entry, x509.Name) else entry in common for entry in entries)
