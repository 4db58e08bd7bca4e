"""AuditEvents in the shape of IHE Basic Audit Log Patterns (BALP 1.1, on FHIR R4 AuditEvent).

Every event says what happened (``type``, ``subtype``, ``action``), when (``recorded``), how it
ended (``outcome`` 0 success, 4 minor failure: the request was refused or wrong, 8 serious
failure: ours; ``outcomeDesc``), who asked (the client agent, DICOM "Source Role ID": its
client_id, role and network address, ``requestor``), who answered (the server agent,
"Destination Role ID"), who observed (``source``: this server) and about what (``entity``: the
resources, the query of a search base64-encoded, the patient where there is one).

A REST interaction (BALP "RESTful activities") is type ``rest`` with its restful-interaction
code as subtype; action C create, R read/vread/history, U update/patch, D delete, E search,
operation, batch and transaction. Pure: no database, no I/O; ``fhir_server.audit_log`` writes them.
"""

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

import orjson

from fhir_server import dates
from fhir_server.access import Access
from fhir_server.http import FhirRequest, FhirResponse
from fhir_server.stored import Stored

AUDIT_EVENT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-event-type"
RESTFUL_INTERACTION = "http://hl7.org/fhir/restful-interaction"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
SOURCE_TYPE = "http://terminology.hl7.org/CodeSystem/security-source-type"
#: Who a registered client is (its client_id), and its role (docs/security.md).
CLIENT_ID = "https://overread.org/fhir/sid/client-id"
CLIENT_ROLE = "https://overread.org/fhir/CodeSystem/client-role"
OBSERVER = "Overread"
#: action of each restful-interaction (BALP: a query is E, "execute").
ACTIONS = {
    "read": "R", "vread": "R", "history-instance": "R", "history-type": "R", "history-system": "R",
    "capabilities": "R", "create": "C", "update": "U", "patch": "U", "delete": "D", "search-type": "E",
    "search-system": "E", "operation": "E", "batch": "E", "transaction": "E",
}  # fmt: skip
SEARCHES = frozenset({"search-type", "search-system", "history-type", "history-system"})


@dataclass(frozen=True)
class Agent:
    """Who asked: ``name`` (a client_id, an HL7 sender, a calling AE title; None when unknown), in
    which ``role``, from which network ``address``; ``system`` names what kind of name it is."""

    name: str | None
    address: str | None = None
    role: str | None = None
    system: str = CLIENT_ID

    @classmethod
    def of(cls, access: Access | None, address: str | None) -> "Agent":
        return cls(access.client_id if access else None, address, access.role if access else None)

    def json(self) -> dict[str, Any]:
        agent: dict[str, Any] = {"type": _concept(DCM, "110153", "Source Role ID")}
        if self.role:
            agent["role"] = [_concept(CLIENT_ROLE, self.role)]
        if self.name:
            agent["who"] = {"identifier": {"system": self.system, "value": self.name}, "display": self.name}
            agent["altId"] = agent["name"] = self.name  # searchable: altid, agent-name
        agent["requestor"] = True
        if self.address:
            agent["network"] = {"address": self.address, "type": "2"}  # 2: an IP address
        return agent


def outcome(status: int) -> str:
    """An HTTP status as AuditEvent.outcome: 0 success, 4 the request's fault, 8 ours."""
    return "0" if status < 400 else "4" if status < 500 else "8"


def event(
    kind: dict[str, str],
    subtype: list[dict[str, str]],
    action: str,
    recorded: datetime,
    status: str,
    description: str | None,
    agent: Agent,
    entities: list[dict[str, Any]],
) -> dict[str, Any]:
    """An AuditEvent of this server: ``kind`` its type coding, ``status`` its outcome code."""
    resource: dict[str, Any] = {"resourceType": "AuditEvent", "type": kind}
    if subtype:
        resource["subtype"] = subtype
    resource |= {"action": action, "recorded": dates.instant(recorded), "outcome": status}
    if description:
        resource["outcomeDesc"] = description[:1024]
    server = {"type": _concept(DCM, "110152", "Destination Role ID"), "who": {"display": OBSERVER}, "requestor": False}
    resource["agent"] = [agent.json(), server]
    resource["source"] = {"observer": {"display": OBSERVER}, "type": [coding(SOURCE_TYPE, "4", "Application Server")]}
    if entities:
        resource["entity"] = entities
    # A NUL is rare: looking for one in the JSON costs less than walking every event.
    written: dict[str, Any] = _without_nul(resource) if b"\\u0000" in orjson.dumps(resource) else resource
    return written


