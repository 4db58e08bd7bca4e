"""The ``OVERREAD_CONFIG`` YAML file: PACS peers, image linking, HL7 senders and destinations.

The documented shape (README, "Settings"; docs/image-linking.md, docs/delivery.md) plus
``hl7.senders``, the per-sender mapping settings an integration engineer adapts a new
sending system with, without code:

    hl7:
      senders:
        - name: epic                       # optional; for ``overread hl7 map --sender``
          sending_application: EPIC        # MSH-3; "" or absent = any
          sending_facility: STMARYS        # MSH-4; "" or absent = any
          identified_by: msh3+msh4         # or msh3; absent = MSH-3 alone when MSH-4 is empty
          identifier_systems:              # assigning authority (CX-4 / EI-2) → identifier system
            STMARYS: urn:oid:2.16.840.1.113883.3.72.5.9.1.2
          default_system: urn:oid:2.16.840.1.113883.3.72.5.9.1
          timezone: Europe/Stockholm       # for times sent without an offset
          concept_maps: [maps/epic-procedures.json]  # FHIR R4 ConceptMaps, relative to this file
          fields:                          # where this sender puts things (SEG-n or SEG-n.m)
            accession: ZDS-2               # instead of OBR-18 / IPC-1
          defaults:
            priority: routine              # when the order carries none
          allow:                           # where it may send from (docs/security.md); one has it, all need it
            addresses: [10.20.0.0/16]      # networks or addresses
            subjects: [ris.example.org]    # TLS client certificate subjects (RFC 4514) or common names

The first sender entry that matches a message's MSH-3 and MSH-4 applies. The ConceptMap files are
read and checked once, when the configuration is loaded; docs/hl7-mapping-config.md has the rules. ``linking`` sets
how patiently the image-linking job tries (defaults shown)::

    linking:
      max_attempts: 10             # then images-not-found / pacs-unreachable / images-unavailable on the Task
      first_retry_seconds: 30      # doubling after each attempt ...
      max_retry_seconds: 3600      # ... up to this
      timeout_seconds: 30          # of one DICOM or DICOMweb exchange
      patient_match: strict        # strict | identifier | patient-id: for pushed studies and peers without one
      issuers: {}                  # IssuerOfPatientID → FHIR identifier system, likewise

Each ``pacs`` entry may set ``patient_match`` and ``issuers`` of its own (docs/image-linking.md).

``hl7.destinations`` receive ORU^R01 results and ``hl7.delivery`` sets how patiently (docs/delivery.md)::

    hl7:
      destinations:
        - name: ehr
          host: 127.0.0.1
          port: 2576
          sending_facility: ""         # results of orders from this MSH-4; "" = the default destination
          version: "2.5.1"             # or "2.3.1"
          ack_timeout_seconds: 30
          receiving_application: ""    # MSH-5; "" = the order's MSH-3
          receiving_facility: ""       # MSH-6; "" = the order's MSH-4
          send_preliminary: false      # preliminary reports too (OBR-25 P)
          tls: {ca: certs/ehr-ca.pem}  # MLLP over TLS; also cert and key, or true (docs/security.md)
      delivery:
        max_attempts: 24             # then the dead-letter list (GET /hl7/outbound?status=dead)
        first_retry_seconds: 5       # doubling after each attempt ...
        max_retry_seconds: 600       # ... up to this
        poll_seconds: 1

``dicom.allow`` lists the calling AEs our Storage SCP associates with, each from its addresses
(absent: any); without it, any caller. ``pacs[].tls`` is DICOM TLS to a peer, shaped as a
destination's ``tls`` (docs/security.md)::

    dicom:
      allow:
        - {ae_title: ORTHANC, addresses: [10.20.1.5]}

``routing`` assigns a new case's reader (Task.owner) and ``due`` its due date by priority
(``cases.routing``; docs/workflow.md)::

    routing:                       # the first rule that matches wins; criteria left out match anything
      - owner: {reference: Organization/neuro-group, display: Neuroradiology}   # or Practitioner/...
        performer_type: neuro      # ServiceRequest.performerType code, display or text
        modality: [CT, MR]         # DICOM (DCM) codes in ServiceRequest.code / category / orderDetail
        body_site: [HEAD, BRAIN]   # ServiceRequest.bodySite code, display or text
    due:                           # authoredOn + this = Task.restriction.period.end (defaults shown)
      routine: 72h                 # s, m, h, d, an ISO 8601 duration, seconds; null = no due date
      urgent: 24h
      asap: 8h
      stat: 1h
"""

