"""A client's compartment: the resources a client with a role may see and write.

The store knows no roles: the application registers a ``Rule`` (``use``) that gives each
``Access`` its ``Compartment``, or None for a client its scopes alone limit. A compartment's
``visible`` set is built of the set operations here: a token search (``matching``), the resources
that refer to a set (``referring``), the resources a set refers to (``referenced``), ``union_of``,
and ``Fixed``: a set (a client's orders) that each request evaluates once (``Compartment.at``)
and binds as an array, so the planner knows its size. The rest compiles to SQL two ways:

- ``holds``: whether ONE resource is in the set, walking from it along its references, each
  step an indexed lookup (a read, a write's check): its cost does not grow with the set;
- ``keys``: the whole set, of one type if known, joined outwards from the Fixed arrays (what a
  search, its includes, chains and ``_has``, and a history are held to).

``fhir_server.access`` enforces it (docs/security.md, "Roles").
"""

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    CompoundSelect,
    Connection,
    Integer,
    Select,
    Table,
    and_,
    any_,
    bindparam,
    exists,
    false,
    func,
    or_,
    select,
    union,
)

from fhir_server import search
from fhir_server.schema import ReferenceIndex, ResourceRow, TokenIndex
from fhir_server.search_params import registry
from fhir_server.validation import ID

if TYPE_CHECKING:  # access.py consults this module
    from fhir_server.access import Access

#: A SELECT of resource keys (``resource.pk``), uncorrelated.
Keys = Select[int] | CompoundSelect[int]
Resource = dict[str, Any]


@dataclass(frozen=True)
class Matching:
    """The resources of ``rtype`` (among ``within``) with every token ``(param, [system|]code)``."""

    rtype: str
    tokens: tuple[tuple[str, str], ...]
    within: "Set | None" = None


@dataclass(frozen=True)
class Referring:
    """The resources of ``rtype`` whose reference parameter ``param`` points into ``targets``."""

    rtype: str
    param: str
    targets: "Set"


@dataclass(frozen=True)
class Referenced:
    """The resources (of ``rtype``) that ``sources`` refer to (by ``param``; None: any)."""

    sources: "Set"
    param: str | None = None
    rtype: str | None = None


@dataclass(frozen=True)
class Union:
    sets: tuple["Set", ...]


@dataclass(frozen=True)
class Fixed:
    """``found``, evaluated once per request (``Compartment.at``) and bound as an array of keys, so
    the planner knows its size: the driving set (a client's orders), a walk's last step."""

    found: "Set"


Set = Matching | Referring | Referenced | Union | Fixed
#: Whether a key column is one of a Fixed set's keys, as evaluated for this request.
Among = Callable[[Fixed, Any], ColumnElement[bool]]
#: A Fixed set's keys, as evaluated for this request.
Rows = Callable[[Fixed], "Keys"]


@dataclass(frozen=True)
class Compartment:
    """What a client with a role may see and write."""

    visible: Set
    #: Whether it may write a resource of a type: a create's or update's body, None for a delete; it
    #: asks ``Contains`` whether a reference names a resource of a set.
    may_write: Callable[[str, Resource | None, "Contains"], bool]
    #: Per resource type, the only elements it may see and search on (a type not named: none).
    #: Such a view is read-only: no writes, history, operations, includes, chains or ``_has``.
    elements: Mapping[str, frozenset[str]] | None = None
    #: Marks a body it writes (a create's or update's, once allowed) before it is stored: what the
    #: rule recognises as its own later (the client that wrote an order).
    stamp: Callable[[str, Resource], None] | None = None

    def at(self, conn: Connection) -> "Evaluated":
        """The compartment for one request on ``conn``: its Fixed sets evaluated."""
        dialect = conn.dialect.name
        ids = {_name(f): list(conn.scalars(_evaluation(f))) for f in set(_fixed(self.visible))}
        values = {k: v if dialect == "postgresql" else json.dumps(v) for k, v in ids.items()}
        return Evaluated(self.visible, dialect, values)

    def view(self, rtype: str) -> frozenset[str] | None:
        """The elements of ``rtype`` it may see; None: whole resources."""
        return None if self.elements is None else self.elements.get(rtype, frozenset())


@dataclass(frozen=True)
class Evaluated:
    """A compartment for one request: what it answers is SQL over that request's Fixed keys."""

    visible: Set
    dialect: str
    #: Each Fixed set's keys, by the name of its bound parameter.
    values: Mapping[str, Any]

    def shows(self, conn: Connection, rtype: str, rid: str) -> bool:
        """Whether ``rtype/rid`` is stored and visible."""
        return self.contains(conn, self.visible, rtype, rid)

    def contains(self, conn: Connection, found: Set, rtype: str, rid: str) -> bool:
        """Whether the set ``found`` (of the compartment) holds ``rtype/rid``."""
        if not ID.fullmatch(rid):  # never stored; PostgreSQL would refuse a NUL in it (a 500)
            return False
        return bool(conn.scalar(_lookup(found, rtype, self.dialect), {"rid": rid, **self.values}))

    def within(self, pk: Any, rtype: str | None = None) -> ColumnElement[bool]:
        """Whether the resource keyed ``pk`` (a column of the enclosing statement; of ``rtype`` if
        known) is visible: ``SearchQuery.within``. A search considers many rows: they are checked
        against the visible set (of ``rtype``), which starts from the Fixed arrays."""
        rows = _bound(self.dialect, self.values)[1]
        return cast(ColumnElement[bool], pk.in_(keys(self.visible, rows, rtype)))


