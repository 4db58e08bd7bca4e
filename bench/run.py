"""Overread benchmark: read by id, create and search by token on a store of 100,000 resources,
each beside a bare FastAPI endpoint measured in the same run.

    python -m bench                      # SQLite, then PostgreSQL
    python -m bench --db sqlite          # one database
    python -m bench --help               # durations, connections, loaders, caching

Per database: a fresh store (SQLite file in a temporary directory, or a PostgreSQL database
of its own, dropped at the end) is migrated and loaded with 1,000 resources through the
repository write path; search by token is measured there; the store is then filled to
100,000 resources, and in each of ``--rounds`` rounds the bare GET, read by id, the bare
POST and create are measured, each measurement of ours right after its ceiling; then search
by token. Goals are judged on the median of the rounds' ratios. Beside req/s and latency,
each line gives the server process's CPU time per request. Servers are separate uvicorn
processes (one worker, 127.0.0.1, a free port, identical settings); the load comes from wrk
(or, without it, an async httpx loop) in another process. Nothing is cached across runs
unless ``--reuse`` says so.
"""

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from sqlalchemy import make_url

from bench import data, loadgen
from bench.load import load
from bench.servers import ROOT, Running, server

DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
GOAL_READ, GOAL_CREATE, GOAL_SEARCH_GROWTH = 0.40, 0.08, 2.0


@dataclass
class Row:
    """One line of the table: one measurement, or the same one in each round."""

    key: str
    label: str
    store: int | None
    results: list[loadgen.Result] = field(default_factory=list)
    #: The server process's CPU time per request, in ms, per measurement.
    cpu_ms: list[float] = field(default_factory=list)
    #: Per round, req/s against the ceiling measured right before it (``bare``).
    ratios: list[float] = field(default_factory=list)
    error: str = ""
    bare: str = ""  # key of the ceiling row
    goal: str = ""
    measured: str = ""
    passed: bool | None = None

    @property
    def rps(self) -> float | None:
        return median(r.rps for r in self.results) if self.results else None

    def ms(self, name: str) -> float | None:
        """The median over the measurements of a latency (``p50_ms``, ``p99_ms``)."""
        return median(getattr(r, name) for r in self.results) if self.results else None


@dataclass
class Report:
    database: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.key == key), None)


# -- targets -----------------------------------------------------------------------------


@contextmanager
def target_store(kind: str, args: argparse.Namespace, console: Console) -> Iterator[str]:
    """A fresh, migrated store; removed afterwards unless --keep."""
    from fhir_server.db import Database
    from overread.migrate import upgrade

    if kind == "sqlite":
        folder = Path(tempfile.mkdtemp(prefix="overread-bench-"))
        url = f"sqlite:///{folder / 'overread.db'}"

        def cleanup() -> None:
            shutil.rmtree(folder, ignore_errors=True)

    else:
        import psycopg

        admin = make_url(args.postgres_url)
        name = f"overread_bench_{uuid.uuid4().hex[:12]}"
        dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = admin.set(database=name).render_as_string(hide_password=False)

        def cleanup() -> None:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    try:
        db = Database(url)
        upgrade(db.engine)
        db.dispose()
        yield url
    finally:
        if args.keep:
            console.print(f"[yellow]kept the store: {url}")
        else:
            cleanup()


