"""Conditional interactions' criteria (R4 http.html#ccreate, #cond-update, #cdelete, #trules)."""

import urllib.parse
from collections.abc import Iterable
from datetime import datetime
from functools import cache
from typing import Any

from sqlalchemy import Select, and_, bindparam, false, or_, select

from fhir_server import limits, search
from fhir_server.errors import error
from fhir_server.indexing import split
from fhir_server.repository import Repository, Stored
from fhir_server.schema import ResourceRow, TokenIndex
from fhir_server.search_params import registry
from fhir_server.validation import SUPPORTED_TYPES

#: Matches a conditional interaction looks at: more than one is an error, so a few suffice.
LIMIT = 3
#: Criteria per statement (one prepared statement per count up to this).
CHUNK = 32
#: ``(resource type, parameter, system, code)``: criteria that are one ``token=system|code``.
TokenKey = tuple[str, str, str, str]


def parse_qsl(query_string: str) -> list[tuple[str, str]]:
    """The parameters of criteria or an entry's URL, as the databases can compare them (``limits.check_params``)."""
    params = urllib.parse.parse_qsl(query_string.lstrip("?"), keep_blank_values=True)
    limits.check_params(params)
    return params


def criteria_key(rtype: str, query_string: str) -> str:
    """The lock key of conditional criteria: one key however the criteria are encoded or ordered."""
    return f"{rtype}?{urllib.parse.urlencode(sorted(parse_qsl(query_string)))}"


def matches(repo: Repository, rtype: str, query_string: str) -> list[Stored]:
    """Resources matching a conditional interaction's criteria, under a lock on them.

    The lock is held until the transaction ends, so two requests deciding on the same
    criteria (32 identical conditional creates) run one after the other: one creates,
    the others find what it created.
    """
    params = parse_qsl(query_string)
    if not params:
        raise error(400, "invalid", "A conditional interaction needs search criteria")
    repo.lock(criteria_key(rtype, query_string))
    token = _token_key(rtype, params)
    if token is not None:
        return _lookup(repo, [token])[token]
    query = search.parse(rtype, params, strict=True, base=repo.base)
    query.count, query.total = LIMIT, "none"
    return search.execute(repo.conn, query).matches


def prefetch(repo: Repository, criteria: Iterable[tuple[str, str]]) -> dict[tuple[str, str], list[Stored]]:
    """The matches of many ``(type, query string)`` criteria at once, for a caller that holds their locks.

    Only criteria that are one token ``system|code`` (``identifier=urn:oid:1.2|MRN-1``, what
    conditional creates on identifiers say) are looked up, all in one indexed query, with
    what the search would answer: current resources of the type with such a token, by pk.
    Any other criteria are left out: the caller runs ``matches`` for them (and gets its errors).
    The caller must already hold each criteria's lock (``Repository.lock_all`` on
    ``criteria_key``), as a transaction Bundle does before it matches anything.
    """
    keys: dict[tuple[str, str], TokenKey] = {}
    for rtype, query_string in criteria:
        token = _token_key(rtype, parse_qsl(query_string))
        if token is not None:
            keys[(rtype, query_string)] = token
    if not keys:
        return {}
    found = _lookup(repo, list(dict.fromkeys(keys.values())))
    return {criteria: found[token] for criteria, token in keys.items()}


def _token_key(rtype: str, params: list[tuple[str, str]]) -> TokenKey | None:
    """``(type, param, system, code)`` when the criteria are one ``token=system|code``, else None."""
    if len(params) != 1 or rtype not in SUPPORTED_TYPES:
        return None
    name, value = params[0]
    param = registry()[rtype].get(name)
    if param is None or param.type != "token" or not param.expression or "," in value or "\\" in value:
        return None  # modifiers, chains, _id, several values, escapes: the search's to parse
    system, bar, code = value.partition("|")
    if not bar or not system or not code:
        return None  # "code", "|code" (no system) and "system|" mean other things
    return rtype, name, system, code


def _lookup(repo: Repository, keys: list[TokenKey]) -> dict[TokenKey, list[Stored]]:
    found: dict[TokenKey, list[Stored]] = {key: [] for key in keys}
    seen: set[tuple[TokenKey, int]] = set()
    for start in range(0, len(keys), CHUNK):
        chunk = keys[start : start + CHUNK]
        params: dict[str, Any] = {}
        for i, (rtype, param, system, code) in enumerate(chunk):
            (s, s_rest), (c, c_rest) = split(system), split(code)
            params.update({f"t{i}": rtype, f"p{i}": param, f"s{i}": s, f"sr{i}": s_rest, f"c{i}": c, f"cr{i}": c_rest})
        for row in repo.conn.execute(_statement(len(chunk)), params):
            key = (row.res_type, row.param, (row.system or "") + row.system_rest, (row.code or "") + row.code_rest)
            if key in found and (key, row.pk) not in seen and len(found[key]) < LIMIT:
                seen.add((key, row.pk))
                found[key].append(Stored(row.res_type, row.id, row.version, row.last_updated, row.content))
    return found


@cache
def _statement(n: int) -> Select[str, str, str | None, str, str | None, str, int, str, int, datetime, str | None]:
    """Resources with any of ``n`` tokens (bound as t0, p0, s0, sr0, c0, cr0, t1 ...: ``split`` values), and
    which token, by pk."""
    t, r = TokenIndex, ResourceRow
    columns = (t.res_type, t.param, t.system, t.system_rest, t.code, t.code_rest)
    return (
        select(*columns, r.pk, r.id, r.version, r.last_updated, r.content)
        .join_from(t, r, r.pk == t.resource_pk)
        .where(
            r.deleted == false(),
            or_(
                *(
                    and_(
                        t.res_type == bindparam(f"t{i}"),
                        t.param == bindparam(f"p{i}"),
                        t.code == bindparam(f"c{i}"),
                        t.code_rest == bindparam(f"cr{i}"),
                        t.system == bindparam(f"s{i}"),
                        t.system_rest == bindparam(f"sr{i}"),
                    )
                    for i in range(n)
                )
            ),
        )
        .order_by(r.pk)
    )