@lru_cache(maxsize=1024)
def _lookup(found: Set, rtype: str, dialect: str) -> Select[bool]:
    """Whether ``found`` holds the resource of ``rtype`` whose id is bound as ``rid``: built once
    (building the walks costs more than running them), its arrays bound at execution."""
    r = _RESOURCE.alias().c
    among = _bound(dialect, None)[0]
    return select(exists().where(r.type == rtype, r.id == bindparam("rid"), holds(found, r.pk, among, rtype)))


def _fixed(found: Set) -> Iterator[Fixed]:
    """The Fixed sets of ``found`` (one inside another is not evaluated: ``keys`` has none)."""
    match found:
        case Fixed():
            yield found
        case Matching(within=within) if within is not None:
            yield from _fixed(within)
        case Referring(targets=inner) | Referenced(sources=inner):
            yield from _fixed(inner)
        case Union(sets=sets):
            for s in sets:
                yield from _fixed(s)


@lru_cache(maxsize=64)
def _evaluation(found: Fixed) -> Keys:
    """The statement that evaluates a Fixed set (the same for every request)."""
    return keys(found.found)


def _name(found: Fixed) -> str:
    """The name of the parameter ``found``'s keys are bound to (the same within the process)."""
    return f"fixed_{hash(found) & 0xFFFFFFFF:x}"


def _bound(dialect: str, values: Mapping[str, Any] | None) -> tuple[Among, "Rows"]:
    """Each Fixed set's keys bound as one array (``values``; None: given at execution): ``= ANY``
    and ``unnest`` on PostgreSQL, the rows of ``json_each`` on SQLite (``IN`` thousands of
    parameters would reach its limit)."""

    def param(found: Fixed) -> Any:
        name = _name(found)
        value = None if values is None else values[name]
        return bindparam(name, value, type_=ARRAY(Integer)) if dialect == "postgresql" else bindparam(name, value)

    def rows(found: Fixed) -> Keys:
        if dialect == "postgresql":
            return select(func.unnest(param(found)))
        return select(func.json_each(param(found)).table_valued("value").c.value)

    def among(found: Fixed, pk: Any) -> ColumnElement[bool]:
        if dialect == "postgresql":
            return cast(ColumnElement[bool], pk == any_(param(found)))
        return cast(ColumnElement[bool], pk.in_(rows(found)))

    return among, rows


#: Whether a literal reference (``Type/id``) names a resource of a set (of ``Evaluated``).
Contains = Callable[[Set, str], bool]
Rule = Callable[["Access"], Compartment | None]
_rule: list[Rule] = []


def use(rule: Rule) -> None:
    """Make ``rule`` give every Access its compartment, for the whole process."""
    _rule[:] = [rule]
    of.cache_clear()


@lru_cache(maxsize=1024)
def of(access: "Access | None") -> Compartment | None:
    """The compartment of ``access``; None: no rule, no Access (auth off, internal doors), or no role."""
    if access is None or access.role is None or not _rule:
        return None
    return _rule[0](access)


# -- sets of resources ---------------------------------------------------------------


def matching(rtype: str, tokens: list[tuple[str, str]], within: Set | None = None) -> Matching:
    return Matching(rtype, tuple(tokens), within)


def referring(rtype: str, param: str, targets: Set) -> Referring:
    return Referring(rtype, param, targets)


def referenced(sources: Set, param: str | None = None, rtype: str | None = None) -> Referenced:
    return Referenced(sources, param, rtype)


def union_of(*sets: Set) -> Union:
    return Union(sets)


def types(found: Set) -> frozenset[str] | None:
    """The types of the resources ``found`` may hold; None: any."""
    match found:
        case Matching(rtype=rtype) | Referring(rtype=rtype):
            return frozenset({rtype})
        case Referenced(rtype=rtype):
            return None if rtype is None else frozenset({rtype})
        case Fixed(found=inner):
            return types(inner)
        case Union(sets=sets):
            each = [types(s) for s in sets]
            return None if any(t is None for t in each) else frozenset().union(*(t for t in each if t is not None))
    raise TypeError(found)


# -- one resource: is it in the set? ---------------------------------------------------

# Core tables: building the walks from ORM aliases took longer than running them.
_RESOURCE, _REFERENCE, _TOKEN = (cast(Table, t.__table__) for t in (ResourceRow, ReferenceIndex, TokenIndex))
#: One way into a set: the conditions of one flat ``EXISTS`` (its tables are fresh aliases).
Walk = list[ColumnElement[bool]]


