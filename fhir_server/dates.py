"""FHIR date, dateTime and instant values as UTC ranges.

A partial value stands for the whole interval it names (R4 §3.1.1.5.4 "date": "2013-01"
is all of January 2013); the index and the search both compare such intervals.
"""

import re
from calendar import monthrange
from datetime import UTC, datetime, timedelta

_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?P<f>\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
MIN = datetime(1, 1, 1)
MAX = datetime(9999, 12, 31, 23, 59, 59, 999999)


def parse_range(value: str) -> tuple[datetime, datetime]:
    """The naive-UTC [low, high] interval a FHIR date/dateTime/instant denotes."""
    m = _DATE.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a FHIR date, dateTime or instant")
    y, mo, d = int(m["y"]), int(m["m"] or 1), int(m["d"] or 1)
    if m["m"] is None:
        return datetime(y, 1, 1), datetime(y, 12, 31, 23, 59, 59, 999999)
    if m["d"] is None:
        last = monthrange(y, mo)[1]
        return datetime(y, mo, 1), datetime(y, mo, last, 23, 59, 59, 999999)
    if m["H"] is None:
        start = datetime(y, mo, d)
        return start, start + timedelta(days=1, microseconds=-1)
    start = datetime(y, mo, d, int(m["H"]), int(m["M"]), int(m["S"] or 0))
    tz = m["tz"]
    if tz and tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        start = shifted(start, -sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
    if m["f"]:
        at = shifted(start, timedelta(microseconds=int((m["f"][1:] + "000000")[:6])))
        return at, at
    span = timedelta(seconds=1) if m["S"] else timedelta(minutes=1)
    return start, shifted(start, span - timedelta(microseconds=1))


def shifted(t: datetime, delta: timedelta) -> datetime:
    """``t + delta``, clamped to [MIN, MAX]: a valid dateTime whose zone puts its UTC instant
    before year 1 or after 9999 (9999-12-31T23:30:00-05:00, R4 datatypes.html#dateTime allows
    any zone) is as early or late as the index can say."""
    try:
        return t + delta
    except OverflowError:
        return MIN if delta < timedelta(0) else MAX


def approximately(low: datetime, high: datetime, now: datetime) -> tuple[datetime, datetime]:
    """The range the ``ap`` prefix matches around [low, high]: within 10% of the distance from
    now, and at least a day (R4 search.html#prefix), clamped to the calendar."""
    margin = max(abs(now - low) / 10, timedelta(days=1))
    return shifted(low, -margin), shifted(high, margin)


def now() -> datetime:
    """Naive UTC now, at the millisecond precision meta.lastUpdated is written with."""
    t = datetime.now(UTC).replace(tzinfo=None)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


def instant(t: datetime) -> str:
    """A naive UTC datetime as a FHIR instant, e.g. 2026-11-28T15:30:00.123+00:00."""
    return t.isoformat(timespec="milliseconds") + "+00:00"


def http_date(t: datetime) -> str:
    """RFC 9110 IMF-fixdate, for Last-Modified."""
    return t.replace(tzinfo=UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
