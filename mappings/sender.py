"""Per-sender mapping settings, kept as plain data so the ``OVERREAD_CONFIG`` YAML can feed them."""

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

from mappings.concept_map import ConceptMap
from mappings.v2 import EMPTY_FIELD, Field, Message, Segment

AUTHORITY_PREFIX = "urn:overread:assigning-authority:"
#: What identifies a sender: MSH-3 alone, or MSH-3 with MSH-4 (None: MSH-3 with MSH-4 when MSH-4 is sent).
IdentifiedBy = Literal["msh3", "msh3+msh4"] | None
_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})-([1-9][0-9]*)(?:\.([1-9][0-9]*))?$")


@dataclass(frozen=True)
class FieldPath:
    """Where a value sits in a v2 message: ``SEG-n`` (a field) or ``SEG-n.m`` (one component of it)."""

    segment: str
    field: int
    component: int | None = None

    @classmethod
    def parse(cls, text: str) -> "FieldPath":
        m = _PATH.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not a field path like OBR-18 or ZDS-1.1")
        return cls(m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None)

    def __str__(self) -> str:
        return f"{self.segment}-{self.field}" + (f".{self.component}" if self.component else "")

    def locate(self, near: Sequence[Segment], msg: Message) -> Field:
        """The field in the first ``near`` segment of that name (the order's own), else the message's first."""
        seg = next((s for s in near if s.name == self.segment), None) or msg.segment(self.segment)
        return seg.field(self.field) if seg else EMPTY_FIELD

    def value(self, near: Sequence[Segment], msg: Message) -> str:
        """The text there: the component, or the field's first component (first repetition)."""
        found = self.locate(near, msg)
        return found.component(self.component) if self.component else found.value


@dataclass(frozen=True)
class FieldOverrides:
    """Where one sender puts what the order mapping reads, when not where v2.5.1 says (None: the standard place).

    ``accession`` instead of OBR-18 (ORM^O01) / IPC-1 (OMI^O23); ``study_uid`` instead of ZDS-1.1 /
    IPC-3; ``procedure_code`` (a whole CWE field) instead of OBR-4; ``priority`` (a table 0027 code)
    instead of ORC-7.6 / TQ1-9.
    """

    accession: FieldPath | None = None
    study_uid: FieldPath | None = None
    procedure_code: FieldPath | None = None
    priority: FieldPath | None = None


@dataclass(frozen=True)
class SenderConfig:
    """How one sending system's identifiers and times are read.

    ``identifier_systems`` maps an assigning authority namespace (CX-4.1, EI-2, HD-1) to a FHIR
    identifier system; an authority given as an ISO OID becomes ``urn:oid:<oid>`` without any
    setting; any other authority becomes ``<authority_prefix><namespace>``. ``default_system`` is
    for identifiers with no authority at all (else the sending facility, MSH-4, is their authority).
    ``timezone`` is the IANA zone of times sent without an offset (FHIR needs one).
    ``concept_maps`` translate the sender's codes (codings added beside the sender's own);
    ``fields`` says where the sender puts things; ``default_priority`` (a request-priority code)
    is the priority of orders that carry none. ``identified_by`` says which MSH fields identify
    the sender (``sender_identity``); ``name`` names the configuration entry, for people.
    """

    identifier_systems: Mapping[str, str] = field(default_factory=dict)
    authority_prefix: str = AUTHORITY_PREFIX
    default_system: str | None = None
    timezone: str = "UTC"
    concept_maps: tuple[ConceptMap, ...] = ()
    fields: FieldOverrides = FieldOverrides()
    default_priority: str | None = None
    identified_by: IdentifiedBy = None
    name: str = ""

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
        if universal_id:
            return universal_id_system(universal_id, universal_id_type, self.authority_prefix)
        return None


def universal_id_system(universal_id: str, universal_id_type: str, prefix: str) -> str:
    """A URI for an HD universal id (HD-2) of type HD-3 (table 0301) that is no OID: ``urn:uuid:`` for
    UUID, the id itself for a URI, else ``<prefix><type>:<id>`` (``...:CLIA:1234``), never a bare id."""
    kind = universal_id_type.upper()
    if kind == "UUID" and re.fullmatch(r"[0-9A-Fa-f-]{36}", universal_id):
        return f"urn:uuid:{universal_id.lower()}"
    if kind == "URI" and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$", universal_id):
        return universal_id
    return f"{prefix}{quote(kind or 'HD', safe='')}:{quote(universal_id, safe='')}"


#: The settings of the sender of MSH-3 and MSH-4 (``OverreadConfig.sender``), None for one not configured.
Senders = Callable[[str, str], SenderConfig | None]


def sender_settings(message: Message, senders: Senders | None) -> SenderConfig | None:
    """The settings intake maps ``message`` with: those of the first sender entry matching its MSH-3 and MSH-4."""
    msh = message.msh
    return senders(msh.field(3).value, msh.field(4).value) if senders else None


def sender_identity(message: Message, config: SenderConfig | None) -> tuple[str, ...]:
    """What identifies the message's sender: (MSH-3, MSH-4), or (MSH-3,) alone.

    HL7 v2.5.1 §2.15.9.3 and §2.15.9.4: MSH-3 and MSH-4 together name the sending system, but MSH-4 is
    optional and many small RIS leave it empty. A sender entry's ``identified_by: msh3`` makes
    MSH-3 alone the identity (MSH-4 may vary); ``msh3+msh4`` always uses both; by default MSH-3
    alone identifies the sender when MSH-4 is empty. A message's control id (MSH-10) is unique
    per identity.
    """
    msh = message.msh
    application, facility = msh.field(3).value, msh.field(4).value
    by = config.identified_by if config else None
    if by == "msh3" or (by is None and not facility):
        return (application,)
    return (application, facility)
