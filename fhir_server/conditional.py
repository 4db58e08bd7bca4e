"""Conditional interactions' criteria (R4 http.html#ccreate, #cond-update, #cdelete, #trules)."""

import urllib.parse

from fhir_server import search
from fhir_server.errors import error
from fhir_server.repository import Repository, Stored


def parse_qsl(query_string: str) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(query_string.lstrip("?"), keep_blank_values=True)


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
    query = search.parse(rtype, params, strict=True)
    query.count, query.total = 3, "none"
    return search.execute(repo.conn, query).matches
