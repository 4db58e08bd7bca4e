"""The one typed settings object, read from ``OVERREAD_*`` environment variables."""

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from dicom_bridge.storage_scp import Limits as ScpLimits
from fhir_server.db import DEFAULT_POOLS, Pools
from fhir_server.limits import DEFAULT, Limits
from fhir_server.rate_limit import Rate
from fhir_server.search_limits import SearchLimits
from overread.tls import ServerTls

SCP_DEFAULT = ScpLimits()


class Settings(BaseSettings):
    # A nested group's fields by OVERREAD_<GROUP>__<FIELD>, e.g. OVERREAD_SEARCH__TIMEOUT.
    model_config = SettingsConfigDict(env_prefix="OVERREAD_", env_nested_delimiter="__")

    database_url: str = "sqlite:///./overread.db"
    #: PostgreSQL connections of the process by who holds them (``fhir_server.db.Pools``).
    pools: Pools = DEFAULT_POOLS
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    mllp_host: str = "127.0.0.1"
    mllp_port: int = 2575
    #: MLLP limits (docs/reliability.md, "HL7 over MLLP"): a block's bytes, a message's segments,
    #: seconds a connection may stay silent, open connections per peer address and in total.
    mllp_max_message_size: int = 10 * 1024 * 1024
    mllp_max_segments: int = 10_000
    mllp_idle_timeout: float = 60.0
    mllp_max_connections: int = 256
    mllp_max_connections_per_address: int = 64
    #: MLLP over TLS (docs/security.md, "TLS"): OVERREAD_MLLP_TLS__CERT, __KEY, __CLIENT_CA.
    mllp_tls: ServerTls = ServerTls()
    dicom_ae_title: str = "OVERREAD"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    #: DICOM TLS for the Storage SCP (PS3.15 B.9; docs/security.md): OVERREAD_DICOM_TLS__CERT, __KEY, __CLIENT_CA.
    dicom_tls: ServerTls = ServerTls()
    #: Where retrieved and pushed DICOM instances are kept.
    image_store: Path = Path("./images")
    #: The Storage SCP's limits (docs/reliability.md, "DICOM"): associations at once (from their
    #: A-ASSOCIATE-RQ), connections still without one, seconds to send it (ARTIM) and of silence in an
    #: association, bytes of one data set and of all held while they arrive, free bytes the store keeps;
    #: associations of one peer address at once, seconds an association may last.
    dicom_max_associations: int = SCP_DEFAULT.max_associations
    dicom_max_associations_per_address: int = SCP_DEFAULT.max_associations_per_address
    dicom_max_association_time: float = SCP_DEFAULT.max_association_time
    dicom_max_pending: int = SCP_DEFAULT.max_pending
    dicom_associate_timeout: float = SCP_DEFAULT.associate_timeout
    dicom_idle_timeout: float = SCP_DEFAULT.idle_timeout
    dicom_max_data_set_bytes: int = SCP_DEFAULT.max_data_set
    dicom_max_buffered_bytes: int = SCP_DEFAULT.max_buffered
    image_store_min_free_bytes: int = 1 << 30
    config: Path | None = None
    #: Absolute base URL the server names itself by in Location headers and Bundle links.
    #: Empty means: derive it from each request.
    public_base_url: str = ""
    #: What one search may ask of the database (docs/reliability.md, "Search and the index").
    search: SearchLimits = SearchLimits()

    # -- What the HTTP door accepts (docs/reliability.md#http-and-fhir; fhir_server.limits) --
    #: Request header lines and their bytes together (431 beyond).
    http_max_headers: int = DEFAULT.max_headers
    http_max_header_bytes: int = DEFAULT.max_header_bytes
    #: Bytes of a request body, counted as it arrives (413 beyond).
    http_max_body_bytes: int = DEFAULT.max_body_bytes
    #: Levels of JSON nesting in a body (400 beyond), characters of one JSON string (422 beyond),
    #: entries of a batch or transaction Bundle (413 beyond).
    fhir_max_json_depth: int = DEFAULT.max_depth
    fhir_max_string: int = DEFAULT.max_string
    fhir_max_bundle_entries: int = DEFAULT.max_bundle_entries

    #: Seconds a request's headers may take to arrive whole, and its body after them (408 beyond);
    #: seconds an idle keep-alive connection is kept; HTTP connections open at once (503 and
    #: closed beyond).
    http_header_timeout: float = 10.0
    http_body_timeout: float = 30.0
    http_keep_alive_timeout: int = 5
    http_max_connections: int = 256
    #: Requests each client may make per second on average, and in one burst (429 beyond;
    #: docs/security.md#rate-limits); a client is its access token's client_id, else its address.
    #: A rate of 0: no limit.
    http_rate_per_second: Annotated[float, Field(ge=0)] = 500.0
    http_rate_burst: Annotated[int, Field(ge=1)] = 1000

    #: Access control (docs/security.md): ``smart`` needs a SMART Backend Services token on every HTTP
    #: request but the open ones; ``off`` serves anyone and is refused unless every listener binds a
    #: loopback address. Unset: ``off`` when every listener is on loopback, else ``smart``.
    auth: Literal["smart", "off"] | None = None

    #: Whether successful reads and searches are audited (docs/security.md, "Audit"); writes, refusals
    #: and failures always are. Off only for benchmarks.
    audit_reads: bool = True

    #: Debugging only: show query strings in the access log and bound parameters in SQL errors,
    #: which hold PHI (names, birth dates, identifiers); off, the logs leave them out.
    log_sensitive: bool = False

    def auth_mode(self) -> Literal["smart", "off"]:
        """``auth`` as it applies; ValueError naming the listener when ``off`` would serve beyond loopback."""
        exposed = [
            f"{name} listener on {host!r}"
            for name, host in (("HTTP", self.http_host), ("MLLP", self.mllp_host), ("DICOM", self.dicom_host))
            if not _loopback(host)
        ]
        if self.auth == "off" and exposed:
            raise ValueError(f"OVERREAD_AUTH=off is allowed only on loopback, but the {exposed[0]} is not")
        return self.auth or ("smart" if exposed else "off")

    def http_rate(self) -> Rate | None:
        return Rate(self.http_rate_per_second, self.http_rate_burst) if self.http_rate_per_second else None

    def dicom_limits(self) -> ScpLimits:
        """The Storage SCP's limits (``dicom_bridge.storage_scp.StorageScp``)."""
        return ScpLimits(
            max_associations=self.dicom_max_associations,
            max_pending=self.dicom_max_pending,
            associate_timeout=self.dicom_associate_timeout,
            idle_timeout=self.dicom_idle_timeout,
            max_data_set=self.dicom_max_data_set_bytes,
            max_buffered=self.dicom_max_buffered_bytes,
            max_associations_per_address=self.dicom_max_associations_per_address,
            max_association_time=self.dicom_max_association_time,
        )

    def http_limits(self) -> Limits:
        """The limits of the FHIR API's requests, as ``fhir_server.api.mount`` takes them."""
        return Limits(
            max_headers=self.http_max_headers,
            max_header_bytes=self.http_max_header_bytes,
            max_body_bytes=self.http_max_body_bytes,
            max_depth=self.fhir_max_json_depth,
            max_string=self.fhir_max_string,
            max_bundle_entries=self.fhir_max_bundle_entries,
        )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to any address


@lru_cache
def get_settings() -> Settings:
    return Settings()
