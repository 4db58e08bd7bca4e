"""Preloading the store through the repository write path, fast.

Every resource is written by ``Repository(session).create(resource, id)`` (validate →
hooks → write → index) in big transactions, in worker processes (one per core), so the
rows of the store are exactly what the server's own write path makes.

Two loaders:

``sharded`` (default) — each worker writes its share into a scratch SQLite file of its
    own (migrated with the project's migrations), so the workers never wait on each
    other's locks; the shards' rows are then copied into the target database in bulk
    (``INSERT … SELECT`` through ``ATTACH`` on SQLite, ``COPY`` on PostgreSQL), with the
    resource primary keys shifted past those already there.
``direct`` — the workers write straight into the target database (several at once on
    PostgreSQL, one on SQLite, whose writers take turns anyway). Slower; a cross-check.

With ``reuse`` the shards are kept in a cache directory, keyed by a digest of the data
generator, ``fhir_server/`` and ``conformance/``, so a later run merges them again
instead of re-creating them; a change to any of those files makes new shards.
"""

import hashlib
import multiprocessing as mp
import os
import queue
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Integer, Table, make_url

from bench import data

ROOT = Path(__file__).resolve().parent.parent
BATCH = 2_000  # resources per transaction
Progress = Callable[[int], None]


# -- producing rows with the repository ------------------------------------------------


def _worker(url: str, start: int, stop: int, migrate: bool, progress: Any) -> None:
    """Create resources ``start`` ≤ n < ``stop`` with ``Repository.create`` into ``url``."""
    from fhir_server.db import Database
    from fhir_server.repository import Repository
    from fhir_server.search_params import registry
    from overread.migrate import upgrade

    db = Database(url)
    if migrate:
        upgrade(db.engine)
    registry()  # compile the search parameters before the clock of the first batch starts
    for batch_start in range(start, stop, BATCH):
        batch_stop = min(batch_start + BATCH, stop)
        with db.transaction() as session:
            repo = Repository(session)
            for done, (rid, resource) in enumerate(data.resources(batch_start, batch_stop), 1):
                repo.create(resource, rid)
                if done % 250 == 0:
                    progress.put(250)
        progress.put((batch_stop - batch_start) % 250)
    if db.engine.dialect.name == "sqlite":
        with db.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    db.dispose()


def _run_workers(jobs: list[tuple[str, int, int, bool]], progress: Progress) -> None:
    ctx = mp.get_context("spawn")  # no inherited engines or connections
    counter = ctx.Queue()
    env_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env_path]))
    procs = [ctx.Process(target=_worker, args=(*job, counter), daemon=True) for job in jobs]
    try:
        for proc in procs:
            proc.start()
        while any(p.is_alive() for p in procs) or not counter.empty():
            try:
                progress(counter.get(timeout=0.2))
            except queue.Empty:
                continue
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"a loader process failed (exit codes {failed}); see its traceback above")
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        if env_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env_path


