"""search index: string, token and URI values kept whole; absolute reference URLs unbounded

A value's first 255 characters (512 of a URI) stay in the indexed column, the rest goes to a
new ``…_rest`` column ("" for shorter values), so searches compare the whole value. Rows cut
before are rebuilt from their resource's stored JSON: those whose key column is full.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 20:40:00
"""

from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: Each table's key columns, their length, and the rest column each gains.
WHOLE = {
    "idx_token": (255, {"system": "system_rest", "code": "code_rest"}),
    "idx_string": (255, {"value": "value_rest", "norm": "norm_rest"}),
    "idx_uri": (512, {"value": "value_rest"}),
}


def upgrade() -> None:
    for name, (_, keys) in WHOLE.items():
        with op.batch_alter_table(name, schema=None) as batch_op:
            for rest in keys.values():
                batch_op.add_column(sa.Column(rest, sa.Text(), server_default="", nullable=False))
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.alter_column("url", existing_type=sa.String(length=512), type_=sa.Text(), existing_nullable=True)
    _reindex_cut_rows()


def _reindex_cut_rows() -> None:
    """Index again, with today's indexer, the string, token and URI rows of each resource that has a
    value as long as its key column (it may have been cut): no other way leads back to the cut text."""
    from fhir_server.indexing import index_rows  # FHIRPath evaluation cannot be written out here

    conn = op.get_bind()
    tables = {
        name: sa.table(name, *(sa.column(c) for c in ("resource_pk", "res_type", "param", *keys, *keys.values())))
        for name, (_, keys) in WHOLE.items()
    }
    full = sa.union(
        *(
            sa.select(table.c.resource_pk).where(sa.or_(*(sa.func.length(table.c[k]) == length for k in keys)))
            for (length, keys), table in zip(WHOLE.values(), tables.values(), strict=True)
        )
    ).subquery()
    resource = sa.table("resource", sa.column("pk"), sa.column("type"), sa.column("content"))
    cut = sa.select(resource.c.pk, resource.c.type, resource.c.content).where(
        resource.c.pk.in_(sa.select(full.c.resource_pk)), resource.c.content.is_not(None)
    )
    for pk, rtype, content in conn.execute(cut).all():
        for table in tables.values():
            conn.execute(sa.delete(table).where(table.c.resource_pk == pk))
        for model, values in index_rows(rtype, orjson.loads(content)):
            if model.__tablename__ in tables:
                conn.execute(sa.insert(tables[model.__tablename__]).values(resource_pk=pk, res_type=rtype, **values))


def downgrade() -> None:
    # The old columns hold the first 255 (512) characters already; a longer reference URL is cut.
    reference = sa.table("idx_reference", sa.column("url", sa.Text()))
    op.execute(sa.update(reference).values(url=sa.func.substr(reference.c.url, 1, 512)))
    with op.batch_alter_table("idx_reference", schema=None) as batch_op:
        batch_op.alter_column("url", existing_type=sa.Text(), type_=sa.String(length=512), existing_nullable=True)
    for name, (_, keys) in WHOLE.items():
        with op.batch_alter_table(name, schema=None) as batch_op:
            for rest in keys.values():
                batch_op.drop_column(rest)
