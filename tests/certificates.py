"""Certificates for the TLS tests, made anew in each run: a CA, a server certificate for 127.0.0.1
(an IP subject alternative name, as a client checks it) and client certificates, as PEM files."""

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def name_of(common_name: str, organization: str = "Overread tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "NO"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class Authority:
    """A CA that signs certificates into ``folder``."""

    def __init__(self, folder: Path, name: str = "Overread test CA") -> None:
        self.folder, self.key = folder, ec.generate_private_key(ec.SECP256R1())
        self.name = name_of(name)
        self.cert = self._sign(self.name, self.key.public_key(), ca=True)
        self.path = folder / f"{name.replace(' ', '-')}.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, subject: x509.Name, *, server: bool) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(subject, key.public_key(), ca=False, server=server)
        pair = Pair(self.folder / f"{stem}.crt", self.folder / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return pair

    def _sign(
        self, subject: x509.Name, public: ec.EllipticCurvePublicKey, *, ca: bool, server: bool = False
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
        else:
            usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            if server:
                san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
                builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def client(self, common_name: str, organization: str = "Overread tests") -> Pair:
        return self.issue(common_name, name_of(common_name, organization), server=False)


@dataclass(frozen=True)
class Certificates:
    authority: Authority
    server: Pair  # for 127.0.0.1
    client: Pair  # CN=ris.example.org,O=St Olav,C=NO

    @property
    def ca(self) -> Path:
        return self.authority.path


def make(folder: Path) -> Certificates:
    ca = Authority(folder)
    server = ca.issue("server", name_of("127.0.0.1"), server=True)
    return Certificates(ca, server, ca.client("ris.example.org", "St Olav"))
