"""What the token endpoint keeps in the database, so that every server process agrees.

``auth_assertion``: each client assertion's ``jti`` until the assertion expires (SMART App Launch
2.x Backend Services, "the jti ... SHALL not be reused within its lifetime"); the primary key, not a
lookup, refuses a replay, also one that races in another process. ``auth_key``: the secret the
access tokens are signed with, made by the first process that needs it and read by the others.
"""

import secrets
from datetime import datetime

from sqlalchemy import Connection, DateTime, LargeBinary, String, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from fhir_server.schema import Base

KEY_ID = "1"


class UsedAssertion(Base):
    __tablename__ = "auth_assertion"

    client_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    jti: Mapped[str] = mapped_column(String(255), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True)


class SigningKey(Base):
    __tablename__ = "auth_key"

    kid: Mapped[str] = mapped_column(String(16), primary_key=True)
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime)


def spend(conn: Connection, client_id: str, jti: str, expires_at: datetime, now: datetime) -> bool:
    """Record an assertion's ``jti``: False if the client used it before (a replay). Expired ones are
    forgotten first: their assertions are refused for their ``exp`` anyway."""
    conn.execute(delete(UsedAssertion).where(UsedAssertion.expires_at < now))
    try:
        with conn.begin_nested():
            conn.execute(insert(UsedAssertion).values(client_id=client_id, jti=jti, expires_at=expires_at))
    except IntegrityError:
        return False
    return True


def signing_secret(conn: Connection, now: datetime) -> bytes:
    """The access tokens' HMAC secret: the stored one, or a new one stored by whichever process comes first."""
    found = conn.scalar(select(SigningKey.secret).where(SigningKey.kid == KEY_ID))
    if found is not None:
        return found
    try:
        with conn.begin_nested():
            conn.execute(insert(SigningKey).values(kid=KEY_ID, secret=secrets.token_bytes(32), created_at=now))
    except IntegrityError:
        pass  # another process stored its own first: that one is the secret
    return conn.execute(select(SigningKey.secret).where(SigningKey.kid == KEY_ID)).scalar_one()
