"""SMART scopes (SMART App Launch 2.x, "Scopes and Launch Context"): the grammar and what they allow.

A clinical scope is ``context/Type.permissions[?query]``. This server grants the ``system``
context (Backend Services) only. Permissions are SMART v2's ``cruds`` letters in that order
(create, read, update, delete, search) or SMART v1's ``read`` (= ``rs``), ``write`` (= ``cud``)
and ``*`` (= ``cruds``). ``Type`` is a FHIR resource type or ``*`` for every one; a lower-case
name is one of this server's own areas (``hl7``: the HL7 message store), which ``*`` never
covers. A query (``system/Observation.rs?category=laboratory``) narrows the scope to the
resources matching it (§"Finer-grained resource constraints using search parameters").

Pure: no database, no I/O. ``fhir_server.access`` applies these to requests.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import parse_qsl

PERMISSIONS = "cruds"
V1 = {"read": "rs", "write": "cud", "*": "cruds"}
#: The areas of this server that are no FHIR type, each named by scope explicitly.
AREAS = frozenset({"hl7"})
Interaction = str  # one letter of PERMISSIONS
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*")


class ScopeError(ValueError):
    """A scope that is not ``system/Type.permissions[?query]``."""


@dataclass(frozen=True)
class Scope:
    type: str  # a resource type, an area, or "*"
    permissions: frozenset[str]
    query: tuple[tuple[str, str], ...] = ()
    #: The scope as written, when it was parsed from text.
    text: str = ""

    def covers(self, rtype: str) -> bool:
        """Whether this scope is about ``rtype``: ``*`` is every resource type, never an area."""
        return self.type == rtype or (self.type == "*" and rtype not in AREAS)

    def includes(self, other: "Scope") -> bool:
        """Whether everything ``other`` grants, this grants too."""
        return self.covers(other.type) and other.permissions <= self.permissions and set(self.query) <= set(other.query)

    def __str__(self) -> str:
        if self.text:
            return self.text
        letters = "".join(p for p in PERMISSIONS if p in self.permissions)
        query = "&".join(f"{k}={v}" for k, v in self.query)
        return f"system/{self.type}.{letters}" + (f"?{query}" if query else "")


def parse(text: str) -> Scope | None:
    """One scope; None for a scope of another kind (``openid``, ``launch``, ``patient/...``)."""
    if not text.startswith("system/"):
        return None
    body, _, query = text.removeprefix("system/").partition("?")
    rtype, dot, letters = body.partition(".")
    if not dot or not (rtype == "*" or _NAME.fullmatch(rtype)):
        raise ScopeError(f"{text!r} is not system/Type.permissions")
    return Scope(rtype, _permissions(text, letters), _query(text, query), text)


def parse_all(text: str) -> list[Scope]:
    """A space-separated scope list (RFC 6749 §3.3): its clinical ``system`` scopes."""
    return [s for s in (parse(t) for t in text.split()) if s is not None]


def _permissions(text: str, letters: str) -> frozenset[str]:
    if letters in V1:
        return frozenset(V1[letters])
    # v2: a non-empty subsequence of "cruds", each letter once and in that order
    if not letters or letters != "".join(p for p in PERMISSIONS if p in letters):
        raise ScopeError(f"{text!r}: permissions are read, write, * or letters of {PERMISSIONS} in that order")
    return frozenset(letters)


def _query(text: str, query: str) -> tuple[tuple[str, str], ...]:
    if not query:
        return ()
    try:
        pairs = parse_qsl(query, keep_blank_values=False, strict_parsing=True)
    except ValueError:
        raise ScopeError(f"{text!r}: the query is not name=value pairs") from None
    return tuple(sorted(pairs))


def granted(requested: Iterable[Scope], allowed: Iterable[Scope]) -> list[Scope]:
    """What a client asking ``requested`` gets with at most ``allowed``: each requested scope as
    asked when one allowed scope includes it whole, else narrowed to what each allowed one shares."""
    allowed = list(allowed)
    out: list[Scope] = []
    for want in requested:
        if any(a.includes(want) for a in allowed):
            out.append(want)
            continue
        for a in allowed:
            if not (a.covers(want.type) or (want.type == "*" and a.type not in AREAS)):
                continue
            permissions = want.permissions & a.permissions
            if permissions:
                rtype = a.type if want.type == "*" else want.type
                out.append(Scope(rtype, permissions, tuple(sorted(set(want.query) | set(a.query)))))
    return list(dict.fromkeys(out))


def allows(
    scopes: Iterable[Scope], interaction: Interaction, rtype: str, params: Iterable[tuple[str, str]] = ()
) -> bool:
    """Whether ``scopes`` allow ``interaction`` on ``rtype`` for a request carrying ``params``:
    some scope grants it without a query, or with a query every pair of which the request carries."""
    given = set(params)
    return any(s.covers(rtype) and interaction in s.permissions and set(s.query) <= given for s in scopes)


def filters(scopes: Iterable[Scope], interaction: Interaction, rtype: str) -> list[tuple[tuple[str, str], ...]] | None:
    """The queries a resource of ``rtype`` must match one of for ``interaction``: None when a scope
    grants it unfiltered, an empty list when none grants it at all."""
    found = [s.query for s in scopes if s.covers(rtype) and interaction in s.permissions]
    return None if () in found else found
