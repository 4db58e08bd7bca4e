"""search indexes: references by target, PostgreSQL prefix (pattern ops) and :contains (trigram)

- ``ix_idx_reference_target`` (target_id, target_type): ``_revinclude=*`` looks up what refers to
  the page's resources; no index led with the target, so it read the reference index whole.
- PostgreSQL: ``ix_idx_string_lookup`` and ``ix_idx_uri_lookup`` again with ``varchar_pattern_ops``
  on the prefix column: its ``LIKE 'x%'`` uses a B-tree only so, or under the C collation.
- PostgreSQL with pg_trgm available: the extension and ``ix_idx_string_contains``, a GIN trigram
  index of the whole normalised string, for ``:contains``. Without pg_trgm (postgresql-contrib)
  ``:contains`` reads every row of its parameter, as before.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 21:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The lookup indexes whose last column a prefix search reads.
PREFIXED = {"idx_string": ("ix_idx_string_lookup", "norm"), "idx_uri": ("ix_idx_uri_lookup", "value")}


def upgrade() -> None:
    op.create_index("ix_idx_reference_target", "idx_reference", ["target_id", "target_type"])
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, (name, column) in PREFIXED.items():
        op.drop_index(name, table_name=table)
        op.create_index(name, table, ["res_type", "param", column], postgresql_ops={column: "varchar_pattern_ops"})
    available = sa.text("SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm'")
    if op.get_bind().scalar(available):
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute("CREATE INDEX ix_idx_string_contains ON idx_string USING gin ((norm || norm_rest) gin_trgm_ops)")


def downgrade() -> None:
    op.drop_index("ix_idx_reference_target", table_name="idx_reference")
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS ix_idx_string_contains")
    for table, (name, column) in PREFIXED.items():
        op.drop_index(name, table_name=table)
        op.create_index(name, table, ["res_type", "param", column])
