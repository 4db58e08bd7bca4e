"""Per-sender mapping settings, kept as plain data so the ``OVERREAD_CONFIG`` YAML can feed them."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

AUTHORITY_PREFIX = "urn:overread:assigning-authority:"


@dataclass(frozen=True)
class SenderConfig:
    """How one sending system's identifiers and times are read.

    ``identifier_systems`` maps an assigning authority namespace (CX-4.1, EI-2, HD-1) to a FHIR
    identifier system; an authority given as an ISO OID becomes ``urn:oid:<oid>`` without any
    setting; any other authority becomes ``<authority_prefix><namespace>``. ``default_system`` is
    for identifiers with no authority at all (else the sending facility, MSH-4, is their authority).
    ``timezone`` is the IANA zone of times sent without an offset (FHIR needs one).
    """

    identifier_systems: Mapping[str, str] = field(default_factory=dict)
    authority_prefix: str = AUTHORITY_PREFIX
    default_system: str | None = None
    timezone: str = "UTC"

    def system_for(self, namespace: str, universal_id: str = "", universal_id_type: str = "") -> str | None:
        """The identifier system of an assigning authority (HD: namespace, universal id, its type)."""
        if namespace in self.identifier_systems:
            return self.identifier_systems[namespace]
        if universal_id and universal_id_type.upper() == "ISO":
            return f"urn:oid:{universal_id}"
        if universal_id and universal_id in self.identifier_systems:
            return self.identifier_systems[universal_id]
        if namespace:
            return f"{self.authority_prefix}{quote(namespace, safe='')}"
        return None
