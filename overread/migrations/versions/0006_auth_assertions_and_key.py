"""auth: used client-assertion jti values and the access tokens' signing secret

SMART Backend Services (docs/security.md): a client assertion's ``jti`` is refused when it was
used before within its lifetime, by any server process; the access tokens every process verifies
are signed with one secret kept here.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 20:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "auth_assertion",
        sa.Column("client_id", sa.String(length=255), nullable=False),
        sa.Column("jti", sa.String(length=255), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", "jti", name=op.f("pk_auth_assertion")),
    )
    op.create_index(op.f("ix_auth_assertion_expires_at"), "auth_assertion", ["expires_at"], unique=False)
    op.create_table(
        "auth_key",
        sa.Column("kid", sa.String(length=16), nullable=False),
        sa.Column("secret", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("kid", name=op.f("pk_auth_key")),
    )


def downgrade() -> None:
    op.drop_table("auth_key")
    op.drop_index(op.f("ix_auth_assertion_expires_at"), table_name="auth_assertion")
    op.drop_table("auth_assertion")
