"""The write path's hot statements, run on the driver's cursor (docs/performance.md).

SQLAlchemy Core builds an execution context around every execute, even of a statement it has
compiled and cached, which takes longer than SQLite takes to run the INSERT itself, and a create
runs five or more of them (resource, version, the index tables). Here a statement is compiled
once per dialect and set of parameter names, with its bind processors (SQLite's DATETIME as
text, for one), and run on the DBAPI cursor of the caller's connection: in the caller's
transaction, as Core would run it. A DBAPI error is raised as SQLAlchemy's (``IntegrityError``
…), as Core would raise it, so callers cannot tell the difference. On the event loop
(``fhir_server.executor_postgres``) the cursor is SQLAlchemy's adapter of asyncpg.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Connection, Insert
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import Executable

Row = dict[str, Any]


class Compiled:
    """One statement for one dialect and one set of parameter names."""

    def __init__(self, statement: Executable, dialect: Dialect, keys: Sequence[str]) -> None:
        if isinstance(statement, Insert):
            # Only a RETURNING the statement asks for: on PostgreSQL Core adds one of the primary
            # key to every INSERT (for ``inserted_primary_key``, which nothing here reads).
            statement = statement.inline()
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
        self.sql = str(compiled)
        processors: dict[str, Callable[[Any], Any]] = compiled._bind_processors  # no public name for them
        if compiled.positional:
            order = list(compiled.positiontup or ())
            self.params: Callable[[Row], Any] = lambda row: [
                processors[k](row[k]) if k in processors else row[k] for k in order
            ]
        else:
            self.params = lambda row: {k: processors[k](v) if k in processors else v for k, v in row.items()}


#: Keyed by the statement itself (kept alive, so its id is never reused) and the driver (psycopg and
#: asyncpg mark parameters differently): the write path's statements are module constants, a handful.
_CACHE: dict[tuple[Executable, str, tuple[str, ...]], Compiled] = {}


def _compiled(conn: Connection, statement: Executable, keys: tuple[str, ...]) -> Compiled:
    key = (statement, f"{conn.dialect.name}+{conn.dialect.driver}", keys)
    found = _CACHE.get(key)
    if found is None:
        found = _CACHE.setdefault(key, Compiled(statement, conn.dialect, keys))
    return found


def execute(conn: Connection, statement: Executable, row: Row) -> Any:
    """Run ``statement`` with ``row`` on ``conn``'s driver; the first row it returns (RETURNING), or None."""
    compiled = _compiled(conn, statement, tuple(row))

    def work(cursor: Any) -> Any:
        cursor.execute(compiled.sql, compiled.params(row))
        return cursor.fetchone() if cursor.description else None

    return _run(conn, compiled, work)


def executemany(conn: Connection, statement: Executable, rows: list[Row]) -> None:
    """Run ``statement`` once per row (the rows share their keys) on ``conn``'s driver."""
    compiled = _compiled(conn, statement, tuple(rows[0]))
    _run(conn, compiled, lambda cur: cur.executemany(compiled.sql, [compiled.params(row) for row in rows]))


def _run(conn: Connection, compiled: Compiled, work: Callable[[Any], Any]) -> Any:
    # The DBAPI connection: the driver's own, or on the event loop SQLAlchemy's adapter of asyncpg.
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        return work(cursor)
    except conn.dialect.loaded_dbapi.Error as error:
        # Core's own handler (it has no public name): SQLAlchemy's exception (``IntegrityError``
        # …) and, for a connection the server dropped (a PostgreSQL restart), the pool's
        # connections invalidated, so that one request fails and the next gets a live one.
        conn._handle_dbapi_exception(error, compiled.sql, None, cursor, None)
    finally:
        cursor.close()
