"""Tables of the FHIR store.

``resource`` holds the current version of each resource (its JSON served as stored),
``resource_version`` every version for vread and history, the ``idx_*`` tables the
search index of the current version, and ``outbox`` the work other components must do
because of a write (written in the same transaction as the write).

A string, token or URI value of the index is kept whole in two columns: its first ``KEY``
(``URI_KEY``) characters in the column the B-tree indexes, and the rest (``…_rest``, "" for
most values) beside it. A lookup compares both, so it stays indexed while a value past the
key is compared whole; the key is bounded because PostgreSQL refuses a B-tree entry over
about 2,700 bytes.

On PostgreSQL the key columns a prefix search reads (``norm``, a URI's ``value``) are indexed with
``varchar_pattern_ops``: its ``LIKE 'x%'`` uses a B-tree only so, or under the C collation
(indexes-opclass.html); the same index answers ``=``. ``:contains`` reads a trigram index
(pg_trgm) of the whole normalised string. Migration ``0010`` creates both.
"""

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Characters of a string or token value (of a URI value) in its indexed column.
KEY, URI_KEY = 255, 512

# BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY.
PK = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ResourceRow(Base):
    __tablename__ = "resource"
    __table_args__ = (
        UniqueConstraint("type", "id"),
        Index("ix_resource_type_last_updated", "type", "last_updated"),
    )

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(64))
    id: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    last_updated: Mapped[datetime] = mapped_column(DateTime)
    deleted: Mapped[bool] = mapped_column(Boolean, default=False)
    #: The current version's JSON, with id and meta; None once deleted.
    content: Mapped[str | None] = mapped_column(Text)


class VersionRow(Base):
    __tablename__ = "resource_version"
    __table_args__ = (
        Index("ix_resource_version_last_updated", "last_updated"),
        Index("ix_resource_version_type_last_updated", "type", "last_updated"),
    )

    resource_pk: Mapped[int] = mapped_column(ForeignKey("resource.pk", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    id: Mapped[str] = mapped_column(String(64))
    last_updated: Mapped[datetime] = mapped_column(DateTime)
    method: Mapped[str] = mapped_column(String(8))  # POST, PUT or DELETE
    content: Mapped[str | None] = mapped_column(Text)


class _IndexMixin:
    row: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    resource_pk: Mapped[int] = mapped_column(ForeignKey("resource.pk", ondelete="CASCADE"), index=True)
    res_type: Mapped[str] = mapped_column(String(64))
    param: Mapped[str] = mapped_column(String(64))


class TokenIndex(_IndexMixin, Base):
    __tablename__ = "idx_token"
    __table_args__ = (Index("ix_idx_token_lookup", "res_type", "param", "code", "system"),)
    system: Mapped[str | None] = mapped_column(String(KEY))
    system_rest: Mapped[str] = mapped_column(Text, server_default="")
    code: Mapped[str | None] = mapped_column(String(KEY))
    code_rest: Mapped[str] = mapped_column(Text, server_default="")


class StringIndex(_IndexMixin, Base):
    __tablename__ = "idx_string"
    __table_args__ = (
        Index("ix_idx_string_lookup", "res_type", "param", "norm", postgresql_ops={"norm": "varchar_pattern_ops"}),
    )
    value: Mapped[str] = mapped_column(String(KEY))
    value_rest: Mapped[str] = mapped_column(Text, server_default="")
    #: Case-folded, accents removed: what the default and :contains searches compare.
    norm: Mapped[str] = mapped_column(String(KEY))
    norm_rest: Mapped[str] = mapped_column(Text, server_default="")


# ``:contains`` on PostgreSQL: trigrams of the whole normalised value (pg_trgm, a GIN index).
Index(
    "ix_idx_string_contains",
    (StringIndex.norm + StringIndex.norm_rest).label("norm_whole"),
    postgresql_using="gin",
    postgresql_ops={"norm_whole": "gin_trgm_ops"},
).ddl_if(dialect="postgresql")


class ReferenceIndex(_IndexMixin, Base):
    __tablename__ = "idx_reference"
    __table_args__ = (
        Index("ix_idx_reference_lookup", "res_type", "param", "target_id", "target_type"),
        # What refers to these resources, from any type by any parameter (``_revinclude=*``).
        Index("ix_idx_reference_target", "target_id", "target_type"),
    )
    target_type: Mapped[str | None] = mapped_column(String(64))
    target_id: Mapped[str | None] = mapped_column(String(64))
    #: Absolute or canonical URL when the reference is not to a resource of this server (not indexed).
    url: Mapped[str | None] = mapped_column(Text)


class DateIndex(_IndexMixin, Base):
    __tablename__ = "idx_date"
    __table_args__ = (Index("ix_idx_date_lookup", "res_type", "param", "low", "high"),)
    low: Mapped[datetime] = mapped_column(DateTime)
    high: Mapped[datetime] = mapped_column(DateTime)


class NumberIndex(_IndexMixin, Base):
    __tablename__ = "idx_number"
    __table_args__ = (Index("ix_idx_number_lookup", "res_type", "param", "value"),)
    value: Mapped[float] = mapped_column(Float)


class UriIndex(_IndexMixin, Base):
    __tablename__ = "idx_uri"
    __table_args__ = (
        Index("ix_idx_uri_lookup", "res_type", "param", "value", postgresql_ops={"value": "varchar_pattern_ops"}),
    )
    value: Mapped[str] = mapped_column(String(URI_KEY))
    value_rest: Mapped[str] = mapped_column(Text, server_default="")


class QuantityIndex(_IndexMixin, Base):
    __tablename__ = "idx_quantity"
    __table_args__ = (Index("ix_idx_quantity_lookup", "res_type", "param", "value"),)
    value: Mapped[float] = mapped_column(Float)
    system: Mapped[str | None] = mapped_column(String(255))
    code: Mapped[str | None] = mapped_column(String(255))


class OutboxRow(Base):
    """Work caused by a write, claimed by workers (``FOR UPDATE SKIP LOCKED`` on PostgreSQL)."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_due", "topic", "status", "available_at"),)

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    topic: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    resource_version: Mapped[int] = mapped_column(Integer)
    payload: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending, done, dead
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    available_at: Mapped[datetime] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


INDEX_TABLES = (TokenIndex, StringIndex, ReferenceIndex, DateIndex, NumberIndex, UriIndex, QuantityIndex)
