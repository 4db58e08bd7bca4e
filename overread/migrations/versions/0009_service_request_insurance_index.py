"""index ServiceRequest.insurance (Overread's search parameter ``insurance``)

The insurer's compartment (docs/security.md, "Roles") follows ServiceRequest.insurance to the
Coverage and its payor; orders stored before the parameter existed get its index rows here.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 21:20:00
"""

from collections.abc import Sequence

import orjson
import sqlalchemy as sa
from alembic import op

from fhir_server.indexing import index_rows
from fhir_server.schema import ReferenceIndex, ResourceRow

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PARAM = "insurance"


def upgrade() -> None:
    conn = op.get_bind()
    r = ResourceRow.__table__.c
    orders = conn.execute(
        sa.select(r.pk, r.content).where(r.type == "ServiceRequest", r.deleted == sa.false(), r.content.is_not(None))
    )
    rows = [
        {**values, "resource_pk": pk, "res_type": "ServiceRequest"}
        for pk, content in orders
        for table, values in index_rows("ServiceRequest", orjson.loads(content))
        if table is ReferenceIndex and values["param"] == PARAM
    ]
    if rows:
        conn.execute(sa.insert(ReferenceIndex), rows)


def downgrade() -> None:
    i = ReferenceIndex.__table__.c
    op.execute(sa.delete(ReferenceIndex).where(i.res_type == "ServiceRequest", i.param == PARAM))
