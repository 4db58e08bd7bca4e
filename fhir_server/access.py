"""Who is asking and what they may do: the ``Access`` a request carries, and its enforcement.

The HTTP door authenticates a bearer token (``fhir_server.smart_http.BearerAuth``) and hands the
core an ``Access``; the core consults it at one point per request, ``authorize`` (from
``router.handle``; for reads answered on the event loop, ``router.read_response``; for a
transaction's entries, ``bundle.process``), and filters what goes out (``may_read``: the resource
of a read, each ``_include``d resource). A request without an Access (auth off; HL7 intake and
workers, which are not clients) is unrestricted. Refusals are 403 (``forbidden``); a resource
outside a query-filtered scope is answered as if missing (404), so the answer does not tell that
it exists.

Which permission each interaction needs (SMART App Launch 2.x, "Scopes"): read and vread ``r``;
search ``s``; create ``c``; update and patch ``u``; delete ``d``; history of an instance ``r``,
of a type or the system ``s``; conditional update, patch and delete ``s`` as well (their
criteria search), a conditional create (If-None-Exist) ``s`` and ``r`` (it answers what it
found); ``$validate`` ``r``, ``$link-imaging`` ``u``. A chain or ``_has`` needs ``s`` on every
type it searches. Writing a Subscription needs ``s`` and ``r`` on what its criteria search, with
their parameters: a notification delivers what the writer could have asked for, nothing more.
A query-filtered scope grants a search that carries its query, a read of (and an ``_include``
of) a resource that matches it, and a create of one; every other interaction needs an
unfiltered scope.

A client with a role is held to its compartment too (``fhir_server.compartment``; ``confine``,
``authorize_query``): a resource outside it is answered as a missing one (404), searches,
includes, chains, ``_has`` and histories find nothing outside it, and a write it may not make is
403. A compartment that is a view (only some elements) allows reads and searches on them only.
"""

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl

from sqlalchemy import Connection

from fhir_server import compartment, limits, scopes
from fhir_server.errors import FhirError, error
from fhir_server.indexing import index_rows
from fhir_server.repository import Stored, readable
from fhir_server.schema import TokenIndex
from fhir_server.scopes import Scope, ScopeError
from fhir_server.search import Criterion, SearchQuery
from fhir_server.search_params import COLUMN_PARAMS, registry
from fhir_server.validation import SUPPORTED_TYPES

if TYPE_CHECKING:  # http.py holds an Access
    from fhir_server.http import FhirRequest

#: The permission each operation needs; an operation not named here needs ``u``.
OPERATIONS = {"$validate": "r", "$link-imaging": "u"}
Role = Literal["ordering", "reader", "insurer", "operator"]


@dataclass(frozen=True)
class Access:
    """An authenticated client and what its token grants; a role holds it to a compartment (``compartment.of``)."""

    client_id: str
    scopes: tuple[Scope, ...]
    role: Role | None = None
    #: ``system|value`` of the client's Organization identifier.
    organization: str | None = None


def forbidden(what: str) -> FhirError:
    return error(403, "forbidden", f"The access token's scopes do not allow {what}")


def authorize(req: "FhirRequest") -> None:
    """Raise 403 unless ``req.access`` allows the interaction ``req`` is."""
    if req.access is None:
        return
    parts = req.parts
    needs = _needs(req.method.upper(), parts, req.params)
    if req.method.upper() == "POST" and len(parts) == 1 and req.header("if-none-exist"):
        needs += [("s", parts[0], "whole"), ("r", parts[0], "whole")]  # it searches, and answers what it found
    for interaction, rtype, kind in needs:
        if not _may(req.access.scopes, interaction, rtype, kind, req.params, req.body):
            raise forbidden(f"{interaction!r} on {rtype}")
    if parts[:1] == ["Subscription"] and req.method.upper() in ("POST", "PUT") and isinstance(req.body, dict):
        _authorize_criteria(req.access, req.body.get("criteria"))
    held = compartment.of(req.access)
    if held is not None and held.elements is not None and not _viewing(req.method.upper(), parts):
        raise refused("this interaction")


def _authorize_criteria(access: Access, criteria: Any) -> None:
    """A Subscription pushes what its criteria match to its endpoint: its writer must be allowed to
    search and read that, or it would receive by notification what it may not ask for."""
    if not isinstance(criteria, str):
        return  # the Subscription's own validation refuses it
    rtype, _, query = criteria.strip().partition("?")
    params = parse_qsl(query, keep_blank_values=True)
    if not _may(access.scopes, "s", rtype, "search", params, None) or not _may(
        access.scopes, "r", rtype, "resource", params, None
    ):
        raise forbidden(f"a Subscription to {rtype} (its criteria: 's' and 'r' on {rtype})")