def _without_nul(value: Any) -> Any:
    """``value`` with each NUL written ``\\u0000``: what was asked stays readable, and PostgreSQL, which
    refuses a NUL in text, still stores the event (a request naming ``Patient/%00`` is audited too)."""
    if isinstance(value, str):
        return value.replace("\0", "\\u0000")
    if isinstance(value, dict):
        return {k: _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def token(
    status: int, client_id: str | None, error: str | None, recorded: datetime, address: str | None
) -> dict[str, Any]:
    """The AuditEvent of a token request (SMART Backend Services): DICOM "User Authentication", "Login"."""
    kind, subtype = coding(DCM, "110114", "User Authentication"), [coding(DCM, "110122", "Login")]
    return event(kind, subtype, "E", recorded, outcome(status), error, Agent(client_id, address), [])


def http(method: str, path: str, status: int, recorded: datetime, agent: Agent) -> dict[str, Any]:
    """The AuditEvent of a request to another route of this server (``/hl7/...``): named by its path."""
    kind = coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation")
    action = "R" if method.upper() in ("GET", "HEAD") else "E"
    entity = {"type": coding(ENTITY_TYPE, "2", "System Object"), "name": f"{method.upper()} {path}"}
    return event(kind, [], action, recorded, outcome(status), None, agent, [entity])


def rest(req: FhirRequest, response: FhirResponse, recorded: datetime, agent: Agent) -> dict[str, Any]:
    """The AuditEvent of one FHIR REST interaction and its answer (BALP "RESTful activities")."""
    parts = req.parts
    interaction = _interaction(req.method.upper(), parts, req.body)
    subtype = [coding(RESTFUL_INTERACTION, interaction)] if interaction else []
    entities = list(_rest_entities(req, response, parts, interaction))
    kind = coding(AUDIT_EVENT_TYPE, "rest", "Restful Operation")
    action = ACTIONS.get(interaction or "", "E")
    return event(kind, subtype, action, recorded, outcome(response.status), _diagnostics(response), agent, entities)


def _interaction(method: str, parts: list[str], body: Any) -> str | None:
    """The restful-interaction code of a request (R4 http.html), None for none."""
    match parts, method:
        case [], "POST":
            kind = body.get("type") if isinstance(body, dict) else None
            return kind if kind in ("batch", "transaction") else None
        case [] | ["_search"], _:
            return "search-system"
        case ["metadata"], _:
            return "capabilities"
        case ["_history"], _:
            return "history-system"
        case [*_, name], _ if name.startswith("$"):
            return "operation"
        case [_], "GET" | "HEAD":
            return "search-type"
        case [_], "POST":
            return "create"
        case [_], "PUT":
            return "update"
        case [_], "PATCH":
            return "patch"
        case [_], "DELETE":
            return "delete"
        case [_, "_search"], _:
            return "search-type"
        case [_, "_history"], _:
            return "history-type"
        case [_, _], "GET" | "HEAD":
            return "read"
        case [_, _], "PUT":
            return "update"
        case [_, _], "PATCH":
            return "patch"
        case [_, _], "DELETE":
            return "delete"
        case [_, _, "_history"], _:
            return "history-instance"
        case [_, _, "_history", _], _:
            return "vread"
    return None


def _rest_entities(
    req: FhirRequest, response: FhirResponse, parts: list[str], interaction: str | None
) -> Iterator[dict[str, Any]]:
    """What the interaction was about: its query, the resources it touched, their patient."""
    if interaction in SEARCHES:
        query = "/".join(parts) + ("?" + urlencode(req.params) if req.params else "")
        yield {
            "type": coding(ENTITY_TYPE, "2", "System Object"),
            "role": coding(OBJECT_ROLE, "24", "Query"),
            "query": base64.b64encode(query.encode()).decode(),
        }
        yield from _patients(_searched_patient(req.params))
        return
    if interaction in ("batch", "transaction"):
        entries = response.body.get("entry", []) if isinstance(response.body, dict) else []
        for entry in entries:
            location = entry.get("response", {}).get("location", "")
            if "/_history/" in location:  # [base]/Type/id/_history/version
                rtype, rid, _, version = location.split("/")[-4:]
                yield _resource([rtype, rid], int(version))
        return
    about = response.about
    if about is not None:
        yield _resource([about.type, about.id], about.version)
        yield from _patients(_patient_of(about))
    elif len(parts) >= 2 and not parts[1].startswith(("_", "$")):
        yield _resource(parts[:2])
        yield from _patients(f"Patient/{parts[1]}" if parts[0] == "Patient" else None)


def _resource(type_and_id: list[str], version: int | None = None) -> dict[str, Any]:
    reference = "/".join(type_and_id) + (f"/_history/{version}" if version else "")
    return {
        "what": {"reference": reference},
        "type": coding(ENTITY_TYPE, "2", "System Object"),
        "role": coding(OBJECT_ROLE, "4", "Domain Resource"),
    }


def _patients(reference: str | None) -> Iterator[dict[str, Any]]:
    if reference:
        yield {
            "what": {"reference": reference},
            "type": coding(ENTITY_TYPE, "1", "Person"),
            "role": coding(OBJECT_ROLE, "1", "Patient"),
        }


def _patient_of(stored: Stored) -> str | None:
    """The Patient a stored resource is, or is about (its subject or patient)."""
    if stored.type == "Patient":
        return f"Patient/{stored.id}"
    resource = stored.resource  # {} for a deletion
    for name in ("subject", "patient"):
        ref = resource.get(name)
        if isinstance(ref, dict) and str(ref.get("reference", "")).startswith("Patient/"):
            return str(ref["reference"])
    return None


def _searched_patient(params: list[tuple[str, str]]) -> str | None:
    """The Patient a search is for, when it names one (``patient=``, ``subject=Patient/…``)."""
    for name, value in params:
        base, _, modifier = name.partition(":")
        if base not in ("patient", "subject") or modifier not in ("", "Patient") or "," in value or not value:
            continue
        if base == "patient" or modifier or value.rsplit("/", 2)[-2:-1] == ["Patient"]:
            return f"Patient/{value.rsplit('/', 1)[-1]}"
    return None


def _diagnostics(response: FhirResponse) -> str | None:
    """The refusal or failure in words: its OperationOutcome's diagnostics."""
    if response.status < 400 or not isinstance(response.body, dict):
        return None
    texts = [str(i.get("diagnostics", "")) for i in response.body.get("issue", []) if i.get("diagnostics")]
    return "; ".join(texts) or None


def coding(system: str, code: str, display: str | None = None) -> dict[str, str]:
    return {"system": system, "code": code, **({"display": display} if display else {})}


def _concept(system: str, code: str, display: str | None = None) -> dict[str, Any]:
    return {"coding": [coding(system, code, display)]}