def holds(found: Set, pk: Any, among: Among, rtype: str | None = None) -> ColumnElement[bool]:
    """Whether the resource keyed ``pk`` (of ``rtype`` if known) is in ``found``: correlated SQL that
    walks from that resource along references, each step an indexed lookup. Each way is one flat
    ``EXISTS`` (SQLite's parser takes only about a hundred levels of nesting)."""
    # A walk of one condition tests ``pk`` alone (a Fixed array): an EXISTS would have no table of its own.
    return or_(
        false(), *(walk[0] if len(walk) == 1 else exists().where(*walk) for walk in _walks(found, pk, among, rtype))
    )


def _walks(found: Set, pk: Any, among: Among, rtype: str | None) -> list[Walk]:
    if rtype is not None and (kinds := types(found)) is not None and rtype not in kinds:
        return []
    match found:
        case Matching(rtype=mtype, tokens=tokens, within=within):
            have = [c for param, value in tokens for c in _token(mtype, param, value, pk)]
            return [[*have, *walk] for walk in _walks(within, pk, among, mtype)] if within is not None else [have]
        case Referring(rtype=stype, param=param, targets=targets):
            ref, target = _REFERENCE.alias().c, _RESOURCE.alias().c
            step = [
                ref.resource_pk == pk, ref.res_type == stype, ref.param == param,
                target.type == ref.target_type, target.id == ref.target_id, target.deleted == false(),
            ]  # fmt: skip
            return [[*step, *walk] for walk in _walks(targets, target.pk, among, None)]
        case Referenced(sources=sources, param=param):
            return [
                walk
                for stype in sorted(types(sources) or ())
                for walk in _referred_by(sources, stype, param, pk, among)
            ]
        case Union(sets=sets):
            return [walk for s in sets for walk in _walks(s, pk, among, rtype)]
        case Fixed():
            return [[among(found, pk)]]
    raise TypeError(found)


def _token(rtype: str, param: str, value: str, pk: Any) -> Walk:
    """The resource keyed ``pk`` has the token ``[system|]code`` (R4 search.html#token)."""
    t = _TOKEN.alias().c
    system, bar, code = value.rpartition("|")
    same = [t.resource_pk == pk, t.res_type == rtype, t.param == param, t.code == code]
    return [*same, t.system == system] if bar else same


def _referred_by(sources: Set, stype: str, param: str | None, pk: Any, among: Among) -> list[Walk]:
    """A resource of ``stype`` among ``sources`` refers to the one keyed ``pk`` (by ``param``)."""
    res, ref = _RESOURCE.alias().c, _REFERENCE.alias().c
    params = [param] if param else [p.code for p in registry()[stype].values() if p.type == "reference"]
    step = [
        res.pk == pk, ref.target_type == res.type, ref.target_id == res.id,
        ref.res_type == stype, ref.param.in_(params),
    ]  # fmt: skip
    return [[*step, *walk] for walk in _walks(sources, ref.resource_pk, among, stype)]


# -- the whole set ------------------------------------------------------------------------


def keys(found: Set, rows: Rows | None = None, rtype: str | None = None) -> Keys:
    """The keys of every resource (of ``rtype``, if given) in ``found``: joined from the set
    outwards, each step an index lookup per member; ``rows`` gives those of each Fixed set."""
    match found:
        case Fixed() if rows is not None:
            return rows(found)
        case Matching(rtype=mtype, tokens=tokens, within=within):
            query = search.parse(mtype, list(tokens), strict=True)
            query.within = None if within is None else (lambda pk, _: pk.in_(keys(within, rows)))
            return search.statement(query).with_only_columns(ResourceRow.pk).correlate(None)
        case Referring(rtype=stype, param=param, targets=targets):
            members, ref, target = keys(targets, rows).subquery(), _REFERENCE.alias(), _RESOURCE.alias()
            r, t = ref.c, target.c
            on = and_(r.target_type == t.type, r.target_id == t.id, r.res_type == stype, r.param == param)
            return (
                select(r.resource_pk)
                .select_from(members)
                .join(target, t.pk == members.c[0])
                .join(ref, on)
                .correlate(None)
            )
        case Referenced(sources=sources, param=param, rtype=target_type):
            members, ref, res = keys(sources, rows).subquery(), _REFERENCE.alias(), _RESOURCE.alias()
            r, t = ref.c, res.c
            stmt = (
                select(t.pk)
                .select_from(members)
                .join(ref, r.resource_pk == members.c[0])
                .join(res, and_(t.type == r.target_type, t.id == r.target_id))
                .where(t.deleted == false())
                .correlate(None)
            )
            stmt = stmt if param is None else stmt.where(r.param == param)
            target_type = target_type or rtype
            return stmt if target_type is None else stmt.where(r.target_type == target_type)
        case Union(sets=sets):
            kept = [s for s in sets if rtype is None or (kinds := types(s)) is None or rtype in kinds]
            if not kept:
                return select(_RESOURCE.c.pk).where(false())
            # SQLite takes a UNION of UNIONs only as a subquery.
            each = [keys(s, rows, rtype) for s in kept]
            return union(*(k if isinstance(k, Select) else select(k.subquery().c[0]) for k in each))
    raise TypeError(found)