def refused(what: str) -> FhirError:
    return error(403, "forbidden", f"The client's role does not allow {what}")


def _viewing(method: str, parts: Sequence[str]) -> bool:
    """A read, a search, or a batch of them (each entry is checked): what a view allows."""
    reading = method in ("GET", "HEAD") and len(parts) <= 2 and not any(p[:1] in "_$" for p in parts)
    return reading or (method == "POST" and (parts in ([], ["_search"]) or parts[1:] == ["_search"]))


def confine(req: "FhirRequest", conn: Connection | None) -> None:
    """Hold ``req`` to its client's compartment, asked on ``conn`` (None: nothing is in it): a resource
    outside it is answered as a missing one (404, the same answer; a deleted one too), a write
    outside it or not allowed by the role is 403. Conditional interactions search outside the
    compartment, and a type-level ``$validate`` looks records up, so a client with one may not make them."""
    held = compartment.of(req.access)
    if held is None:
        return
    method = req.method.upper()
    parts = req.parts
    if not parts or parts[0] not in SUPPORTED_TYPES or parts[1:2] in (["_search"], ["_history"]):
        return
    rtype = parts[0]
    if len(parts) == 1 and (method in ("PUT", "PATCH", "DELETE") or req.header("if-none-exist")):
        raise refused("conditional interactions")
    if parts[1:] == ["$validate"]:  # its profile checks look up records outside the compartment
        raise refused("a $validate of a type")
    here = held.at(conn) if conn is not None else None
    if len(parts) >= 2 and not parts[1].startswith("$") and not (here and conn and here.shows(conn, rtype, parts[1])):
        vread = len(parts) == 4 and parts[2] == "_history"
        if method in ("GET", "HEAD") and (len(parts) == 2 or vread):  # what a missing one is answered
            readable(rtype, parts[1], limits.version_id(parts[3]) if vread else None, None)
        raise error(404, "not-found", f"{rtype}/{parts[1]} is not known")
    if method not in ("POST", "PUT", "PATCH", "DELETE") or len(parts) > 2 or parts[-1].startswith("$"):
        return
    if method == "PATCH" or here is None or conn is None:
        raise refused("a patch (its result is not known before it is applied)" if conn else "this write")
    body = req.body if method in ("POST", "PUT") and isinstance(req.body, dict) else None
    if not held.may_write(rtype, body, _contains(conn, here)):
        raise refused(f"this write of a {rtype}")
    if body is not None and held.stamp is not None:
        held.stamp(rtype, body)


def _contains(conn: Connection, here: compartment.Evaluated) -> compartment.Contains:
    """Whether a reference (``Type/id``) names a resource of a set, asked on ``conn``."""

    def contains(found: compartment.Set, reference: str) -> bool:
        rtype, _, rid = reference.partition("/")
        return here.contains(conn, found, rtype, rid)

    return contains


def view(access: Access | None, rtype: str, asked: list[str] | None) -> list[str] | None:
    """The ``_elements`` of a read or search of ``rtype``: ``asked`` within the client's view, if it has one."""
    held = compartment.of(access)
    shown = None if held is None else held.view(rtype)
    if shown is None:
        return asked
    return sorted(e for e in shown if asked is None or e in asked or e.split(".")[0] in asked)


def authorize_query(access: Access | None, query: SearchQuery, conn: Connection) -> None:
    """Raise 403 unless ``access`` may search every type a chain or ``_has`` of ``query`` reaches;
    hold ``query`` to its compartment, evaluated on ``conn``."""
    if access is None:
        return
    for rtype in _reached(query.criteria):
        if not scopes.allows(access.scopes, "s", rtype):
            raise forbidden(f"a chain or _has into {rtype}")
    held = compartment.of(access)
    if held is None:
        return
    query.within = held.at(conn).within
    if held.elements is None:
        return
    types = (query.resource_type,) if query.resource_type else (query.types or tuple(SUPPORTED_TYPES))
    shown = {e.split(".")[0] for t in types for e in held.view(t) or ()}
    if query.includes or any(c.chain or c.has is not None for c in query.criteria):
        raise refused("_include, _revinclude, chains or _has")
    for code in [c.param.code for c in query.criteria] + [code for code, _ in query.sort]:
        if code in COLUMN_PARAMS:
            continue
        roots = [registry()[t][code].roots for t in types if code in registry()[t]]
        if not roots or not all(r is not None and r <= shown for r in roots):
            raise refused(f"searching or sorting on {code!r}")
    query.elements = view(access, types[0], query.elements) if len(types) == 1 else sorted(shown)


