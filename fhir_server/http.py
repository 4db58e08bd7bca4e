"""The request and response the FHIR core speaks; web frameworks adapt to these."""

from dataclasses import dataclass, field
from typing import Any

from fhir_server import dates
from fhir_server.access import Access
from fhir_server.errors import FhirError
from fhir_server.repository import Stored


@dataclass
class FhirRequest:
    method: str
    #: Path below the FHIR base, without leading slash: "Patient/1/_history/2".
    path: str
    params: list[tuple[str, str]] = field(default_factory=list)
    #: Header names in lower case.
    headers: dict[str, str] = field(default_factory=dict)
    #: The parsed JSON body, if any.
    body: Any = None
    #: Who asks and what they may do (``fhir_server.access``); None: unrestricted (auth off, internal doors).
    access: Access | None = None
    #: The client's network address, for the audit log (``fhir_server.balp``); None for internal doors.
    peer: str | None = None

    @property
    def parts(self) -> list[str]:
        """The path's segments, "Patient/1/_history/2" → ["Patient", "1", "_history", "2"]; [] at the base."""
        return [p for p in self.path.strip("/").split("/") if p]

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def prefer(self, key: str) -> str | None:
        """A token of the Prefer header (RFC 7240), e.g. prefer("return") -> "minimal"."""
        for part in (self.header("prefer") or "").split(","):
            name, _, value = part.strip().partition("=")
            if name.strip() == key:
                return value.strip().strip('"')
        return None


@dataclass
class FhirResponse:
    status: int
    #: A JSON-serialisable body (orjson.Fragment allowed for stored JSON), or None.
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: The resource (version) the answer is about: read, written; for the audit log (``fhir_server.balp``).
    about: Stored | None = None

    @classmethod
    def of(cls, exc: FhirError) -> "FhirResponse":
        """The OperationOutcome response of an error."""
        return cls(exc.status, exc.outcome, dict(exc.headers))


def version_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": dates.http_date(stored.last_updated)}