import json
import re
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from cryptography import x509
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    IPvAnyNetwork,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from cases.patient_match import MatchRule, Mode
from cases.routing import Routing, Rule
from fhir_server.access import Role, check_filters
from fhir_server.egress import Egress, Prefix, Refused
from fhir_server.outbox import Backoff
from fhir_server.scopes import ScopeError, parse_all
from fhir_server.smart import Client, Jwks
from hl7_bridge.outbound import NO_DESTINATION
from mappings.concept_map import ConceptMap, ConceptMapError, parse_concept_map
from mappings.sender import FieldOverrides, FieldPath, IdentifiedBy, SenderConfig
from overread.allow import Peer, address, in_networks, subject, subject_matches
from overread.tls import client_context


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not silently ignored


def _tls_shorthand(value: Any) -> Any:
    """``tls: true`` is TLS checked against the system's CAs, without a client certificate; ``false``, none."""
    return {} if value is True else None if value is False else value


class ClientTls(_Strict):
    """TLS to a peer (docs/security.md, "TLS"): 1.2 or later, its certificate checked for its host."""

    #: CA certificates (PEM) the peer's certificate must chain to; absent = the system's.
    ca: Path | None = None
    #: Our client certificate (PEM) and its key, for a peer that asks for one.
    cert: Path | None = None
    key: Path | None = None
    _context: ssl.SSLContext | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _load(self, info: ValidationInfo) -> Self:
        """Read the files now (relative to the configuration file's folder): a wrong path stops start-up."""
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")
        base = Path((info.context or {}).get("base", "."))

        def path(value: Path | None) -> Path | None:
            return None if value is None else base / value.expanduser()

        try:
            self._context = client_context(path(self.ca), path(self.cert), path(self.key))
        except OSError as exc:  # ssl.SSLError is one
            raise ValueError(f"TLS: {exc}") from exc
        return self

    def context(self) -> ssl.SSLContext:
        assert self._context is not None, "validated"
        return self._context


class _Called(_Strict):
    """A peer we call, over TLS when ``tls`` is set."""

    tls: Annotated[ClientTls | None, BeforeValidator(_tls_shorthand)] = None

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls.context() if self.tls is not None else None


class PacsPeer(_Called):
    name: str
    ae_title: str
    host: str
    port: int
    qido_url: str | None = None
    retrieve: Literal["c-move", "c-get", "wado-rs", "none"] = "c-move"
    #: IANA zone of the PACS's local dates and times, for answers without TimezoneOffsetFromUTC.
    timezone: str | None = None
    #: How this PACS's patients are reconciled with the order's (docs/image-linking.md); absent = ``linking:``'s.
    patient_match: Mode | None = None
    #: IssuerOfPatientID values this PACS sends → FHIR identifier systems; absent = ``linking:``'s.
    issuers: dict[str, str] | None = None


class _Retrying(_Strict):
    """A worker's patience: first_retry_seconds, doubling after each attempt, at most max_retry_seconds."""

    max_attempts: Annotated[int, Field(ge=1)] = 10
    first_retry_seconds: Annotated[float, Field(ge=0)] = 30
    max_retry_seconds: Annotated[float, Field(ge=0)] = 3600

    def backoff(self) -> Backoff:
        first, most = timedelta(seconds=self.first_retry_seconds), timedelta(seconds=self.max_retry_seconds)
        return Backoff(self.max_attempts, first, most)


