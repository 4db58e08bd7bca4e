"""The write path's hot statements, run on the driver's cursor (docs/performance.md).

SQLAlchemy Core builds an execution context around every execute, even of a statement it has
compiled and cached: about 40 µs, more than SQLite takes to run the INSERT itself, and a create
runs five or more of them (resource, version, the index tables). Here a statement is compiled
once per dialect and set of parameter names, with its bind processors (SQLite's DATETIME as
text, for one), and run on the DBAPI cursor of the caller's connection: in the caller's
transaction, as Core would run it. A DBAPI error is raised as SQLAlchemy's (``IntegrityError``
…), as Core would raise it, so callers cannot tell the difference. On PostgreSQL with psycopg,
:func:`pipeline` sends statements that return nothing in one round trip. On the event loop
(``fhir_server.async_units``) the cursor is SQLAlchemy's adapter of asyncpg.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cache
from typing import Any, NoReturn

import orjson
from sqlalchemy import Connection, Insert, Table, TextClause, insert, text
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.expression import Executable

Row = dict[str, Any]


class Compiled:
    """One statement for one dialect and one set of parameter names."""

    def __init__(self, statement: Executable, dialect: Dialect, keys: Sequence[str]) -> None:
        if isinstance(statement, Insert):
            # Only a RETURNING the statement asks for: on PostgreSQL Core adds one of the primary
            # key to every INSERT (for ``inserted_primary_key``, which nothing here reads), and an
            # index row's then cost PostgreSQL a result and the pipeline a fetch per row.
            statement = statement.inline()
        compiled = statement.compile(dialect=dialect, column_keys=list(keys))  # type: ignore[attr-defined]
        self.sql = str(compiled)
        # Asked of the statement, not the cursor: in a pipeline the cursor knows only once synced.
        self.returns_rows = statement.is_select or bool(compiled.effective_returning)
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
        return cursor.fetchone() if compiled.returns_rows else None

    return _run(conn, compiled, work)


def insert_rows(conn: Connection, table: Table, rows: list[Row]) -> None:
    """INSERT ``rows`` (which share their keys) into ``table`` on ``conn``'s driver.

    SQLite runs the INSERT once per row (``executemany``). PostgreSQL gets one statement with
    the rows as one JSON parameter (``json_populate_recordset``): in a pipeline psycopg sends an
    executemany row by row and waits on the socket after each, and dumping each column as an
    array (``unnest``) cost as much again in Python; orjson writes the lot in microseconds.
    """
    keys = tuple(rows[0])
    if conn.dialect.name != "postgresql":
        compiled = _compiled(conn, _insert(table), keys)
        _run(conn, compiled, lambda cur: cur.executemany(compiled.sql, [compiled.params(row) for row in rows]))
        return
    execute(conn, _json_insert(table, keys), {"rows": orjson.dumps(rows).decode()})


@cache
def _insert(table: Table) -> Insert:
    return insert(table)


@cache
def _json_insert(table: Table, keys: tuple[str, ...]) -> TextClause:
    columns = ", ".join(table.c[key].name for key in keys)  # KeyError for a key that is no column
    return text(
        f"INSERT INTO {table.name} ({columns}) SELECT {columns} "
        f"FROM json_populate_recordset(NULL::{table.name}, CAST(:rows AS json))"
    )


@contextmanager
def pipeline(conn: Connection) -> Iterator[None]:
    """The statements run inside, none of which returns rows, go to PostgreSQL in one round trip
    (a psycopg pipeline) instead of one each; on SQLite, which has no round trips, they just run."""
    if conn.dialect.driver != "psycopg":  # SQLite has no round trips; SQLAlchemy's asyncpg adapter no pipeline
        yield
        return
    try:
        with conn.connection.driver_connection.pipeline():  # type: ignore[union-attr]
            yield
    except conn.dialect.loaded_dbapi.Error as error:  # raised at the pipeline's sync, after its statement
        _failed(conn, error, "(pipeline)", None)


def _run(conn: Connection, compiled: Compiled, work: Callable[[Any], Any]) -> Any:
    # The DBAPI connection: the driver's own, or on the event loop SQLAlchemy's adapter of asyncpg.
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        return work(cursor)
    except conn.dialect.loaded_dbapi.Error as error:
        _failed(conn, error, compiled.sql, cursor)
    finally:
        cursor.close()


def _failed(conn: Connection, error: Exception, sql: str, cursor: Any) -> NoReturn:
    """Raise ``error`` as Core would: SQLAlchemy's exception (``IntegrityError`` …), and for a
    connection the server dropped (a PostgreSQL restart) the pool's connections invalidated, so
    that one request fails and the next gets a live one. Core's own handler does both; it has no
    public name."""
    conn._handle_dbapi_exception(error, sql, None, cursor, None)
