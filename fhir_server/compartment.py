"""A client's compartment: the resources a client with a role may see and write.

The store knows no roles: the application registers a ``Rule`` (``use``) that gives each
``Access`` its ``Compartment``, or None for a client its scopes alone limit. A compartment's
``visible`` set is SQL (a SELECT of resource keys) that the database evaluates inside each
statement that needs it: a search, its includes, chains and ``_has``, a history, the check of a
read; nothing is loaded into memory. The rule builds it from the set operations here, each an
indexed lookup: a search (``matching``), the resources that refer to a set (``referring``), the
resources a set refers to (``referenced``), and ``union``.

``fhir_server.access`` enforces it (docs/security.md, "Roles").
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from sqlalchemy import CompoundSelect, Connection, Select, and_, exists, false, select, union
from sqlalchemy.orm import aliased

from fhir_server import search
from fhir_server.schema import ReferenceIndex, ResourceRow
from fhir_server.validation import ID

if TYPE_CHECKING:  # access.py consults this module
    from fhir_server.access import Access

#: A set of resources: a SELECT of their keys (``resource.pk``). Each is uncorrelated: inside
#: another statement over the same tables it is still a set of its own, evaluated once.
Keys = Select[int] | CompoundSelect[int]
Resource = dict[str, Any]


@dataclass(frozen=True)
class Compartment:
    """What a client with a role may see and write."""

    visible: Keys
    #: Whether it may write a resource of a type: a create's or update's body, None for a delete; it
    #: asks ``Contains`` whether a reference names a resource of a set.
    may_write: Callable[[str, Resource | None, "Contains"], bool]
    #: Per resource type, the only elements it may see and search on (a type not named: none).
    #: Such a view is read-only: no writes, history, operations, includes, chains or ``_has``.
    elements: Mapping[str, frozenset[str]] | None = None

    def shows(self, conn: Connection, rtype: str, rid: str) -> bool:
        """Whether ``rtype/rid`` is stored and visible."""
        return contains(conn, self.visible, rtype, rid)

    def view(self, rtype: str) -> frozenset[str] | None:
        """The elements of ``rtype`` it may see; None: whole resources."""
        return None if self.elements is None else self.elements.get(rtype, frozenset())


def contains(conn: Connection, keys: Keys, rtype: str, rid: str) -> bool:
    """Whether the set ``keys`` holds ``rtype/rid``."""
    if not ID.fullmatch(rid):  # never stored; PostgreSQL would refuse a NUL in it (a 500)
        return False
    r = ResourceRow
    return bool(conn.scalar(select(exists().where(r.type == rtype, r.id == rid, r.pk.in_(keys)))))


#: Whether a literal reference (``Type/id``) names a resource of a set.
Contains = Callable[[Keys, str], bool]
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


def matching(rtype: str, params: list[tuple[str, str]], within: Keys | None = None) -> Keys:
    """The resources of ``rtype`` (among ``within``) a search with ``params`` finds (R4 search.html)."""
    query = search.parse(rtype, params, strict=True)
    query.within = within
    return search.statement(query).with_only_columns(ResourceRow.pk).correlate(None)


def referring(rtype: str, param: str, targets: Keys) -> Keys:
    """The resources of ``rtype`` whose reference parameter ``param`` points into ``targets``."""
    # Joins from the set outwards, each step an index lookup per member: as ``IN`` conditions, SQLite
    # looked every candidate up once per member, and PostgreSQL scanned the set once per candidate.
    keys, r, target = targets.subquery(), aliased(ReferenceIndex), aliased(ResourceRow)
    return (
        select(r.resource_pk)
        .select_from(keys)
        .join(target, target.pk == keys.c[0])
        .join(r, and_(r.target_type == target.type, r.target_id == target.id, r.res_type == rtype, r.param == param))
        .correlate(None)
    )


def referenced(sources: Keys, param: str | None = None, rtype: str | None = None) -> Keys:
    """The resources stored here (of ``rtype``) that ``sources`` refer to (by ``param``; None: any)."""
    keys, r, res = sources.subquery(), aliased(ReferenceIndex), aliased(ResourceRow)
    found = (
        select(res.pk)
        .select_from(keys)
        .join(r, r.resource_pk == keys.c[0])
        .join(res, and_(res.type == r.target_type, res.id == r.target_id))
        .where(res.deleted == false())
        .correlate(None)
    )
    if param is not None:
        found = found.where(r.param == param)
    return found if rtype is None else found.where(r.target_type == rtype)


def named(name: str, keys: Keys) -> Keys:
    """``keys`` as a common table expression (``WITH name AS (...)``) that the statements using the
    set name: each of its uses is one shallow subquery, and SQLite's parser takes a set built of
    many nested ones only so (its stack holds about a hundred levels)."""
    return select(keys.cte(name).c[0])


def union_of(*sets: Keys) -> Keys:
    """Every resource of any of ``sets`` (SQLite takes a UNION of UNIONs only as a subquery)."""
    return union(*(s if isinstance(s, Select) else select(s.subquery().c[0]) for s in sets))
