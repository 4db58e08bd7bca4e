"""Subscription.channel.header values are write-only: stored here, used, never served.

A header such as ``Authorization: Bearer …`` is a credential of the receiver's. The repository
hook (``fhir_server.subscriptions``) stores each line whole in ``subscription_header`` and writes
the Subscription with the value masked, ``Name: ***``; so every read of it (read, vread, search,
``_include``, history, a write's answer) shows the header's name only. A write that sends
``Name: ***`` back keeps the stored value of that name; the notifier sends the stored lines.
"""

import orjson
from sqlalchemy import Connection, String, Text, delete, insert, select
from sqlalchemy.orm import Mapped, mapped_column

from fhir_server.errors import error
from fhir_server.schema import Base

MASK = "***"


class ChannelHeaders(Base):
    __tablename__ = "subscription_header"

    subscription_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The channel.header lines as written, a JSON array.
    lines: Mapped[str] = mapped_column(Text)


def masked(line: str) -> str:
    return f"{_name(line)}: {MASK}"


def stored(conn: Connection, subscription_id: str) -> dict[str, str]:
    """The stored lines of a Subscription, by header name (case-insensitive, RFC 9110 §5.1)."""
    found = conn.scalar(select(ChannelHeaders.lines).where(ChannelHeaders.subscription_id == subscription_id))
    return {_name(line).lower(): line for line in orjson.loads(found or "[]")}


def unmasked(lines: list[str], kept: dict[str, str]) -> list[str]:
    """``lines`` with each masked value replaced by the kept line of its name; 422 when there is none."""
    whole = []
    for line in lines:
        if line.partition(":")[2].strip() != MASK:
            whole.append(line)
        elif (known := kept.get(_name(line).lower())) is not None:
            whole.append(known)
        else:
            raise error(
                422,
                "invalid",
                f"Subscription.channel.header {line!r} keeps a value never given",
                "Subscription.channel.header",
            )
    return whole


def keep(conn: Connection, subscription_id: str, lines: list[str]) -> None:
    """Store ``lines`` (whole) as the Subscription's; none: forget them."""
    conn.execute(delete(ChannelHeaders).where(ChannelHeaders.subscription_id == subscription_id))
    if lines:
        conn.execute(insert(ChannelHeaders).values(subscription_id=subscription_id, lines=orjson.dumps(lines).decode()))


def _name(line: str) -> str:
    return line.partition(":")[0].strip()
