"""The parts of a transaction Bundle every inbound message makes: the Builder that collects its entries,
the sender (``MSH[Provenance-Source]``, ``HD[Organization]``) and the Provenance that ties the entries
to the message (IG message maps ``ORM_O01``, ``OMI_O23``, ``ORU_R01``).

``fullUrl``s are uuid5 of the message's sender, MSH-10 and the resource's role, so the same message
always yields the same Bundle. The Provenance names the message as ``urn:overread:message:<MSH-3>:<MSH-4>``
| MSH-10 (``message_system``); ``message_sender`` reads it back.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from urllib.parse import quote, unquote

from mappings.errors import REQUIRED_FIELD_MISSING, MappingError
from mappings.sender import SenderConfig
from mappings.v2 import Field, Message, Repetition, Segment
from mappings.v2_datatypes import Json, date_time, free_text, instant, practitioner
from mappings.vocabulary import NAMESPACE, PROVENANCE_PARTICIPANT

MESSAGE_SYSTEM = "urn:overread:message:"


def message_system(app: str, facility: str) -> str:
    """The identifier system of a sender's message control ids (MSH-10): its MSH-3 and MSH-4, URI-quoted."""
    return f"{MESSAGE_SYSTEM}{quote(app, safe='')}:{quote(facility, safe='')}"


def message_sender(system: str) -> tuple[str, str] | None:
    """(MSH-3, MSH-4) of a ``message_system``; None for any other system."""
    if not system.startswith(MESSAGE_SYSTEM):
        return None
    app, _, facility = system.removeprefix(MESSAGE_SYSTEM).partition(":")
    return unquote(app), unquote(facility)


def fallback_system(msg: Message, config: SenderConfig) -> str:
    """The identifier system of ids without an assigning authority: configured, else the sending facility's.

    A message without MSH-4 takes its sending application (MSH-3) as the authority, so ids from two
    such senders never fall into one system.
    """
    hd = _sender_hd(msg)
    sender_system = config.system_for(hd.component(1), hd.component(2), hd.component(3))
    return config.default_system or sender_system or "urn:overread:assigning-authority:unknown"


def _sender_hd(msg: Message) -> Field:
    """MSH-4 (sending facility), else MSH-3 (sending application) when MSH-4 is empty."""
    msh4 = msg.msh.field(4)
    return msh4 if msh4.component(1) or msh4.component(2) else msg.msh.field(3)


class Builder:
    """The entries of one message's transaction Bundle, with the message and its sender's settings."""

    def __init__(self, msg: Message, config: SenderConfig) -> None:
        self.msg = msg
        self.config = config
        msh = msg.msh
        self.app, self.facility = msh.field(3).component(1), msh.field(4).component(1)
        self.control_id = msh.field(10).value
        if not self.control_id:
            raise MappingError(REQUIRED_FIELD_MISSING, "MSH-10", "Message control id is missing")
        self.fallback = fallback_system(msg, config)
        self.entries: list[Json] = []
        self._by_url: dict[str, Json] = {}

    def full_url(self, role: str) -> str:
        key = f"{self.app}|{self.facility}|{self.control_id}|{role}"
        return f"urn:uuid:{uuid.uuid5(NAMESPACE, key)}"

    def add(self, role: str, resource: Json, match: Json | None = None, replace: bool = False) -> str:
        """Add a conditional create on ``match``, or with ``replace`` a conditional update (PUT)."""
        url = self.full_url(role)
        if url in self._by_url:
            return url  # one person in two roles (PV1-8 referrer, ORC-12 orderer): one entry
        request: Json = {"method": "POST", "url": resource["resourceType"]}
        if match:
            criteria = "identifier=" + quote(f"{match['system']}|{match['value']}", safe=":/|")
            if replace:
                request = {"method": "PUT", "url": f"{resource['resourceType']}?{criteria}"}
            else:
                request["ifNoneExist"] = criteria
        self.append({"fullUrl": url, "resource": resource, "request": request})
        return url

    def append(self, entry: Json) -> None:
        """Add a Bundle entry as it is, indexed by its fullUrl (a check per entry stays O(1))."""
        self._by_url[entry["fullUrl"]] = entry
        self.entries.append(entry)

    def resource(self, url: str) -> Json:
        """The resource of the entry at ``url`` (already added)."""
        resource: Json = self._by_url[url]["resource"]
        return resource

    def practitioner(self, xcn: Repetition, local_id: str) -> tuple[Json | None, Json | None]:
        """An XCN as (entry reference, contained resource): a shared Practitioner only when it has an id.

        A name without an identifier cannot be matched, so it stays inside the resource that names it
        (contained) instead of becoming a new Practitioner on every resend.
        """
        resource = practitioner(xcn, self.config, self.fallback)
        if resource is None:
            return None, None
        if "identifier" in resource:
            url = self.add(f"Practitioner/{resource['identifier'][0]['value']}", resource, resource["identifier"][0])
            return {"reference": url}, None
        return {"reference": f"#{local_id}"}, {"id": local_id, **resource}


