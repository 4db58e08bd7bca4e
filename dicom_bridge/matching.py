"""C-FIND attribute matching, one matching key against one attribute (PS3.4 C.2.2.2).

Supported: universal matching of an empty key (C.2.2.2.3); single value matching (C.2.2.2.1),
case-insensitive for PN; wildcard matching with ``*`` and ``?`` for the string VRs (C.2.2.2.4);
UID list matching, backslash separated (C.2.2.2.2), and in general multiple value matching (C.2.2.2.8:
any query value against any stored value); range matching of DA, TM and DT (C.2.2.2.5:
``A-B``, ``A-``, ``-B``; DT ranges without UTC offsets). Sequence matching (C.2.2.2.6) is not
supported: a sequence key is a return key only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue

WILDCARD_VRS = frozenset({"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
NUMERIC_VRS = frozenset({"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"})
# How a partial DA/TM/DT value is completed: lower bounds and values with the first, upper bounds with
# the second (so "-12" on TM means up to 12:59:59.999999).
_PADDING = {
    "DA": ("00010101", "99991231"),
    "TM": ("000000.000000", "235959.999999"),
    "DT": ("00010101000000.000000", "99991231235959.999999"),
}


def values(element: DataElement | None) -> list[str]:
    """The element's values as strings, without padding; ``[]`` when absent or empty."""
    if element is None or element.VR == "SQ":
        return []
    value: Any = element.value
    items: Iterable[Any] = value if isinstance(value, MultiValue | list | tuple) else [value]
    found = [str(item).strip() for item in items if item is not None]
    return [item for item in found if item]


def matches(key: DataElement, attribute: DataElement | None) -> bool:
    """Whether ``attribute`` (None when the entity lacks it) satisfies the matching key ``key``."""
    wanted = values(key)
    if not wanted or key.VR == "SQ":
        return True  # universal matching (C.2.2.2.3); sequences are return keys only
    if key.VR in WILDCARD_VRS and all(set(query) == {"*"} for query in wanted):
        return True  # a value of "*" only is universal matching (C.2.2.2.4): even an absent attribute
    have = values(attribute)
    return any(match_value(key.VR, query, stored) for query in wanted for stored in have)


def match_value(vr: str, query: str, stored: str) -> bool:
    """One query value against one stored value of VR ``vr``."""
    if vr in _PADDING:
        return _match_temporal(vr, query, stored)
    if vr in NUMERIC_VRS:
        try:
            return float(query) == float(stored)
        except ValueError:
            return False
    if vr in WILDCARD_VRS and ("*" in query or "?" in query):
        return wildcard(query, ignore_case=vr == "PN").fullmatch(stored) is not None
    if vr == "PN":
        return query.casefold() == stored.casefold() or any(
            query.casefold() == group.casefold() for group in stored.split("=")
        )
    return query == stored


def wildcard(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """A regular expression for a C.2.2.2.4 pattern: ``*`` any run of characters, ``?`` exactly one."""
    body = "".join(".*" if char == "*" else "." if char == "?" else re.escape(char) for char in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _match_temporal(vr: str, query: str, stored: str) -> bool:
    low, high = _PADDING[vr]
    value = _normalise(vr, stored)
    if not value:
        return False
    if "-" not in query:
        return _pad(value, low) == _pad(_normalise(vr, query), low)
    start, _, end = query.partition("-")
    start, end = _normalise(vr, start), _normalise(vr, end)
    if start and _pad(value, low) < _pad(start, low):
        return False
    return not (end and _pad(value, low) > _pad(end, high))


def _normalise(vr: str, value: str) -> str:
    """Drop the ACR-NEMA separators ("2004.01.19", "07:27:30") and, for DT, a UTC offset."""
    value = value.strip()
    if vr == "DT":
        value = re.split(r"[+-]", value, maxsplit=1)[0]
    return value.replace(":", "") if vr == "TM" else value.replace(".", "") if vr == "DA" else value


def _pad(value: str, padding: str) -> str:
    return value + padding[len(value) :] if len(value) < len(padding) else value


__all__ = ["match_value", "matches", "values", "wildcard"]