class Linking(_Retrying):
    timeout_seconds: Annotated[float, Field(gt=0)] = 30
    #: The patient match of the image store (pushed studies) and of peers that set none.
    patient_match: Mode = "strict"
    issuers: dict[str, str] = Field(default_factory=dict)

    def rule(self, peer: PacsPeer | None = None) -> MatchRule:
        """The patient match rule of ``peer`` (its own keys, else these), or of the image store."""
        mode = peer.patient_match if peer is not None and peer.patient_match else self.patient_match
        issuers = peer.issuers if peer is not None and peer.issuers is not None else self.issuers
        return MatchRule(mode, dict(issuers))


class Subscriptions(_Retrying):
    """How patiently a Subscription notification is delivered (docs/subscriptions.md): about 2.5 hours."""

    max_attempts: Annotated[int, Field(ge=1)] = 24
    first_retry_seconds: Annotated[float, Field(ge=0)] = 5
    max_retry_seconds: Annotated[float, Field(ge=0)] = 600
    timeout_seconds: Annotated[float, Field(gt=0)] = 10
    #: The URL prefixes a Subscription's channel.endpoint must fall under (docs/security.md); none: no endpoint.
    allowed_endpoints: list[str] = Field(default_factory=list)

    @field_validator("allowed_endpoints")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                Prefix.parse(text)
            except Refused as exc:
                raise ValueError(str(exc)) from exc
        return value

    def egress(self) -> Egress:
        return Egress(tuple(Prefix.parse(text) for text in self.allowed_endpoints))


class Destination(_Called):
    """Where ORU^R01 results go (docs/delivery.md): one ordered queue per destination."""

    name: str
    host: str
    port: int
    #: Results of orders from this MSH-4 come here; "" = the default destination, for results of orders
    #: from a facility with no destination of its own and of orders that came over FHIR.
    sending_facility: str = ""
    version: Literal["2.5.1", "2.3.1"] = "2.5.1"
    ack_timeout_seconds: Annotated[float, Field(gt=0)] = 30
    #: MSH-5 / MSH-6; "" = the ordering system's MSH-3 / MSH-4 when the order came over HL7.
    receiving_application: str = ""
    receiving_facility: str = ""
    #: Also send preliminary reports (OBR-25 P); final, amended, corrected and appended ones always go.
    send_preliminary: bool = False


class Delivery(_Retrying):
    """How patiently an ORU^R01 is delivered before it goes to the dead-letter list (about 3 hours)."""

    max_attempts: Annotated[int, Field(ge=1)] = 24
    first_retry_seconds: Annotated[float, Field(ge=0)] = 5
    max_retry_seconds: Annotated[float, Field(ge=0)] = 600
    poll_seconds: Annotated[float, Field(gt=0)] = 1
    #: How long a worker that died holds the message it was building or sending.
    lease_seconds: Annotated[float, Field(gt=0)] = 120


