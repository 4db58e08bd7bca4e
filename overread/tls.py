"""TLS for the MLLP and DICOM doors (docs/security.md, "TLS"): contexts of TLS 1.2 or later only.

TLS 1.2 and 1.3 are what BCP 195 (RFC 9325) and DICOM's BCP 195 profiles (PS3.15 B.9 to B.11)
allow; the ciphers are OpenSSL's defaults, which those profiles accept.
"""

import ssl
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, model_validator

MINIMUM = ssl.TLSVersion.TLSv1_2


def server_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """A listener's context: our certificate chain and key; with ``client_ca``, a client certificate
    chaining to it is required (mutual TLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A context to call a peer: its certificate checked against ``ca`` (else the system's CAs) and
    its host name or address; ``cert`` and ``key`` our client certificate, for a peer that asks."""
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = MINIMUM
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class ServerTls(BaseModel):
    """A listener's TLS settings (``OVERREAD_MLLP_TLS__CERT``, ...); no ``cert``, no TLS."""

    model_config = ConfigDict(extra="forbid")

    #: Our certificate (PEM, with its chain) and its private key.
    cert: Path | None = None
    key: Path | None = None
    #: CA certificates (PEM) a client's certificate must chain to; set, every client needs one.
    client_ca: Path | None = None

    @model_validator(mode="after")
    def _whole(self) -> Self:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS needs both cert and key")
        if self.client_ca is not None and self.cert is None:
            raise ValueError("client_ca needs cert and key: mutual TLS is TLS first")
        return self

    def context(self) -> ssl.SSLContext | None:
        """The listener's context, or None without TLS; OSError or ssl.SSLError for unreadable files."""
        if self.cert is None or self.key is None:
            return None
        return server_context(self.cert, self.key, self.client_ca)