def person(b: Builder, xcn: Repetition) -> Json | None:
    """An XCN where no resource can contain it (an Annotation, a Provenance agent): a reference to the
    shared Practitioner when it has an id, else its name as the reference's display."""
    ref, unidentified = b.practitioner(xcn, "person")
    if unidentified:
        name = unidentified["name"][0]
        return {"display": " ".join([*name.get("prefix", []), *name.get("given", []), name.get("family", "")]).strip()}
    return ref


def annotation(b: Builder, nte: Segment) -> Json | None:
    """NTE → Annotation (IG ``NTE[ServiceRequest]``, ``NTE[Observation]``): NTE-3 lines (whole) joined by
    newlines, NTE-5 entered by (a shared Practitioner, else its name), NTE-6 entered date/time."""
    text = "\n".join(free_text(r, b.msg.encoding) for r in nte.field(3).present())
    if not text:
        return None
    note: Json = {}
    author = person(b, nte.field(5).first)
    if author and "reference" in author:
        note["authorReference"] = author
    elif author:  # an Annotation cannot name a contained author: its name is the author
        note["authorString"] = author["display"]
    when = date_time(nte.field(6).component(1), b.config, "NTE-6")
    if when:
        note["time"] = when
    note["text"] = text
    return note


def author(b: Builder) -> Json:
    """The message's author, as the reference its Provenance names.

    MSH-4 sending facility (HD) → Organization (IG ``HD[Organization]``). A sender that leaves MSH-4
    empty is its sending application, MSH-3: a logical reference to it (type Device, the HD as its
    identifier, as IG ``HD[Device]`` would make it), unless its sender entry says MSH-4 identifies it
    (``identified_by: msh3+msh4``).
    """
    msh = b.msg.msh
    msh4 = msh.field(4)
    if msh4.component(1) or msh4.component(2):
        ident = hd_identifier(msh4, "urn:overread:sending-facility")
        org: Json = {"resourceType": "Organization", "identifier": [ident], "name": msh4.component(1) or ident["value"]}
        return {"reference": b.add("Organization/sending-facility", org, ident)}
    msh3 = msh.field(3)
    if b.config.identified_by == "msh3+msh4" or not (msh3.component(1) or msh3.component(2)):
        raise MappingError(REQUIRED_FIELD_MISSING, "MSH-4", "Sending facility is missing")
    ident = hd_identifier(msh3, "urn:overread:sending-application")
    return {"type": "Device", "identifier": ident, "display": msh3.component(1) or ident["value"]}


def hd_identifier(hd: Field, local_system: str) -> Json:
    """An HD as an Identifier: its ISO OID as ``urn:oid:``, else its namespace id in ``local_system``,
    else its universal id of another type (``^1234^CLIA``) in ``<local_system>:<type>``."""
    if hd.component(2) and hd.component(3).upper() == "ISO":
        return {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:{hd.component(2)}"}
    if hd.component(1) or not hd.component(2):
        return {"system": local_system, "value": hd.component(1)}
    return {"system": f"{local_system}:{quote(hd.component(3).upper() or 'HD', safe='')}", "value": hd.component(2)}


def provenance(b: Builder, author: Json, agents: Sequence[Json] = ()) -> None:
    """A Provenance (IG ``MSH[Provenance-Source]``) tying every resource to the message (MSH-10);
    ``agents`` are the message's other agents (ORC-10 enterer, ORC-11 verifier: IG ``ORC[Provenance]``)."""
    recorded = instant(b.msg.msh.field(7).component(1), b.config, "MSH-7")
    if recorded is None:
        raise MappingError(REQUIRED_FIELD_MISSING, "MSH-7", "Date/time of message is missing")
    msh9 = b.msg.msh.field(9)
    resource: Json = {
        "resourceType": "Provenance",
        "target": [{"reference": e["fullUrl"]} for e in b.entries],
        "recorded": recorded,
        "activity": {
            "coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-DataOperation", "code": "CREATE"}]
        },
        "agent": [
            {"type": {"coding": [{"system": PROVENANCE_PARTICIPANT, "code": "author"}]}, "who": author},
            *agents,
        ],
        "entity": [
            {
                "role": "source",
                "what": {
                    "identifier": {"system": message_system(b.app, b.facility), "value": b.control_id},
                    "display": msh9.first.component(1) + "^" + msh9.component(2),
                },
            }
        ],
    }
    b.add("Provenance", resource)