def _split(start: int, stop: int, workers: int) -> list[tuple[int, int]]:
    step = -(-(stop - start) // workers)
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def fingerprint(start: int, stop: int) -> str:
    """Digest of everything that decides the rows: the data, the store's code, the search parameters."""
    digest = hashlib.sha256(f"{start}-{stop}".encode())
    files = [Path(data.__file__)]
    for folder in ("fhir_server", "conformance"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".json", ".mako"))
    for path in files:
        digest.update(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class Loaded:
    resources: int
    produce_s: float
    merge_s: float
    cached: bool


def load(
    target_url: str,
    start: int,
    stop: int,
    *,
    workers: int,
    loader: str = "sharded",
    cache_dir: Path | None = None,
    progress: Progress = lambda _: None,
) -> Loaded:
    """Add resources ``start`` ≤ n < ``stop`` of ``bench.data`` to the (migrated) target store."""
    t0 = time.perf_counter()
    is_sqlite = make_url(target_url).get_backend_name() == "sqlite"
    if loader == "direct":
        ranges = _split(start, stop, 1 if is_sqlite else workers)
        _run_workers([(target_url, a, b, False) for a, b in ranges], progress)
        return Loaded(stop - start, time.perf_counter() - t0, 0.0, False)

    ranges = _split(start, stop, workers)
    cached = False
    if cache_dir is not None:
        folder = cache_dir / f"{start}-{stop}-{len(ranges)}-{fingerprint(start, stop)}"
        shards = [folder / f"shard-{i}.db" for i in range(len(ranges))]
        if (folder / "complete").exists():
            cached = True
            progress(stop - start)
        else:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            _run_workers([(f"sqlite:///{s}", a, b, True) for s, (a, b) in zip(shards, ranges, strict=True)],
                         progress)  # fmt: skip
            (folder / "complete").touch()
        t1 = time.perf_counter()
        merge(shards, target_url)
        return Loaded(stop - start, t1 - t0, time.perf_counter() - t1, cached)

    with tempfile.TemporaryDirectory(prefix="overread-bench-shards-") as tmp:
        shards = [Path(tmp) / f"shard-{i}.db" for i in range(len(ranges))]
        _run_workers([(f"sqlite:///{s}", a, b, True) for s, (a, b) in zip(shards, ranges, strict=True)], progress)
        t1 = time.perf_counter()
        merge(shards, target_url)
        return Loaded(stop - start, t1 - t0, time.perf_counter() - t1, cached)


# -- copying shards into the target ---------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How one table's rows move: target columns, and the shard expressions that fill them."""

    table: str
    columns: tuple[str, ...]
    exprs: tuple[str, ...]


def plans() -> list[Plan]:
    """Per table: resource primary keys and foreign keys to them are shifted by ``:offset``;
    other integer surrogate keys are left for the target to assign; the rest is copied."""
    from fhir_server.schema import Base, ResourceRow

    resource_pk = ResourceRow.__table__.c.pk
    result = []
    for table in Base.metadata.sorted_tables:
        assert isinstance(table, Table)
        columns, exprs = [], []
        for col in table.columns:
            targets = [fk.column for fk in col.foreign_keys]
            if col is resource_pk or resource_pk in targets:
                columns.append(col.name)
                exprs.append(f'"{col.name}" + :offset')
            elif targets:
                raise NotImplementedError(
                    f"{table.name}.{col.name} refers to {targets[0]}: the sharded loader does not know how "
                    "to renumber it; use --loader direct"
                )
            elif col.primary_key and len(table.primary_key.columns) == 1 and isinstance(col.type, Integer):
                continue  # a surrogate key: the target's sequence assigns it
            else:
                columns.append(col.name)
                exprs.append(f'"{col.name}"')
        result.append(Plan(table.name, tuple(columns), tuple(exprs)))
    return result


def merge(shards: list[Path], target_url: str) -> None:
    url = make_url(target_url)
    if url.get_backend_name() == "sqlite":
        _merge_sqlite(shards, Path(url.database or ""))
    else:
        _merge_postgres(shards, url.set(drivername="postgresql").render_as_string(hide_password=False))


def _merge_sqlite(shards: list[Path], target: Path) -> None:
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        offset = conn.execute("SELECT coalesce(max(pk), 0) FROM resource").fetchone()[0]
        for shard in shards:
            conn.execute("ATTACH DATABASE ? AS shard", (str(shard),))  # not allowed inside a transaction
            conn.execute("BEGIN IMMEDIATE")
            for plan in plans():
                select = ", ".join(e.replace(":offset", str(int(offset))) for e in plan.exprs)
                columns = ", ".join(f'"{c}"' for c in plan.columns)
                order = ' ORDER BY "pk"' if plan.table == "resource" else ""
                conn.execute(f'INSERT INTO main."{plan.table}" ({columns}) SELECT {select} FROM shard."{plan.table}"'
                             + order)  # fmt: skip
            offset += conn.execute("SELECT coalesce(max(pk), 0) FROM shard.resource").fetchone()[0]
            conn.execute("COMMIT")
            conn.execute("DETACH DATABASE shard")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _merge_postgres(shards: list[Path], dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn) as pg:
        offset = pg.execute("SELECT coalesce(max(pk), 0) FROM resource").fetchone()[0]  # type: ignore[index]
        for shard in shards:
            lite = sqlite3.connect(shard)
            try:
                for plan in plans():
                    select = ", ".join(e.replace(":offset", str(int(offset))) for e in plan.exprs)
                    columns = ", ".join(f'"{c}"' for c in plan.columns)
                    rows = lite.execute(f'SELECT {select} FROM "{plan.table}"')
                    with pg.cursor() as cur, cur.copy(f'COPY "{plan.table}" ({columns}) FROM STDIN') as copy:
                        for row in rows:
                            copy.write_row(row)
                offset += lite.execute("SELECT coalesce(max(pk), 0) FROM resource").fetchone()[0]
            finally:
                lite.close()
        pg.execute("SELECT setval(pg_get_serial_sequence('resource', 'pk'), (SELECT max(pk) FROM resource))")
        pg.commit()