class SenderFields(_Strict):
    """Where a sender puts what the order mapping reads (``SEG-n`` or ``SEG-n.m``); absent = the standard place."""

    accession: str | None = None  # instead of OBR-18 / IPC-1
    study_uid: str | None = None  # instead of ZDS-1.1 / IPC-3
    procedure_code: str | None = None  # a whole CWE field, instead of OBR-4
    priority: str | None = None  # a table 0027 code, instead of ORC-7.6 / TQ1-9

    @field_validator("accession", "study_uid", "procedure_code", "priority")
    @classmethod
    def _is_a_path(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            path = FieldPath.parse(value)  # a ValueError names the bad path
            if info.field_name == "procedure_code" and path.component is not None:
                raise ValueError(f"{value!r}: a procedure code is a whole coded field (SEG-n), not a component")
        return value

    def overrides(self) -> FieldOverrides:
        def path(value: str | None) -> FieldPath | None:
            return FieldPath.parse(value) if value else None

        return FieldOverrides(
            path(self.accession), path(self.study_uid), path(self.procedure_code), path(self.priority)
        )


class SenderDefaults(_Strict):
    """Values for what a sender leaves empty."""

    priority: Literal["routine", "urgent", "asap", "stat"] | None = None  # a FHIR request-priority code


class SenderAllow(_Strict):
    """Who may send as a sender (docs/security.md, "Allow-lists"): every list given must match."""

    #: Source addresses: networks (CIDR) or single addresses.
    addresses: list[IPvAnyNetwork] = Field(default_factory=list)
    #: TLS client certificate subjects (RFC 4514), or common names.
    subjects: list[str] = Field(default_factory=list)
    _subjects: tuple[x509.Name | str, ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _read_subjects(self) -> Self:
        if not self.addresses and not self.subjects:
            raise ValueError("allow needs addresses, subjects or both")
        self._subjects = tuple(subject(s) for s in self.subjects)  # a ValueError names a malformed one
        return self

    def admits(self, peer: Peer) -> bool:
        return (not self.addresses or in_networks(peer.address, self.addresses)) and (
            not self.subjects or subject_matches(self._subjects, peer.subject)
        )


class Sender(_Strict):
    #: For people and ``overread hl7 map --sender``; unique when given.
    name: str | None = None
    sending_application: str = ""
    sending_facility: str = ""
    #: What identifies this sender, so keys its control ids (MSH-10): ``msh3`` or ``msh3+msh4``;
    #: absent = MSH-3 and MSH-4, or MSH-3 alone when MSH-4 is empty (``mappings.sender.sender_identity``).
    identified_by: IdentifiedBy = None
    identifier_systems: dict[str, str] = Field(default_factory=dict)
    default_system: str | None = None
    timezone: str = "UTC"
    concept_maps: list[str] = Field(default_factory=list)
    fields: SenderFields = Field(default_factory=SenderFields)
    defaults: SenderDefaults = Field(default_factory=SenderDefaults)
    #: Where messages as this sender may come from; once one sender has it, every one needs it.
    allow: SenderAllow | None = None
    _concept_maps: tuple[ConceptMap, ...] = PrivateAttr(default=())

    @field_validator("timezone")
    @classmethod
    def _a_zone(cls, value: str) -> str:
        """A misspelt zone is refused now, not when the first message with a local time comes."""
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"{value!r} is not an IANA time zone") from exc
        return value

    @model_validator(mode="after")
    def _read_concept_maps(self, info: ValidationInfo) -> Self:
        """Read and check the ConceptMap files now (relative to the configuration file's folder)."""
        base = Path((info.context or {}).get("base", "."))
        self._concept_maps = tuple(_read_concept_map(base / Path(p).expanduser()) for p in self.concept_maps)
        return self

    def matches(self, application: str, facility: str) -> bool:
        return self.sending_application in ("", application) and self.sending_facility in ("", facility)

    def settings(self, label: str = "") -> SenderConfig:
        """The mapping settings of this sender; ``label`` names the entry when it has no ``name``."""
        return SenderConfig(
            identifier_systems=self.identifier_systems,
            default_system=self.default_system,
            timezone=self.timezone,
            concept_maps=self._concept_maps,
            fields=self.fields.overrides(),
            default_priority=self.defaults.priority,
            identified_by=self.identified_by,
            name=self.name or label,
        )


def _read_concept_map(path: Path) -> ConceptMap:
    try:
        return parse_concept_map(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:  # JSONDecodeError and ConceptMapError are ValueErrors
        reason = exc if isinstance(exc, ConceptMapError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"ConceptMap file {path}: {reason}") from exc


class Hl7(_Strict):
    senders: list[Sender] = Field(default_factory=list)
    destinations: list[Destination] = Field(default_factory=list)
    delivery: Delivery = Field(default_factory=Delivery)

    @field_validator("destinations")
    @classmethod
    def _unique_names(cls, value: list[Destination]) -> list[Destination]:
        names = [d.name for d in value]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must be unique: {names}")
        if NO_DESTINATION in names:
            raise ValueError(f"{NO_DESTINATION!r} is no destination name: it marks results that have none")
        return value

    @field_validator("senders")
    @classmethod
    def _unique_sender_names(cls, value: list[Sender]) -> list[Sender]:
        names = [s.name for s in value if s.name is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"sender names must be unique: {names}")
        without = [s.name or f"hl7.senders[{n}]" for n, s in enumerate(value) if s.allow is None]
        if len(without) not in (0, len(value)):
            raise ValueError(f"once a sender has allow, every one needs it; these have none: {without}")
        return value

    @property
    def allow_listed(self) -> bool:
        return any(s.allow for s in self.senders)

    def refusal(self, application: str, facility: str, peer: Peer) -> str | None:
        """Why a message of MSH-3 ``application`` and MSH-4 ``facility`` from ``peer`` is refused;
        None when it is admitted (always, without allow-lists)."""
        if not self.allow_listed:
            return None
        for n, sender in enumerate(self.senders):
            if sender.matches(application, facility):
                label = sender.name or f"hl7.senders[{n}]"
                admitted = sender.allow is not None and sender.allow.admits(peer)
                return None if admitted else f"sender {label} is not allowed from {peer}"
        return f"no sender matches MSH-3 {application!r} MSH-4 {facility!r} (from {peer})"


class DicomCaller(_Strict):
    """A calling AE our Storage SCP associates with (docs/security.md, "Allow-lists")."""

    ae_title: Annotated[str, Field(min_length=1, max_length=16)]
    #: Where it may call from: networks (CIDR) or single addresses; absent = anywhere.
    addresses: list[IPvAnyNetwork] = Field(default_factory=list)


class Dicom(_Strict):
    #: The calling AEs our Storage SCP accepts; empty = any.
    allow: list[DicomCaller] = Field(default_factory=list)

    def admits(self, calling_ae: str, host: str) -> bool:
        """Whether ``calling_ae`` may associate from ``host`` (AE titles compared without their padding)."""
        host = address(host)
        return any(
            c.ae_title.strip() == calling_ae.strip() and (not c.addresses or in_networks(host, c.addresses))
            for c in self.allow
        )


#: Task.owner's target types (R4) a routing rule may name.
OWNER_TYPES = (
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "CareTeam",
    "HealthcareService",
    "Device",
    "Patient",
    "RelatedPerson",
)
_SHORT_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _duration(value: Any) -> Any:
    """``72h``, ``30m``, ``2d``, ``90s`` as a timedelta; anything else is pydantic's (seconds, ISO 8601)."""
    if isinstance(value, str) and (m := _SHORT_DURATION.match(value)):
        return timedelta(**{_UNITS[m[2]]: float(m[1])})
    return value


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Duration = Annotated[timedelta, BeforeValidator(_duration), Field(ge=timedelta(0))]
Codes = Annotated[list[str], BeforeValidator(_as_list)]


class OwnerReference(_Strict):
    reference: str
    display: str | None = None

    @field_validator("reference")
    @classmethod
    def _an_owner(cls, value: str) -> str:
        kind, _, rid = value.partition("/")
        if kind not in OWNER_TYPES or not rid:
            raise ValueError(f"{value!r}: an owner is a reference such as Organization/id or Practitioner/id")
        return value


class RoutingRule(_Strict):
    owner: OwnerReference
    performer_type: str | None = None
    modality: Codes = Field(default_factory=list)
    body_site: Codes = Field(default_factory=list)

    def rule(self) -> Rule:
        return Rule(
            self.owner.model_dump(exclude_none=True), self.performer_type, tuple(self.modality), tuple(self.body_site)
        )


class Due(_Strict):
    """Time from the order's authoredOn to its case's due date, by request priority."""

    routine: Duration | None = timedelta(hours=72)
    urgent: Duration | None = timedelta(hours=24)
    asap: Duration | None = timedelta(hours=8)
    stat: Duration | None = timedelta(hours=1)


class AuthClient(_Strict):
    """A client registered for SMART Backend Services (docs/security.md)."""

    client_id: Annotated[str, Field(min_length=1, max_length=255)]
    #: Its public keys: a JWK Set inline, or the URL it publishes one at.
    jwks: dict[str, Any] | None = None
    jwks_url: str | None = None
    #: The most it may be granted (space-separated SMART scopes).
    scope: str
    role: Role | None = None
    #: ``system|value`` of its Organization identifier.
    organization: str | None = None

    @field_validator("jwks")
    @classmethod
    def _public_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            if any(isinstance(k, dict) and "d" in k for k in value.get("keys", [])):
                raise ValueError("jwks holds a private key: register the public key only")
            try:
                KeySet.import_key_set(value)  # type: ignore[arg-type]
            except (JoseError, ValueError, TypeError) as exc:
                raise ValueError(f"jwks is not a JWK Set: {exc}") from exc
        return value

    @field_validator("scope")
    @classmethod
    def _scopes(cls, value: str) -> str:
        try:
            parsed = parse_all(value)
            check_filters(parsed)
        except ScopeError as exc:
            raise ValueError(str(exc)) from exc
        if not parsed:
            raise ValueError(f"{value!r} holds no system/ scope")
        return value

    @field_validator("organization")
    @classmethod
    def _identifier(cls, value: str | None) -> str | None:
        if value is not None and "|" not in value:
            raise ValueError(f"{value!r}: an organization is its identifier's system|value")
        return value

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        if (self.jwks is None) == (self.jwks_url is None):
            raise ValueError(f"client {self.client_id!r} needs jwks or jwks_url (one of them)")
        return self

    @model_validator(mode="after")
    def _compartment(self) -> Self:
        # its organization is what the role's compartment is made of (docs/security.md, "Roles")
        if self.role in ("ordering", "reader", "insurer") and self.organization is None:
            raise ValueError(f"client {self.client_id!r} has role {self.role} but no organization")
        return self

    def client(self) -> Client:
        inline = KeySet.import_key_set(self.jwks) if self.jwks is not None else None  # type: ignore[arg-type]
        jwks = Jwks(inline, self.jwks_url)
        return Client(self.client_id, jwks, tuple(parse_all(self.scope)), self.role, self.organization)


class Auth(_Strict):
    clients: list[AuthClient] = Field(default_factory=list)
    #: How long an access token lives.
    token_seconds: Annotated[int, Field(ge=1, le=3600)] = 300

    @field_validator("clients")
    @classmethod
    def _unique_ids(cls, value: list[AuthClient]) -> list[AuthClient]:
        ids = [c.client_id for c in value]
        if len(set(ids)) != len(ids):
            raise ValueError(f"client_id values must be unique: {ids}")
        return value

    def registered(self) -> dict[str, Client]:
        return {c.client_id: c.client() for c in self.clients}


class OverreadConfig(_Strict):
    pacs: list[PacsPeer] = Field(default_factory=list)
    linking: Linking = Linking()
    hl7: Hl7 = Field(default_factory=Hl7)
    dicom: Dicom = Field(default_factory=Dicom)
    subscriptions: Subscriptions = Field(default_factory=Subscriptions)
    routing: list[RoutingRule] = Field(default_factory=list)
    due: Due = Field(default_factory=Due)
    auth: Auth = Field(default_factory=Auth)

    def routing_rules(self) -> Routing:
        """The routing rules and due times as the case hook takes them."""
        due = {priority: time for priority, time in self.due.model_dump().items() if time is not None}
        return Routing(tuple(r.rule() for r in self.routing), due)

    def sender(self, application: str, facility: str) -> SenderConfig | None:
        """The mapping settings of the first sender entry matching MSH-3 and MSH-4, if any."""
        for n, sender in enumerate(self.hl7.senders):
            if sender.matches(application, facility):
                return sender.settings(f"hl7.senders[{n}]")
        return None

    def sender_named(self, name: str) -> SenderConfig | None:
        """The mapping settings of the sender entry called ``name``, if any."""
        return next((s.settings() for s in self.hl7.senders if s.name == name), None)


class ConfigError(ValueError):
    pass


def load(path: Path | None) -> OverreadConfig:
    """Read and check the file; an empty configuration when there is none."""
    if path is None:
        return OverreadConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return OverreadConfig.model_validate(data, context={"base": path.parent})
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(f"OVERREAD_CONFIG {path}: {exc}") from exc
