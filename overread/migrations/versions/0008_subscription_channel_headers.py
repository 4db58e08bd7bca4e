"""subscription_header: Subscription.channel.header values, stored apart and served masked

A channel header (``Authorization: Bearer …``) is the receiver's credential: it is kept here and
every version of the Subscription holds ``Name: ***`` instead (docs/subscriptions.md). The
upgrade moves the values of the current Subscriptions here and masks every stored version.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 21:10:00
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CURRENT = sa.text("SELECT id, content FROM resource WHERE type = 'Subscription' AND content IS NOT NULL")
_VERSIONS = sa.text(
    "SELECT resource_pk, version, content FROM resource_version WHERE type = 'Subscription' AND content IS NOT NULL"
)


def upgrade() -> None:
    op.create_table(
        "subscription_header",
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("lines", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("subscription_id", name=op.f("pk_subscription_header")),
    )
    conn = op.get_bind()
    for sub_id, content in conn.execute(_CURRENT).all():
        if lines := _lines(content):
            conn.execute(
                sa.text("INSERT INTO subscription_header (subscription_id, lines) VALUES (:id, :lines)"),
                {"id": sub_id, "lines": json.dumps(lines)},
            )
            conn.execute(
                sa.text("UPDATE resource SET content = :content WHERE type = 'Subscription' AND id = :id"),
                {"id": sub_id, "content": _masked(content)},
            )
    for pk, version, content in conn.execute(_VERSIONS).all():
        if _lines(content):
            conn.execute(
                sa.text("UPDATE resource_version SET content = :content WHERE resource_pk = :pk AND version = :v"),
                {"pk": pk, "v": version, "content": _masked(content)},
            )


def downgrade() -> None:
    op.drop_table("subscription_header")  # the masked versions stay masked: the values are gone with it


def _lines(content: str) -> list[str]:
    return [str(line) for line in json.loads(content).get("channel", {}).get("header", [])]


def _masked(content: str) -> str:
    sub = json.loads(content)
    channel = sub["channel"]
    channel["header"] = [f"{str(line).partition(':')[0].strip()}: ***" for line in channel["header"]]
    return json.dumps(sub, separators=(",", ":"), ensure_ascii=False)