def analyze(url: str) -> str:
    """What autovacuum would do soon after a bulk load on PostgreSQL; SQLite never analyzes by itself."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return "SQLite: no ANALYZE (the server never runs one)"
    import psycopg

    with psycopg.connect(parsed.set(drivername="postgresql").render_as_string(hide_password=False),
                         autocommit=True) as conn:  # fmt: skip
        conn.execute("VACUUM ANALYZE")
    return "PostgreSQL: VACUUM ANALYZE after each bulk load (what autovacuum does shortly after one)"


# -- measuring -----------------------------------------------------------------------------


def write_lines(path: Path, lines: Iterator[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def search_path(case: int) -> str:
    return "/fhir/Patient?identifier=" + quote(f"{data.MRN_SYSTEM}|{data.mrn(case)}", safe="")


def preflight(base: str, key: str, paths_file: Path | None) -> None:
    """One request checked by hand before the load, so a fast error is never counted as speed."""
    first = paths_file.read_text().splitlines()[0] if paths_file else ""
    with httpx.Client(base_url=base, timeout=30) as client:
        if key.startswith("bare"):
            response = client.get("/bare") if key == "bare_get" else client.post("/bare", content=b"{}")
            response.raise_for_status()
        elif key == "read":
            response = client.get(first)
            if response.status_code != 200 or response.json().get("id") != first.rsplit("/", 1)[1]:
                raise RuntimeError(f"GET {first}: {response.status_code} {response.text[:300]}")
        elif key.startswith("search"):
            response = client.get(first)
            bundle = response.json()
            if response.status_code != 200 or bundle.get("total") != 1 or len(bundle.get("entry", [])) != 1:
                raise RuntimeError(f"GET {first}: {response.status_code}, expected exactly one match: "
                                   f"{response.text[:300]}")  # fmt: skip
        elif key == "create":
            response = client.post("/fhir/Patient", json=loadgen.patient_body("preflight", 0),
                                   headers={"Content-Type": "application/fhir+json"})  # fmt: skip
            if response.status_code != 201:
                raise RuntimeError(f"POST /fhir/Patient: {response.status_code} {response.text[:300]}")


def measure(console: Console, args: argparse.Namespace, at: Running, row: Row, load_: loadgen.Load) -> float | None:
    """Measure ``row`` once more; its req/s, or None (and ``row.error``) if it failed."""
    try:
        preflight(at.base, row.key, load_.paths_file)
        with console.status(f"{row.label}: warm-up {args.warmup:g} s, then {args.duration:g} s "
                            f"({args.connections} connections, {args.loadgen})"):  # fmt: skip
            if args.warmup > 0:
                warm = loadgen.Load(load_.paths_file, load_.post_path, load_.tag + "-warmup")
                loadgen.run(args.loadgen, at.base, warm, args.connections, args.warmup)
            cpu_before = at.cpu_seconds()
            result = loadgen.run(args.loadgen, at.base, load_, args.connections, args.duration)
            cpu_after = at.cpu_seconds()
        row.results.append(result)
        cpu = ""
        if cpu_before is not None and cpu_after is not None and result.requests:
            row.cpu_ms.append(1000 * (cpu_after - cpu_before) / result.requests)
            cpu = f"   CPU {row.cpu_ms[-1]:6.3f} ms/req"
        if result.errors:
            row.error = f"{result.errors} failed requests ({result.detail})"
        console.print(f"  {row.label:<38} {result.rps:9.1f} req/s   p50 {result.p50_ms:7.2f} ms   "
                      f"p99 {result.p99_ms:7.2f} ms{cpu}" + (f"   [red]{row.error}" if row.error else ""))  # fmt: skip
        return None if row.error else result.rps
    except Exception as exc:  # one failed measurement must not hide the others
        row.error = f"{type(exc).__name__}: {exc}"
        console.print(f"  [red]{row.label}: {row.error}")
        return None


def paired(console: Console, args: argparse.Namespace, bare: Running, fhir: Running, ceiling: Row, row: Row,
           bare_load: loadgen.Load, load_: loadgen.Load) -> None:  # fmt: skip
    """The ceiling, then ``row`` right after it: one round's ratio, little touched by this VM's drifts."""
    top = measure(console, args, bare, ceiling, bare_load)
    got = measure(console, args, fhir, row, load_)
    if top and got is not None:
        row.ratios.append(got / top)


def progress_bar(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
    )  # fmt: skip


def fill(console: Console, args: argparse.Namespace, url: str, start: int, stop: int, report: Report) -> None:
    t0 = time.perf_counter()
    with progress_bar(console) as bar:
        task = bar.add_task(f"loading resources {start:,}-{stop:,}", total=stop - start, rate="")

        def advance(n: int) -> None:
            done = bar.tasks[0].completed + n
            bar.update(task, advance=n, rate=f"{done / max(time.perf_counter() - t0, 1e-6):,.0f}/s")

        loaded = load(url, start, stop, workers=args.workers, loader=args.loader,
                      cache_dir=args.cache_dir if args.reuse else None, progress=advance)  # fmt: skip
    how = "from cached shards" if loaded.cached else f"{args.loader}, {args.workers} worker(s)"
    note = (f"loaded resources {start:,}-{stop:,} in {loaded.produce_s + loaded.merge_s:.0f} s ({how}; "
            f"repository {loaded.produce_s:.0f} s, copy into the store {loaded.merge_s:.0f} s)")  # fmt: skip
    console.print("  " + note)
    report.notes.append(note)


def bench_database(kind: str, args: argparse.Namespace, console: Console) -> Report:
    report = Report(kind)
    t0 = time.perf_counter()
    small, total = args.small, args.resources
    rows = {
        "bare_get": Row("bare_get", "bare FastAPI GET (ceiling)", None),
        "bare_post": Row("bare_post", "bare FastAPI POST (ceiling)", None),
        "read": Row("read", "read Patient by id", total, bare="bare_get"),
        "create": Row("create", "create Patient (POST)", total, bare="bare_post"),
        "search_small": Row("search_small", "search Patient?identifier=sys|value", small, bare="bare_get"),
        "search_large": Row("search_large", "search Patient?identifier=sys|value", total, bare="bare_get"),
    }
    report.rows = list(rows.values())
    console.rule(f"[bold]{kind}")
    with tempfile.TemporaryDirectory(prefix="overread-bench-work-") as tmp, target_store(kind, args, console) as url:
        work = Path(tmp)
        log = work / "server.log" if not args.server_log else Path(args.server_log)
        try:
            fill(console, args, url, 0, small, report)
            if not args.no_analyze:
                analyze(url)
            small_search = write_lines(work / "search-small.txt",
                                       (search_path(c) for c in range(data.cases_in(small))))  # fmt: skip
            with server("overread", url, log) as fhir:
                measure(console, args, fhir, rows["search_small"], loadgen.Load(small_search))

            fill(console, args, url, small, total, report)
            if not args.no_analyze:
                report.notes.append(analyze(url))
            cases = data.cases_in(total)
            read_paths = write_lines(work / "read.txt", (f"/fhir/Patient/{data.patient_id(c)}" for c in range(cases)))
            large_search = write_lines(work / "search-large.txt", (search_path(c) for c in range(cases)))
            bare_paths = write_lines(work / "bare.txt", iter(["/bare"]))
            tag = uuid.uuid4().hex[:8]

            # Both servers run throughout (the idle one costs nothing). Each round measures a
            # ceiling and then its measurement right after it, so that each ratio compares two
            # measurements a few seconds apart: this VM's speed drifts by up to 2x in minutes.
            with server("bare", log=log) as bare, server("overread", url, log) as fhir:
                for n in range(args.rounds):
                    if args.rounds > 1:
                        console.print(f"  [dim]round {n + 1} of {args.rounds}")
                    paired(console, args, bare, fhir, rows["bare_get"], rows["read"],
                           loadgen.Load(bare_paths), loadgen.Load(read_paths))  # fmt: skip
                    paired(console, args, bare, fhir, rows["bare_post"], rows["create"],
                           loadgen.Load(post_path="/bare", tag=f"{tag}-{n}"),
                           loadgen.Load(post_path="/fhir/Patient", tag=f"{tag}-{n}"))  # fmt: skip
                measure(console, args, fhir, rows["search_large"], loadgen.Load(large_search))
        except Exception as exc:
            report.notes.append(f"aborted: {type(exc).__name__}: {exc}")
            console.print(f"[red]aborted: {type(exc).__name__}: {exc}")
            if log.exists():
                console.print("[dim]" + log.read_text()[-3000:])
    if args.loadgen == "httpx":
        report.notes.append(
            "load generator: httpx (wrk not installed); the Python generator itself bounds the bare ceiling, "
            "so the ratios overstate the server and are not comparable with the goals"
        )
    judge(report)
    report.seconds = time.perf_counter() - t0
    return report


def judge(report: Report) -> None:
    """Each goal on the median over the rounds (the range beside it)."""
    rows = {r.key: r for r in report.rows}
    for key, goal in (("read", GOAL_READ), ("create", GOAL_CREATE)):
        row = rows[key]
        row.goal = f"≥ {goal:.0%} of bare"
        if row.ratios and not row.error and not rows[row.bare].error:
            ratio = median(row.ratios)
            spread = f" ({min(row.ratios):.1%} to {max(row.ratios):.1%})" if len(row.ratios) > 1 else ""
            row.measured, row.passed = f"{ratio:.1%}{spread}", ratio >= goal
    large, small = rows["search_large"], rows["search_small"]
    large.goal = f"p50 ≤ {GOAL_SEARCH_GROWTH:g}x p50 at {small.store:,}"
    small.goal = "(reference for the line below)"
    large_p50, small_p50 = large.ms("p50_ms"), small.ms("p50_ms")
    if large_p50 and small_p50 and not large.error and not small.error:
        growth = large_p50 / small_p50
        large.measured, large.passed = f"{growth:.2f}x", growth <= GOAL_SEARCH_GROWTH


# -- output -----------------------------------------------------------------------------------


def table(report: Report) -> str:
    """Medians over the rounds; the ratio to bare is the median of each round's (``judge``)."""
    rows = {r.key: r for r in report.rows}
    head = ["measurement", "store", "rounds", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "bare req/s",
            "ratio to bare", "goal", "measured", "result"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in report.rows:
        rps, bare = r.rps, rows[r.bare].rps if r.bare else None
        p50, p99 = r.ms("p50_ms"), r.ms("p99_ms")
        ratio = None
        if r.ratios:
            ratio = median(r.ratios)  # each round against its own ceiling
        elif rps and bare:
            ratio = rps / bare
        cells = [
            r.label.replace("|", "\\|"),  # a pipe would end the Markdown cell
            f"{r.store:,}" if r.store else "—",
            str(len(r.results)),
            f"{rps:,.0f}" if rps else "—",
            f"{p50:.2f}" if p50 else "—",
            f"{p99:.2f}" if p99 else "—",
            f"{median(r.cpu_ms):.3f}" if r.cpu_ms else "—",
            f"{bare:,.0f}" if bare else "—",
            f"{ratio:.1%}" if ratio else "—",
            r.goal or "—",
            r.measured or "—",
            "ERROR: " + r.error if r.error else {True: "**pass**", False: "**FAIL**", None: "—"}[r.passed],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(args: argparse.Namespace) -> dict[str, str]:
    info = {
        "cpus (nproc)": str(os.cpu_count()),
        "cpu": _cpu_model(),
        "memory": _memory(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load generator": _loadgen_version(args.loadgen),
        "code": _git_version(),
    }
    if "postgresql" in args.databases:
        try:
            import psycopg

            dsn = make_url(args.postgres_url).set(drivername="postgresql").render_as_string(hide_password=False)
            with psycopg.connect(dsn) as conn:
                info["postgresql"] = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
        except Exception as exc:
            info["postgresql"] = f"unreachable ({exc})"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory() -> str:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def _git_version() -> str:
    out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                         text=True, check=False)  # fmt: skip
    return out.stdout.strip() or "unknown"


def _loadgen_version(tool: str) -> str:
    if tool == "httpx":
        return f"httpx {httpx.__version__} async loop (bench/loadgen.py)"
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].split("Copyright")[0].strip() if text else "wrk"


# -- command line ------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument(
        "--db",
        choices=["sqlite", "postgresql", "both"],
        default="both",
        help="which database to measure (default both, SQLite first)",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get("OVERREAD_BENCH_POSTGRES_URL", DEFAULT_POSTGRES),
        help="PostgreSQL server to create the benchmark database on (default %(default)s; "
        "env OVERREAD_BENCH_POSTGRES_URL)",
    )
    parser.add_argument("--resources", type=int, default=100_000, help="size of the large store (%(default)s)")
    parser.add_argument("--small", type=int, default=1_000, help="size of the small store (%(default)s)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement (%(default)s)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before each (%(default)s)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of (bare GET, read, bare POST, create); goals are judged on the median (%(default)s)",
    )
    parser.add_argument("--connections", type=int, default=8, help="concurrent connections (%(default)s)")
    parser.add_argument(
        "--loadgen",
        choices=["wrk", "httpx"],
        default=None,
        help="load generator (default: wrk when installed, else httpx)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 2, help="loader processes (default: one per core, %(default)s)"
    )
    parser.add_argument(
        "--loader",
        choices=["sharded", "direct"],
        default="sharded",
        help="sharded: workers write scratch SQLite shards through the repository, copied "
        "into the store in bulk; direct: workers write into the store itself (slower)",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the loader's shards in --cache-dir and reuse them while the data generator, "
        "fhir_server/ and conformance/ are unchanged (the store itself is always fresh)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "overread-bench",
    )
    parser.add_argument("--keep", action="store_true", help="keep the loaded stores afterwards (prints their URLs)")
    parser.add_argument("--no-analyze", action="store_true", help="skip VACUUM ANALYZE on PostgreSQL after loading")
    parser.add_argument(
        "--output",
        type=Path,
        default=ROOT / "bench" / "results",
        help="directory for the JSON results (default bench/results, git-ignored)",
    )
    parser.add_argument("--server-log", default="", help="append the servers' output to this file")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed, not only on errors")
    args = parser.parse_args(argv)
    args.databases = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    if args.loadgen is None:
        args.loadgen = "wrk" if loadgen.have_wrk() else "httpx"
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.small >= args.resources:
        parser.error("--small must be below --resources")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    console = Console(highlight=False, soft_wrap=True)
    info = machine(args)
    console.print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    if args.loadgen == "httpx":
        console.print("[yellow]wrk is not installed (apt-get install -y wrk): using the slower httpx load generator")
    reports = [bench_database(kind, args, console) for kind in args.databases]

    command = "python -m bench " + " ".join(sys.argv[1:])
    console.rule("[bold]results")
    console.print(f"command: {command.strip()}")
    console.print(f"{args.duration:g} s per measurement after {args.warmup:g} s warm-up, {args.connections} "
                  f"connections, {args.rounds} round(s), load generator {info['load generator']}")  # fmt: skip
    for report in reports:
        console.print(f"\n[bold]{report.database}[/bold] ({report.seconds / 60:.1f} min)\n")
        console.print(table(report), markup=False)
        for note in report.notes:
            console.print(f"- {note}", markup=False)

    args.output.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.output / f"bench-{stamp}.json"
    out.write_text(json.dumps({
        "command": command.strip(), "machine": info,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "reports": [_jsonable(r) for r in reports],
    }, indent=2, default=str))  # fmt: skip
    console.print(f"\nresults: {out}")

    errors = any(r.error for report in reports for r in report.rows) or any(
        n.startswith("aborted") for report in reports for n in report.notes
    )
    missed = any(r.passed is False for report in reports for r in report.rows)
    return 1 if errors or (args.check and missed) else 0


def _jsonable(report: Report) -> dict[str, Any]:
    out = asdict(report)
    for row, raw in zip(out["rows"], report.rows, strict=True):
        for result, measured in zip(row["results"], raw.results, strict=True):
            result["rps"] = measured.rps
    return out