def _reached(criteria: Iterable[Criterion]) -> Iterator[str]:
    """The types the chains and ``_has`` of ``criteria`` search, at any depth."""
    for crit in criteria:
        for rtype, inner in crit.chain:
            yield rtype
            yield from _reached([inner])
        if crit.has is not None:
            yield crit.has[0]
            yield from _reached([crit.has[2]])


def may_read(access: Access | None, stored: Stored) -> bool:
    """Whether ``access`` may see ``stored`` (read, or ``_include``)."""
    if access is None or stored.content is None:
        return True
    queries = scopes.filters(access.scopes, "r", stored.type)
    return queries is None or _matches(queries, stored.type, stored.resource)  # parsed only when a query filters


# Kinds of check: "search" carries the request's params; "resource" is checked against the resource
# itself (read, vread, create); "whole" needs an unfiltered scope.
_Need = tuple[str, str, str]


def _needs(method: str, parts: Sequence[str], params: list[tuple[str, str]]) -> list[_Need]:
    """What the interaction needs: (permission, type, kind) each; none for the open ones."""
    types = [v for k, v in params if k == "_type"]
    every = [t.strip() for v in types for t in v.split(",") if t.strip()] or list(SUPPORTED_TYPES)
    match list(parts), method:
        case [] | ["_search"], "GET" | "HEAD" | "POST" if parts or method != "POST":
            return [("s", t, "search") for t in every]
        case ["metadata"], _:
            return []
        case ["_history"], _:
            return [("s", t, "whole") for t in SUPPORTED_TYPES]
        case [rtype], "GET" | "HEAD":
            return [("s", rtype, "search")]
        case [rtype], "POST":
            return [("c", rtype, "resource")]
        case [rtype], "PUT" | "PATCH":
            return [("u", rtype, "whole"), ("s", rtype, "whole")]
        case [rtype], "DELETE":
            return [("d", rtype, "whole"), ("s", rtype, "whole")]
        case [rtype, "_search"], _:
            return [("s", rtype, "search")]
        case [rtype, "_history"], _:
            return [("s", rtype, "whole")]
        case [rtype, name] | [rtype, _, name], _ if name.startswith("$"):
            return [(OPERATIONS.get(name, "u"), rtype, "whole")]
        case [rtype, _], "GET" | "HEAD":
            return [("r", rtype, "resource")]
        case [rtype, _], "PUT" | "PATCH":
            return [("u", rtype, "whole")]
        case [rtype, _], "DELETE":
            return [("d", rtype, "whole")]
        case [rtype, _, "_history"], _:
            return [("r", rtype, "whole")]
        case [rtype, _, "_history", _], _:
            return [("r", rtype, "resource")]
    return []  # the base's transaction or batch (each entry is checked), metadata, or no interaction: 4xx anyway


def _may(
    granted: Sequence[Scope], interaction: str, rtype: str, kind: str, params: list[tuple[str, str]], body: Any
) -> bool:
    if kind == "search":
        return scopes.allows(granted, interaction, rtype, params)
    if kind == "whole":
        return scopes.allows(granted, interaction, rtype)
    queries = scopes.filters(granted, interaction, rtype)
    if interaction == "c" and isinstance(body, dict):
        return _matches(queries, rtype, body)
    return queries is None or bool(queries)  # a read: the resource is checked once found (``may_read``)


def _matches(queries: list[tuple[tuple[str, str], ...]] | None, rtype: str, resource: dict[str, Any]) -> bool:
    """Whether ``resource`` matches one of ``queries`` (None: no query narrows it)."""
    if queries is None:
        return True
    if not queries:
        return False
    tokens = {
        (row["param"], row["system"], row["code"]) for table, row in index_rows(rtype, resource) if table is TokenIndex
    }
    return any(all(_token_match(tokens, name, value) for name, value in query) for query in queries)


def _token_match(tokens: set[tuple[str, str | None, str | None]], param: str, value: str) -> bool:
    """A token search's ``[system|]code`` against the resource's tokens (R4 search.html#token)."""
    system, bar, code = value.rpartition("|")
    return any(p == param and c == code and (not bar or s == (system or None)) for p, s, c in tokens)


def check_filters(granted: Iterable[Scope]) -> None:
    """Refuse a query-filtered scope this server cannot apply: its type must be named, its parameters
    token search parameters of that type, each given once with one value."""
    for scope in granted:
        if not scope.query:
            continue
        if scope.type not in SUPPORTED_TYPES:
            raise ScopeError(f"{scope}: a query-filtered scope names one resource type this server has")
        params = registry()[scope.type]
        names = [name for name, _ in scope.query]
        for name, value in scope.query:
            if name not in params or params[name].type != "token" or "," in value or names.count(name) > 1:
                raise ScopeError(f"{scope}: {name} is not one token search parameter of {scope.type} with one value")
