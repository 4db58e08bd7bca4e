"""hl7 outbound: failed rows carry no message (control_id and raw nullable)

A result that cannot become an ORU^R01 is kept as a ``failed`` row with its reason
(docs/delivery.md), and no message was made: no MSH-10, no raw text.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 17:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("hl7_outbound", schema=None) as batch_op:
        batch_op.alter_column("control_id", existing_type=sa.String(length=20), nullable=True)
        batch_op.alter_column("raw", existing_type=sa.LargeBinary(), nullable=True)


def downgrade() -> None:
    # The old schema cannot hold a row without a message: the failed rows go.
    op.execute("DELETE FROM hl7_outbound WHERE raw IS NULL OR control_id IS NULL")
    with op.batch_alter_table("hl7_outbound", schema=None) as batch_op:
        batch_op.alter_column("raw", existing_type=sa.LargeBinary(), nullable=False)
        batch_op.alter_column("control_id", existing_type=sa.String(length=20), nullable=False)
