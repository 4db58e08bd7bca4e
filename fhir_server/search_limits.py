"""The limits of a search: what one query string may ask of the database (docs/reliability.md).

A search's cost grows with its chains (each link a subquery per target type), its AND-ed
parameters and OR-ed values (SQLite refuses an expression tree deeper than 1,000; PostgreSQL
plans them all in memory), its sort keys (a correlated subquery each) and its includes. Each
such input is bounded here and refused with a 400 naming the limit before any of that work is
done (R4 search.html#errors: the server may refuse a search it will not run); what is bounded
only while running (the time, the included resources) is cut there.

Process-wide: ``overread.settings.Settings.search`` (``OVERREAD_SEARCH__<FIELD>``) sets them
at start-up through ``configure``.
"""

from pydantic import BaseModel, ConfigDict, Field

from fhir_server.errors import FhirError, error


class SearchLimits(BaseModel):
    """Each a bound on one input of a search; defaults well inside what SQLite and PostgreSQL run."""

    model_config = ConfigDict(frozen=True)

    #: Links of one chained parameter (``subject:Patient.organization.name`` has 2) plus nested ``_has``.
    max_chain_depth: int = Field(default=3, ge=1)
    #: Criteria of the whole search, once chains are expanded to each of their target types.
    max_terms: int = Field(default=100, ge=1)
    #: Comma-separated (OR-ed) values, summed over every criterion of the search.
    max_values: int = Field(default=500, ge=1)
    #: Characters of one search value (SQLite refuses a LIKE pattern over 50,000 bytes).
    max_value_length: int = Field(default=8192, ge=1)
    #: Keys of ``_sort``.
    max_sort_keys: int = Field(default=5, ge=1)
    #: The largest page: a larger ``_count`` is served as this one (R4 search.html#count allows fewer).
    max_count: int = Field(default=1000, ge=1)
    #: ``_include`` and ``_revinclude`` parameters of one search.
    max_includes: int = Field(default=10, ge=0)
    #: Rounds of ``:iterate`` after the first round of includes.
    max_iterate_depth: int = Field(default=3, ge=0)
    #: Included resources of one page; past it the Bundle says so in an OperationOutcome entry.
    max_included: int = Field(default=1000, ge=0)
    #: Seconds a search may take to plan and run before it is stopped (503, ``too-costly``).
    timeout: float = Field(default=10.0, ge=0)


_current = SearchLimits()


def limits() -> SearchLimits:
    """The limits in force."""
    return _current


def configure(chosen: SearchLimits) -> None:
    """Put ``chosen`` in force for every search of this process (at start-up)."""
    global _current
    _current = chosen


def exceeded(name: str, limit: int, what: str, *expression: str) -> FhirError:
    """The 400 of a search over one of its limits, naming the setting (``too-costly``: R4 IssueType)."""
    return error(400, "too-costly", f"{what}: more than {name}={limit}", *expression)
