"""FHIR R4 search (http.html#search, search.html): parsing, SQL, paging and includes.

A query string becomes ``SearchQuery``; ``execute`` turns it into one SQL statement over
the resource table and the ``idx_*`` tables, then fetches ``_include``/``_revinclude``
targets. Parameters joined by ``&`` are ANDed, comma-separated values ORed (§3.1.1.4.1).
"""

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, TypeVar
from urllib.parse import urlencode

import orjson
from sqlalchemy import (
    Boolean,
    ColumnElement,
    Connection,
    Select,
    String,
    and_,
    bindparam,
    false,
    func,
    not_,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import aliased
from sqlalchemy.sql.visitors import InternalTraversal

from fhir_server import dates
from fhir_server.db import Deadline, statement_deadline, timed_out
from fhir_server.errors import FhirError, Issue, error, operation_outcome
from fhir_server.indexing import normalize, split, split_reference
from fhir_server.limits import whole
from fhir_server.schema import (
    KEY,
    URI_KEY,
    DateIndex,
    NumberIndex,
    QuantityIndex,
    ReferenceIndex,
    ResourceRow,
    StringIndex,
    TokenIndex,
    UriIndex,
)
from fhir_server.search_limits import exceeded, limits
from fhir_server.search_params import COLUMN_PARAMS, SearchParam, registry
from fhir_server.stored import Stored
from fhir_server.validation import SUPPORTED_TYPES, check_type

#: The default page, and the largest a history serves (a search's is ``SearchLimits.max_count``).
DEFAULT_COUNT, MAX_COUNT = 20, 1000
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")
CONTROL = {
    "_count", "_offset", "_sort", "_include", "_revinclude", "_summary", "_total", "_elements",
    "_format", "_pretty",
}  # fmt: skip
TABLES: dict[str, Any] = {
    "token": TokenIndex, "string": StringIndex, "reference": ReferenceIndex, "date": DateIndex,
    "number": NumberIndex, "uri": UriIndex, "quantity": QuantityIndex,
}  # fmt: skip
SORT_COLUMNS = {"token": "code", "string": "norm", "reference": "target_id", "date": "low",
                "number": "value", "uri": "value", "quantity": "value"}  # fmt: skip
MODIFIERS = {
    "token": {"not", "missing"},
    "string": {"exact", "contains", "missing"},
    "reference": {"missing"},  # and a resource type, e.g. subject:Patient
    "date": {"missing"}, "number": {"missing"}, "quantity": {"missing"},
    "uri": {"below", "above", "missing"},
}  # fmt: skip
Resource = type[ResourceRow]
#: Whether a resource (the key column, its type if known) is one a search may find (``SearchQuery.within``).
Within = Callable[[Any, str | None], ColumnElement[bool]]


@dataclass(frozen=True)
class Criterion:
    """One ``name[:modifier][.chained]=v1,v2`` parameter: its values are ORed."""

    param: SearchParam
    modifier: str | None
    values: tuple[str, ...]
    #: For a chained parameter (``subject:Patient.name=x``): per target type, the criterion on it.
    chain: tuple[tuple[str, "Criterion"], ...] = ()
    #: For ``_has:Type:reference:param=x`` (reverse chaining): Type, its reference parameter, the criterion on Type.
    has: tuple[str, str, "Criterion"] | None = None


@dataclass(frozen=True)
class Include:
    source: str
    param: str  # "*" for every reference parameter
    target: str | None
    iterate: bool
    reverse: bool


@dataclass
class SearchQuery:
    #: The type searched; "" for a search of the whole system (``types`` then says which).
    resource_type: str
    criteria: list[Criterion] = field(default_factory=list)
    count: int = DEFAULT_COUNT
    offset: int = 0
    sort: list[tuple[str, bool]] = field(default_factory=list)  # (code, descending)
    includes: list[Include] = field(default_factory=list)
    summary: str | None = None
    total: str = "accurate"
    elements: list[str] | None = None
    #: The parameters the search used, for the self/next/previous links.
    used: list[tuple[str, str]] = field(default_factory=list)
    #: A system search's ``_type`` list (R4 search.html#_type); empty: every type.
    types: tuple[str, ...] = ()
    #: Whether a resource (its key ``resource.pk``, its type if known) is one the search, its chains,
    #: ``_has`` and includes may find: the caller's compartment (``fhir_server.compartment``); None: all.
    within: Within | None = None


@dataclass
class SearchResult:
    query: SearchQuery
    total: int | None
    matches: list[Stored]
    included: list[Stored]
    #: Whether matches follow this page (known without a total: one row more is fetched).
    more: bool = False
    #: What the search left out, for an OperationOutcome entry (search.html#errors).
    warnings: list[str] = field(default_factory=list)


# -- parsing ---------------------------------------------------------------------


def parse(resource_type: str, params: list[tuple[str, str]], strict: bool = False, base: str = "") -> SearchQuery:
    """Parse a query string; unknown parameters are errors with ``strict``, else ignored.

    ``resource_type`` "" is a search of the whole system (R4 http.html#search, ``GET [base]?``):
    ``_type`` narrows it to a list of types, and its other parameters must be common to every
    type searched (search.html#_type). ``base`` is this server's FHIR base: a reference value
    under it is a local reference.
    """
    if resource_type:
        check_type(resource_type)
    query = SearchQuery(resource_type)
    terms = values = 0  # criteria and values so far
    for name, value in params:
        code = name.split(":", 1)[0]
        if code == "_type" and not resource_type:
            query.types = _types(name, value)
            query.used.append((name, value))
    for name, value in params:
        code = name.split(":", 1)[0]
        try:
            if code == "_type" and not resource_type:
                continue
            if code in CONTROL:
                _control(query, name, value)
            else:
                _check_depth(name)
                crit = _criterion(resource_type, name, value, base) if resource_type else _common(query, name, value)
                query.criteria.append(crit)
                more_terms, more_values = _size(crit)
                terms, values = terms + more_terms, values + more_values
                _check_size(terms, values, name)
        except UnknownParameter as exc:
            if strict:
                raise error(400, "not-supported", str(exc), name) from None
            continue
        if code not in ("_offset", "_format", "_pretty"):
            query.used.append((name, value))
    return query


class UnknownParameter(Exception):
    pass


def _types(name: str, value: str) -> tuple[str, ...]:
    types = tuple(t.strip() for t in value.split(",") if t.strip())
    if not types:
        raise error(400, "invalid", "_type needs at least one resource type", name)
    for rtype in types:
        check_type(rtype)
    return types


def _params(query: SearchQuery) -> dict[str, SearchParam]:
    """The search parameters of the searched type; for a system search, those of every type searched."""
    if query.resource_type:
        return registry()[query.resource_type]
    types = query.types or tuple(SUPPORTED_TYPES)
    per_type = [registry()[t] for t in types]
    first = per_type[0]
    return {code: p for code, p in first.items() if all(code in o and o[code].url == p.url for o in per_type[1:])}


def _control(query: SearchQuery, name: str, value: str) -> None:
    match name.split(":", 1):
        case ["_count"]:
            query.count = min(_int(name, value), limits().max_count)
        case ["_offset"]:
            query.offset = _int(name, value)
        case ["_sort"]:
            keys = value.split(",")
            if len(query.sort) + len(keys) > (most := limits().max_sort_keys):
                raise exceeded("max_sort_keys", most, "Too many _sort keys", name)
            for key in keys:
                code = key.lstrip("-")
                if code not in _params(query) and code not in COLUMN_PARAMS:
                    searched = query.resource_type or "the types searched"
                    raise error(400, "invalid", f"Cannot sort {searched} by unknown {code!r}", name)
                query.sort.append((code, key.startswith("-")))
        case ["_include" | "_revinclude" as kind, *modifier]:
            if len(query.includes) >= (most := limits().max_includes):
                raise exceeded("max_includes", most, "Too many _include and _revinclude parameters", name)
            query.includes.append(_include(value, kind == "_revinclude", modifier == ["iterate"]))
        case ["_summary"]:
            if value not in ("true", "false", "text", "data", "count"):
                raise error(400, "invalid", f"_summary={value} is not one of true, text, data, count, false")
            query.summary = None if value == "false" else value
        case ["_total"]:
            if value not in ("none", "estimate", "accurate"):
                raise error(400, "invalid", f"_total={value} is not one of none, estimate, accurate")
            query.total = value
        case ["_elements"]:
            query.elements = [e.strip() for e in value.split(",") if e.strip()]
        case ["_format" | "_pretty"]:
            pass
        case _:
            raise UnknownParameter(f"Unknown search control parameter {name!r}")


def _include(value: str, reverse: bool, iterate: bool) -> Include:
    if value == "*":
        return Include("*", "*", None, iterate, reverse)
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[0] not in SUPPORTED_TYPES:
        raise error(400, "invalid", f"{value!r} is not Type:parameter[:targetType]")
    source, code, target = parts[0], parts[1], parts[2] if len(parts) == 3 else None
    param = registry()[source].get(code)
    if code != "*" and (param is None or param.type != "reference"):
        raise error(400, "invalid", f"{source} has no reference search parameter {code!r}")
    return Include(source, code, target, iterate, reverse)


def _int(name: str, value: str) -> int:
    return whole(name, value)


def _lookup(resource_type: str, code: str) -> SearchParam:
    if code in COLUMN_PARAMS:
        return SearchParam(code, COLUMN_PARAMS[code], "")
    param = registry()[resource_type].get(code)
    if param is None:
        raise UnknownParameter(f"Unknown search parameter {code!r} for {resource_type}")
    return param


def _criterion(resource_type: str, name: str, value: str, base: str = "") -> Criterion:
    if name.startswith("_has:"):
        return _has(resource_type, name, value, base)
    head, _, chained = name.partition(".")
    code, _, modifier = head.partition(":")
    param = _lookup(resource_type, code)
    modifier_or_none = modifier or None
    if chained:
        if param.type != "reference":
            raise error(400, "invalid", f"Only reference parameters can be chained, not {code!r}", name)
        types = (modifier,) if modifier else param.targets
        chain = tuple((t, _criterion(t, chained, value, base)) for t in types if _knows(t, chained))
        if not chain:
            raise UnknownParameter(f"No target of {resource_type}.{code} has the parameter {chained!r}")
        return Criterion(param, None, (), chain)
    typed_reference = param.type == "reference" and modifier in SUPPORTED_TYPES
    if modifier_or_none and modifier_or_none not in MODIFIERS[param.type] and not typed_reference:
        raise error(400, "not-supported", f"Modifier :{modifier} is not supported on {code!r}", name)
    values = tuple(v.replace("\\,", ",") for v in re.split(r"(?<!\\),", value))
    if any(len(v) > (longest := limits().max_value_length) for v in values):
        raise exceeded("max_value_length", longest, "A search value is too long", name)
    if param.type == "reference" and base:
        values = tuple(v.removeprefix(f"{base}/") for v in values)
    if modifier_or_none == "missing" and value not in ("true", "false"):
        raise error(400, "invalid", f"{name} must be true or false", name)
    return Criterion(param, modifier_or_none, values)


def _has(resource_type: str, name: str, value: str, base: str) -> Criterion:
    """``_has:Observation:patient:code=x``: resources some Observation refers to by ``patient``, where
    that Observation has ``code=x`` (R4 search.html#has); the inner name may be ``_has`` again."""
    parts = name.split(":", 3)
    if len(parts) != 4 or not all(parts):
        raise error(400, "invalid", f"{name!r} is not _has:Type:reference:parameter", name)
    _, source, code, inner = parts
    if source not in SUPPORTED_TYPES:
        raise error(400, "invalid", f"_has names {source!r}, not a resource type this server has", name)
    reference = registry()[source].get(code)
    if reference is None or reference.type != "reference":
        raise error(400, "invalid", f"{source} has no reference search parameter {code!r}", name)
    if reference.targets and resource_type not in reference.targets:
        raise error(400, "invalid", f"{source}.{code} never refers to a {resource_type}", name)
    if not _knows(source, inner) and not inner.startswith("_has:"):
        raise UnknownParameter(f"Unknown search parameter {inner!r} for {source}")
    has = (source, code, _criterion(source, inner, value, base))
    return Criterion(SearchParam("_has", "special", ""), None, (), has=has)


def _common(query: SearchQuery, name: str, value: str) -> Criterion:
    """A criterion of a system search: a parameter of every type searched, neither chained nor ``_has``."""
    code = name.partition(":")[0]
    if "." in name or code == "_has" or (code not in COLUMN_PARAMS and code not in _params(query)):
        raise UnknownParameter(f"{name!r} is not a search parameter common to every type searched")
    return _criterion((query.types or SUPPORTED_TYPES)[0], name, value)


def _check_depth(name: str) -> None:
    """Refuse a chain or ``_has`` nested deeper than the limit, before it is expanded: each link is a
    subquery per target type, and parsing it recurses (search.html#chaining, #has)."""
    depth = name.count(".") + name.count("_has:")
    if depth > (most := limits().max_chain_depth):
        raise exceeded("max_chain_depth", most, "The chain or _has is nested too deep", name)


def _size(crit: Criterion) -> tuple[int, int]:
    """The criteria (``crit``, and each its chain or ``_has`` expands into) and the values they hold."""
    terms = values = 0
    pending = [crit]
    while pending:
        one = pending.pop()
        terms += 1
        values += len(one.values)
        pending += [chained for _, chained in one.chain]
        if one.has is not None:
            pending.append(one.has[2])
    return terms, values


def _check_size(terms: int, values: int, name: str) -> None:
    """Refuse a search whose criteria (chains expanded) or OR-ed values pass their limits: SQLite
    refuses an expression tree over 1,000 deep, PostgreSQL plans every term in memory."""
    if terms > (most := limits().max_terms):
        raise exceeded("max_terms", most, "Too many search criteria (chains count once per target type)", name)
    if values > (most := limits().max_values):
        raise exceeded("max_values", most, "Too many search values (comma-separated values count each)", name)


def _knows(resource_type: str, chained: str) -> bool:
    code = chained.partition(":")[0].partition(".")[0]
    return resource_type in SUPPORTED_TYPES and (code in COLUMN_PARAMS or code in registry()[resource_type])


# -- SQL -----------------------------------------------------------------------------


def _where(res: Resource, resource_type: str, crit: Criterion, within: Within | None = None) -> ColumnElement[bool]:
    """The SQL of ``crit``; the resources its chains and ``_has`` search are those ``within`` holds (None: all)."""
    param = crit.param
    if crit.has is not None:
        source_type, code, on_source = crit.has
        src = aliased(ResourceRow)
        sources = _live(src, src.pk, source_type, on_source, within)
        targets = select(ReferenceIndex.target_id).where(
            ReferenceIndex.res_type == source_type,
            ReferenceIndex.param == code,
            ReferenceIndex.target_type == resource_type,
            ReferenceIndex.resource_pk.in_(sources),
        )
        return and_(res.type == resource_type, res.id.in_(targets))
    if crit.chain:
        per_type = []
        for target_type, chained in crit.chain:
            inner = aliased(ResourceRow)
            ids = _live(inner, inner.id, target_type, chained, within)
            per_type.append(and_(ReferenceIndex.target_type == target_type, ReferenceIndex.target_id.in_(ids)))
        return res.pk.in_(
            select(ReferenceIndex.resource_pk).where(
                ReferenceIndex.res_type == resource_type, ReferenceIndex.param == param.code, or_(*per_type)
            )
        )
    if param.code in COLUMN_PARAMS:
        if crit.modifier == "missing":  # every resource has an id and a lastUpdated
            return false() if crit.values[0] == "true" else true()
        clause: ColumnElement[bool]
        if param.code == "_id":
            clause = res.id.in_(crit.values)
        else:
            clause = or_(*(_date(res.last_updated, res.last_updated, v) for v in crit.values))
        return not_(clause) if crit.modifier == "not" else clause

    table = TABLES[param.type]
    rows = select(table.resource_pk).where(table.param == param.code)
    if resource_type:  # a system search (no type) is bounded by ``statement``
        rows = rows.where(table.res_type == resource_type)
    if crit.modifier == "missing":
        has = res.pk.in_(rows)
        return not_(has) if crit.values[0] == "true" else has
    matching = res.pk.in_(rows.where(or_(*(_value(table, crit, v) for v in crit.values))))
    return not_(matching) if crit.modifier == "not" else matching


def _value(table: Any, crit: Criterion, value: str) -> ColumnElement[bool]:
    match crit.param.type:
        case "token":
            if "|" not in value:
                return _equals(table.code, table.code_rest, value)
            system, code = value.split("|", 1)
            if not system:
                return and_(table.system.is_(None), _equals(table.code, table.code_rest, code))
            in_system = _equals(table.system, table.system_rest, system)
            return and_(in_system, _equals(table.code, table.code_rest, code)) if code else in_system
        case "string":
            norm = normalize(value)
            if crit.modifier == "exact":
                # The value's norm key as well: it is implied, and indexed.
                return and_(table.norm == split(norm)[0], _equals(table.value, table.value_rest, value))
            if crit.modifier == "contains":
                return (table.norm + table.norm_rest).like(f"%{_like(norm)}%", escape="\\")  # type: ignore[no-any-return]
            return _begins(table.norm, table.norm_rest, norm)
        case "reference":
            return _reference(crit, value)
        case "date":
            return _date(table.low, table.high, value)
        case "number":
            return _number(table.value, value)
        case "quantity":
            number, _, unit = value.partition("|")
            clause = _number(table.value, number)
            system, _, code = unit.partition("|")
            if code:
                clause = and_(clause, table.code == code, table.system == system if system else true())
            elif system:  # "5.4||mg" has the code in the third part; "5.4|mg" would be ambiguous
                clause = and_(clause, table.code == system)
            return clause
        case "uri":
            # Case-sensitive (RFC 3986 §6.2.2.1), as StartsWith and = are on both databases.
            if crit.modifier == "below":
                return _begins(table.value, table.value_rest, value, URI_KEY)
            if crit.modifier == "above":
                return _above(table.value, table.value_rest, value, URI_KEY)
            return _equals(table.value, table.value_rest, value, URI_KEY)
    raise error(400, "not-supported", f"Search on {crit.param.type} parameters is not supported")


def _equals(key: Any, rest: Any, value: str, size: int = KEY) -> ColumnElement[bool]:
    """An index value (``key`` and ``rest`` columns, ``fhir_server.schema``) is ``value``, whole."""
    head, tail = split(value, size)
    return and_(key == head, rest == tail if tail else _no_rest(rest))


@cache
def _no_rest(rest: Any) -> ColumnElement[bool]:
    """``rest = ''``, built once: most values have no rest, and building a comparison costs a search."""
    return rest == ""  # type: ignore[no-any-return]


def _begins(key: Any, rest: Any, prefix: str, size: int = KEY) -> ColumnElement[bool]:
    """An index value starts with ``prefix``: a range of the key, or past it the key and the rest's start."""
    if len(prefix) <= size:
        return StartsWith(key, prefix)
    return and_(key == prefix[:size], StartsWith(rest, prefix[size:]))


def _above(key: Any, rest: Any, uri: str, size: int) -> ColumnElement[bool]:
    """An index value is ``uri`` or a parent of it: its prefixes up to a "/", with and without it
    (R4 search.html#uri). IN lists, however many parents (an OR would nest): the keys' for the index,
    the (key, rest) pairs' to compare whole."""
    slashes = [i for i, c in enumerate(uri) if c == "/"]
    parents = sorted(split(p, size) for p in {uri, *(uri[:i] for i in slashes if i), *(uri[: i + 1] for i in slashes)})
    return and_(key.in_(sorted({k for k, _ in parents})), tuple_(key, rest).in_(parents))


def _reference(crit: Criterion, value: str) -> ColumnElement[bool]:
    """Local references (``Type/id``, ``id``) match type and id; any other URL matches whole.

    ``parse`` has already made absolute URLs under this server's base relative.
    """
    value = value.split("|", 1)[0]  # canonical|version
    if ":" in value:  # http(s)://…, urn:uuid:…, urn:oid:…
        return ReferenceIndex.url == value
    target_type, target_id = split_reference(value)
    if target_type is None:  # a bare id, possibly typed by the modifier
        clause = ReferenceIndex.target_id == value
        if crit.modifier:
            clause = and_(clause, ReferenceIndex.target_type == crit.modifier)
        return clause
    return and_(ReferenceIndex.target_type == target_type, ReferenceIndex.target_id == target_id)


def _prefix(value: str) -> tuple[str, str]:
    """("ge", "2024") from "ge2024"; a number may be negative ("gt-20")."""
    rest = value[2:].removeprefix("-")
    if value[:2] in PREFIXES and rest[:1].isdigit():
        return value[:2], value[2:]
    return "eq", value


def _date(low: Any, high: Any, value: str) -> ColumnElement[bool]:
    # An unencoded "+" of a time-zone offset arrives as a space (form encoding of the query).
    prefix, literal = _prefix(value.replace(" ", "+"))
    try:
        pl, ph = dates.parse_range(literal)
    except ValueError as exc:
        raise error(400, "invalid", str(exc)) from None
    match prefix:
        case "eq":
            return and_(low >= pl, high <= ph)
        case "ne":
            return or_(low < pl, high > ph)
        case "gt":
            return high > ph  # type: ignore[no-any-return]
        case "lt":
            return low < pl  # type: ignore[no-any-return]
        case "ge":
            return high >= pl  # type: ignore[no-any-return]
        case "le":
            return low <= ph  # type: ignore[no-any-return]
        case "sa":
            return low > ph  # type: ignore[no-any-return]
        case "eb":
            return high < pl  # type: ignore[no-any-return]
    # ap: within 10% of the distance from now, and at least a day (search.html#prefix)
    near_low, near_high = dates.approximately(pl, ph, datetime.utcnow())
    return and_(low <= near_high, high >= near_low)


def _number(column: Any, value: str) -> ColumnElement[bool]:
    """A number with the precision it is written with (search.html#number)."""
    prefix, literal = _prefix(value)
    try:
        number = Decimal(literal)
    except InvalidOperation:
        raise error(400, "invalid", f"{value!r} is not a number") from None
    if not number.is_finite() or not -1000 < number.adjusted() < 1000:
        # The index holds IEEE doubles (about 1e±308); a Decimal exponent near its context's
        # limit (1e-999999999) cannot even be scaled to its precision below.
        raise error(400, "invalid", f"{value[:64]!r} is not a finite number between 1e-999 and 1e999")
    # Half a unit of the last digit given: "100" is [99.5, 100.5), "100.0" [99.95, 100.05),
    # "1.0e2" [95, 105). The exponent of a Decimal is the place of its last digit.
    exponent = number.as_tuple().exponent
    half = Decimal(5).scaleb(int(exponent) - 1)
    low, high, exact = float(number - half), float(number + half), float(number)
    match prefix:
        case "eq":
            return and_(column >= low, column < high)
        case "ne":
            return or_(column < low, column >= high)
        case "gt" | "sa":
            return column > exact  # type: ignore[no-any-return]
        case "lt" | "eb":
            return column < exact  # type: ignore[no-any-return]
        case "ge":
            return column >= exact  # type: ignore[no-any-return]
        case "le":
            return column <= exact  # type: ignore[no-any-return]
    # ap: within 10 % of the value, whichever its sign
    margin = abs(exact) * 0.1
    return and_(column >= exact - margin, column <= exact + margin)


class StartsWith(ColumnElement[bool]):
    """``column`` starts with ``prefix`` in a form the index answers: on SQLite ``GLOB``, whose
    optimisation uses the column's index (its ``LIKE`` ignores case, so cannot: optoverview.html#like_opt),
    elsewhere ``LIKE``. Both case-sensitive, as the case-folded ``norm`` needs."""

    inherit_cache = True
    type = Boolean()
    _is_implicitly_boolean = True  # a condition by itself, not "… = 1"
    _traverse_internals = [
        ("column", InternalTraversal.dp_clauseelement),
        ("pattern", InternalTraversal.dp_clauseelement),
        ("glob", InternalTraversal.dp_clauseelement),
    ]

    def __init__(self, column: Any, prefix: str) -> None:
        self.column = column
        self.pattern = bindparam(None, _like(prefix) + "%", unique=True, type_=String())
        # GLOB has no escape character: its wildcards become one-character classes.
        self.glob = bindparam(None, re.sub(r"([*?\[])", r"[\1]", prefix) + "*", unique=True, type_=String())


@compiles(StartsWith)
def _starts_with(element: StartsWith, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} LIKE {compiler.process(element.pattern, **kw)} ESCAPE '\\'"


@compiles(StartsWith, "sqlite")
def _starts_with_sqlite(element: StartsWith, compiler: Any, **kw: Any) -> str:
    return f"{compiler.process(element.column, **kw)} GLOB {compiler.process(element.glob, **kw)}"


def _like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _order(res: Resource, query: SearchQuery) -> list[Any]:
    keys: list[Any] = []
    for code, descending in query.sort:
        if code == "_id":
            column: Any = res.id
        elif code == "_lastUpdated":
            column = res.last_updated
        else:
            param = _params(query)[code]
            table = TABLES[param.type]
            col = getattr(table, SORT_COLUMNS[param.type])
            if param.type == "date" and descending:
                col = table.high
            column = (
                select((func.max if descending else func.min)(col))
                .where(table.resource_pk == res.pk, table.param == code)
                .scalar_subquery()
            )
        keys.append(column.desc().nulls_last() if descending else column.asc().nulls_last())
    keys.append(res.pk)  # a stable order, so that pages neither skip nor repeat
    return keys


#: Types a search or history of the whole system, and ``_revinclude=*``, leave out unless they are
#: named: the audit log (``fhir_server.audit_log``) is no content of the store, and grows with every request.
APART = ("AuditEvent",)
#: What a search reads of each resource: a ``Stored`` (Core rows, no ORM objects).
STORED = (ResourceRow.type, ResourceRow.id, ResourceRow.version, ResourceRow.last_updated, ResourceRow.content)


def statement(query: SearchQuery) -> Select[str, str, int, datetime, str | None]:
    res = ResourceRow
    stmt = select(*STORED).where(res.deleted == false())
    narrowing = [c for c in query.criteria if _narrows_type(c)]
    if query.types:
        stmt = stmt.where(res.type.in_(query.types))
    elif query.resource_type and not narrowing:
        stmt = stmt.where(res.type == query.resource_type)
    elif not query.resource_type:
        stmt = stmt.where(res.type.not_in(APART))
    for crit in query.criteria:
        stmt = stmt.where(_where(res, query.resource_type, crit, query.within))
    return _within(stmt, res, query.within, query.resource_type or None)


_S = TypeVar("_S", bound=Select[*tuple[Any, ...]])


def _live(res: Resource, column: Any, rtype: str, crit: Criterion, within: Within | None) -> Select[Any]:
    """``column`` of the current resources of ``rtype`` that match ``crit`` (a chain's or ``_has``'s
    inner search), kept to those ``within`` holds."""
    stmt = select(column).where(res.type == rtype, res.deleted == false(), _where(res, rtype, crit, within))
    return _within(stmt, res, within, rtype)


def _within(stmt: _S, res: Resource, within: Within | None, rtype: str | None = None) -> _S:
    """``stmt`` kept to the resources (of ``rtype``, if known) ``within`` holds (None: all)."""
    return stmt if within is None else stmt.where(within(res.pk, rtype))


def _narrows_type(crit: Criterion) -> bool:
    """Whether the criterion alone keeps to resources of the searched type.

    Index rows carry their resource's type, so a positive index criterion does. Then the
    query leaves out ``resource.type = ?``: with it, SQLite without statistics walks every
    resource of the type instead of looking up the few the index found.
    """
    return crit.param.code not in COLUMN_PARAMS and (
        crit.modifier not in ("not", "missing") or (crit.modifier == "missing" and crit.values[0] == "false")
    )


def execute(conn: Connection, query: SearchQuery) -> SearchResult:
    """Run ``query`` within ``SearchLimits.timeout``, on either database: past it, the statement is
    stopped and the search answered 503 ``too-costly`` (search.html#errors; docs/reliability.md)."""
    seconds = limits().timeout
    own: Deadline | None = None
    try:
        with statement_deadline(conn, seconds) as own:
            return _execute(conn, query, own)
    except Exception as exc:
        # Only its own deadline: an outer one (a light search's, ``executor_sqlite``) sends it to a reader thread.
        if own is not None and timed_out(exc) and own.passed:
            raise _too_slow(seconds) from None
        raise


def _too_slow(seconds: float) -> FhirError:
    return error(503, "too-costly", f"The search ran past its time limit: timeout={seconds:g} seconds")


def _execute(conn: Connection, query: SearchQuery, own: Deadline) -> SearchResult:
    stmt = statement(query)
    wants_total = query.total != "none"
    if query.summary == "count" or query.count == 0:
        return SearchResult(query, _count(conn, stmt), [], [], False)
    # One row beyond the page tells whether there is a next page, also with _total=none;
    # the total comes with the page (count(*) OVER ()), saving a query and a round trip.
    page = stmt.add_columns(func.count().over()) if wants_total else stmt
    rows = conn.execute(page.order_by(*_order(ResourceRow, query)).limit(query.count + 1).offset(query.offset)).all()
    matches = [Stored(*row[:5]) for row in rows[: query.count]]
    total = None
    if wants_total:  # a page past the end has no row to carry the total
        total = rows[0][5] if rows else (_count(conn, stmt) if query.offset else 0)
    result = SearchResult(query, total, matches, [], len(rows) > query.count)
    result.included = _included(conn, query, matches, own, result.warnings)
    return result


def _count(conn: Connection, stmt: Select[str, str, int, datetime, str | None]) -> int:
    return int(conn.scalar(select(func.count()).select_from(stmt.subquery())) or 0)


def _included(
    conn: Connection, query: SearchQuery, matches: list[Stored], own: Deadline, warnings: list[str]
) -> list[Stored]:
    """The resources the page's ``_include``/``_revinclude`` bring, round after round of ``:iterate``,
    at most ``max_included`` of them over ``max_iterate_depth`` rounds; ``warnings`` says what was cut."""
    if not query.includes or not matches:
        return []
    most, rounds = limits().max_included, limits().max_iterate_depth
    seen = {(m.type, m.id) for m in matches}
    found: list[Stored] = []
    frontier = matches
    for depth in range(rounds + 1):
        rules = [i for i in query.includes if depth == 0 or i.iterate]
        new: list[Stored] = []
        for rule in rules:
            clause = _reverse_include(rule, frontier) if rule.reverse else _forward_include(rule, frontier)
            if clause is None:
                continue
            if own.passed:  # between statements: each is stopped by the database itself
                raise _too_slow(limits().timeout)
            # Rows already seen come back too: fetch enough for them and the room left, no more.
            room = most - len(found) - len(new)
            here = _within(select(*STORED).where(ResourceRow.deleted == false(), clause), ResourceRow, query.within)
            rows = conn.execute(here.limit(room + len(seen) + 1))
            for row in rows:
                if (row.type, row.id) in seen:
                    continue
                if len(found) + len(new) >= most:
                    warnings.append(f"Included resources were cut at max_included={most}")
                    return found + new
                seen.add((row.type, row.id))
                new.append(Stored(*row))
        found += new
        frontier = new
        if not new or not any(i.iterate for i in query.includes):
            return found
    warnings.append(f"_include:iterate stopped after max_iterate_depth={rounds} rounds")
    return found


def _by_type(stored: list[Stored]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for s in stored:
        grouped.setdefault(s.type, []).append(s.id)
    return grouped


def _forward_include(rule: Include, frontier: list[Stored]) -> ColumnElement[bool] | None:
    sources = [s for s in frontier if rule.source in ("*", s.type)]
    if not sources:
        return None
    src = aliased(ResourceRow)
    refs = (
        select(ReferenceIndex.target_type, ReferenceIndex.target_id)
        .join(src, src.pk == ReferenceIndex.resource_pk)
        .where(or_(*(and_(src.type == t, src.id.in_(ids)) for t, ids in _by_type(sources).items())))
    )
    if rule.param != "*":
        refs = refs.where(ReferenceIndex.param == rule.param)
    if rule.target:
        refs = refs.where(ReferenceIndex.target_type == rule.target)
    # (type, id) IN (…): each target looked up by the (type, id) key; a correlated EXISTS made
    # SQLite scan every resource and test each.
    return tuple_(ResourceRow.type, ResourceRow.id).in_(refs)


def _reverse_include(rule: Include, frontier: list[Stored]) -> ColumnElement[bool]:
    pointing = select(ReferenceIndex.resource_pk).where(
        or_(
            *(
                and_(ReferenceIndex.target_type == t, ReferenceIndex.target_id.in_(ids))
                for t, ids in _by_type(frontier).items()
            )
        )
    )
    if rule.source != "*":
        pointing = pointing.where(ReferenceIndex.res_type == rule.source)
    else:  # every type that points here, but the audit log: it points at everything it saw
        pointing = pointing.where(ReferenceIndex.res_type.not_in(APART))
    if rule.param != "*":
        pointing = pointing.where(ReferenceIndex.param == rule.param)
    return ResourceRow.pk.in_(pointing)


# -- results as Bundles ------------------------------------------------------------


def shape(resource: dict[str, Any], summary: str | None, elements: list[str] | None) -> dict[str, Any]:
    """Apply _summary / _elements (search.html#summary, #elements); mark the result SUBSETTED.
    An element may name one child of an object element (``restriction.period``)."""
    if summary in (None, "false") and elements is None:
        return resource
    keep: set[str] | None = None
    if elements is not None:
        keep = {"resourceType", "id", "meta", *elements}
    elif summary == "true":
        keep = {"resourceType", *_summary_elements(resource["resourceType"])}
    elif summary == "text":
        keep = {"resourceType", "id", "meta", "text"}
    shaped = {k: v for k, v in resource.items() if (k in keep if keep is not None else k != "text")}
    for name in elements or ():  # "restriction.period": that element of an object element
        parent, dot, child = name.partition(".")
        value = resource.get(parent)
        if dot and keep is not None and parent not in keep and isinstance(value, dict) and child in value:
            shaped[parent] = {**shaped.get(parent, {}), child: value[child]}
    # Every summary but false is a subset of the resource (search.html#summary), data included.
    if summary in ("text", "data") or keep is not None:
        meta = dict(shaped.get("meta", {}))
        meta["tag"] = [*meta.get("tag", []), SUBSETTED]
        shaped["meta"] = meta
    return shaped


SUBSETTED = {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}


def _summary_elements(resource_type: str) -> list[str]:
    from fhir_server.validation import model

    return model(resource_type).summary_elements_sequence()  # type: ignore[attr-defined, no-any-return]


def page_bundle(
    kind: str,
    base: str,
    path: str,
    params: list[tuple[str, str]],
    total: int | None,
    offset: int,
    count: int,
    entries: list[dict[str, Any]],
    more: bool | None = None,
) -> dict[str, Any]:
    """A searchset or history Bundle with self/first/previous/next links (http.html#paging).

    ``more``: whether a next page exists; if not given, it is worked out from the total or,
    without one, from a full page of entries.
    """

    def link(relation: str, at: int) -> dict[str, str]:
        query = [(k, v) for k, v in params if k not in ("_count", "_offset")]
        query += [("_count", str(count))] + ([("_offset", str(at))] if at else [])
        where = f"{base}/{path}" if path else base  # a system search's links are on [base] itself
        return {"relation": relation, "url": f"{where}?{urlencode(query)}"}

    links = [link("self", offset), link("first", 0)]
    if offset > 0:
        links.append(link("previous", max(offset - count, 0)))
    if more is None:
        more = offset + count < total if total is not None else len(entries) == count
    if more and count > 0:
        links.append(link("next", offset + count))
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "meta": {"lastUpdated": dates.instant(dates.now())},
        "type": kind,
    }
    if total is not None:
        bundle["total"] = total
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return bundle


def bundle(result: SearchResult, base: str) -> dict[str, Any]:
    query = result.query
    entries = [_entry(s, base, "match", query) for s in result.matches]
    entries += [_entry(s, base, "include", query) for s in result.included]
    if result.warnings:  # what the search left out (R4 search.html#errors: an entry of mode "outcome")
        issues = [Issue("too-costly", w, severity="warning") for w in result.warnings]
        entries.append({"resource": operation_outcome(issues), "search": {"mode": "outcome"}})
    return page_bundle(
        "searchset", base, query.resource_type, query.used, result.total, query.offset, query.count, entries,
        more=result.more,  # counted in matches: included entries do not fill a page
    )  # fmt: skip


def _entry(stored: Stored, base: str, mode: str, query: SearchQuery) -> dict[str, Any]:
    resource: Any = orjson.Fragment(stored.content or "{}")
    if query.summary or query.elements is not None:
        resource = shape(stored.resource, query.summary, query.elements)
    return {"fullUrl": f"{base}/{stored.type}/{stored.id}", "resource": resource, "search": {"mode": mode}}
