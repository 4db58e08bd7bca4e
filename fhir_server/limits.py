"""What the FHIR door accepts: bounds on requests, checked before work grows with them.

Each limit is answered with an OperationOutcome naming it (R4 http.html#2.21.0.4): 431 for the
headers (RFC 6585 §5), 413 for a body too large (RFC 9110 §15.5.14), 400 for JSON the server
cannot hold (nesting, NUL), 422 for an element or Bundle over its limit. docs/reliability.md
lists them with their defaults; ``overread.settings`` makes them configurable.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fhir_server.errors import FhirError, error

#: The largest integer a count, offset or version id may be: PostgreSQL's ``integer``, which
#: the version column is and what OFFSET is bound as, whatever the database.
MAX_INT = 2**31 - 1


@dataclass(frozen=True)
class Limits:
    #: Request header lines, and their bytes (names and values) together.
    max_headers: int = 100
    max_header_bytes: int = 64 * 1024
    #: Bytes of a request body, counted as it arrives.
    max_body_bytes: int = 16 * 1024 * 1024
    #: Levels of JSON objects and arrays: R4 resources nest a few dozen deep (an extension
    #: in an extension in a contained resource), a Bundle of them a few more.
    max_depth: int = 64
    #: Characters of one JSON string (an Attachment's base64 ``data`` is the longest there is).
    max_string: int = 8 * 1024 * 1024
    #: Entries of a batch or transaction Bundle.
    max_bundle_entries: int = 1000


#: The limits of what reaches the core by another way than the HTTP body (a patch inside a Binary).
DEFAULT = Limits()


def whole(name: str, value: str, maximum: int = MAX_INT) -> int:
    """``value`` as a non-negative integer in ASCII digits up to ``maximum``, else a 400 naming ``name``.

    ``str.isdigit`` alone also accepts digits ``int`` refuses ("²")."""
    if not (value.isascii() and value.isdigit()):
        raise error(400, "invalid", f"{name} must be a non-negative integer, not {value[:64]!r}", name)
    if len(value) > len(str(maximum)) or int(value) > maximum:
        raise error(400, "too-costly", f"{name} must be at most {maximum}", name)
    return int(value)


def version_id(vid: str) -> int:
    """A version id this server can have given (R4 http.html#vread); else the 404 of a vread of it."""
    try:
        return whole("_history", vid)
    except FhirError:
        raise error(404, "not-found", f"{vid[:64]!r} is not a version id") from None


def check_params(params: Iterable[tuple[str, str]]) -> None:
    """Query parameters the databases can compare: no NUL (PostgreSQL refuses it in text). How long
    a search value may be is a search limit (``fhir_server.search_limits``, ``max_value_length``)."""
    for name, value in params:
        if "\x00" in name or "\x00" in value:
            raise error(400, "invalid", f"The parameter {name[:64]!r} contains a NUL character", name[:64])


def check_json(value: Any, limits: Limits, what: str = "The body") -> None:
    """Refuse JSON the server cannot hold, in one walk before anything reads it: nested deeper
    than ``max_depth`` (400; every recursive reader after this is safe), a string or key with NUL
    (400: not a FHIR string, R4 datatypes.html#string, and refused by PostgreSQL's text), or a
    string over ``max_string`` characters (422)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_string(item, limits, what)
            continue
        if not isinstance(item, dict | list):
            continue
        if depth > limits.max_depth:
            raise error(400, "structure", f"{what} nests JSON deeper than {limits.max_depth} levels")
        if isinstance(item, dict):
            for key in item:
                _check_string(key, limits, what)
            children: Iterable[Any] = item.values()
        else:
            children = item
        stack.extend((child, depth + 1) for child in children if isinstance(child, str | dict | list))


def check_body(body: Any, limits: Limits) -> None:
    """``check_json``, and a Bundle's entries at most ``max_bundle_entries`` (413)."""
    check_json(body, limits)
    if isinstance(body, dict) and body.get("resourceType") == "Bundle":
        entries = body.get("entry")
        if isinstance(entries, list) and len(entries) > limits.max_bundle_entries:
            raise error(413, "too-costly", f"A Bundle may have at most {limits.max_bundle_entries} entries")


def _check_string(text: str, limits: Limits, what: str) -> None:
    if "\x00" in text:
        raise error(400, "invalid", f"{what} contains a NUL character (\\u0000), which no FHIR string may hold")
    if len(text) > limits.max_string:
        raise error(422, "too-long", f"{what} has a string over {limits.max_string} characters")
