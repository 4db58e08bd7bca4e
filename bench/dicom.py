"""Image linking beside DCMTK on the same PACS, in the same run (the DICOM benchmark).

``python -m bench.dicom [--repeat 20] [--retrieve-repeat 10] [--check]`` (``make bench-dicom``)

Orthanc 1.10 listens on every interface, so the bench re-executes itself in a private network
namespace whose only interface is ``lo`` (``unshare -n``, as ``tests/run`` does) and runs there:

- Orthanc (``tests.orthanc.Orthanc``: AE ORTHANC, DICOMweb plugin) knows three move destinations:
  our :class:`StorageScp` (OVERREAD), a second one started with Nagle's algorithm on (NAGLE) and
  DCMTK's ``movescu`` receiving on its own ``--port`` (MOVESCU).
- ``storescu`` loads studies made from pydicom's CT_small.dcm with new UIDs: one CT series of 100
  instances, one of 12 (the size the issue measured) and 8 other studies for the query to skip.
- For each of the two studies, round-robin (every operation once per round, after a warm-up round):
  queries by accession, ``findscu`` (a process and an association per level, as DCMTK does) beside
  ``DimseClient.find`` (one association, study → series → instance) and ``DicomWebClient.find``
  (QIDO-RS, one keep-alive connection), each followed by ``imaging_study(...)``; retrieves,
  ``movescu`` beside ``DimseClient.move`` to our SCP, C-GET and WADO-RS, each into an emptied folder.
- "Nagle on" rows drop the ``nodelay`` handler from ``dicom_bridge.dimse.ASSOCIATION_HANDLERS`` (our SCU side)
  and move to a second SCP (NAGLE) with ``nodelay = False``: what TCP_NODELAY buys on our side.

Goals (the issue): our query within 1.5x of findscu's, our retrieve within 2x of movescu's (medians).
Figures go to docs/performance.md by hand; the JSON to bench/results/dicom-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pynetdicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import dicom_bridge.dimse
from dicom_bridge import keys, tuning
from dicom_bridge.dicomweb import DicomWebClient
from dicom_bridge.dimse import DimseClient, Peer
from dicom_bridge.image_store import ImageStore
from dicom_bridge.query import StudyQuery
from dicom_bridge.storage_scp import StorageScp
from dicom_bridge.tuning import nodelay
from mappings.imaging_study import Study, imaging_study
from testbed.orthanc import Orthanc, in_private_netns
from testbed.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
OUR_AE, NAGLE_AE, MOVESCU_AE, STORESCP_AE = "OVERREAD", "NAGLE", "MOVESCU", "STORESCP"
QUERY_GOAL, RETRIEVE_GOAL = 1.5, 2.0
# The two studies measured (accession → instances) and the others the query must not match.
MEASURED = {"BENCH-CT12": 12, "BENCH-CT100": 100}
OTHERS = 8


# ---------------------------------------------------------------- the data


@dataclass
class Fixture:
    accession: str
    study_uid: str
    series_uids: list[str]
    instances: int


def make_studies(folder: Path) -> tuple[list[Path], dict[str, Fixture]]:
    """Part 10 files of every study (CT_small.dcm with new UIDs) and the measured studies' UIDs."""
    template = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
    layouts = {**{acc: [n] for acc, n in MEASURED.items()}, **{f"BENCH-OTHER{i}": [3, 3] for i in range(OTHERS)}}
    files: list[Path] = []
    fixtures: dict[str, Fixture] = {}
    for number, (accession, series_sizes) in enumerate(layouts.items()):
        study_uid = generate_uid()
        fixture = Fixture(accession, study_uid, [], sum(series_sizes))
        for series_number, size in enumerate(series_sizes, start=1):
            series_uid = generate_uid()
            fixture.series_uids.append(series_uid)
            for instance in range(1, size + 1):
                ds = copy.deepcopy(template)
                sop_uid = generate_uid()
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.AccessionNumber = accession
                ds.PatientID = f"BENCH-P{number:02d}"
                ds.StudyID = str(number)
                ds.SeriesNumber, ds.InstanceNumber = series_number, instance
                ds.SeriesDescription = f"axial {series_number}"
                files.append(folder / f"{sop_uid}.dcm")
                ds.save_as(files[-1], enforce_file_format=True)
        fixtures[accession] = fixture
    return files, {acc: fixtures[acc] for acc in MEASURED}


# ---------------------------------------------------------------- the operations


@dataclass
class Operation:
    """One row: ``run()`` does it once and answers how many instances it saw or brought."""

    label: str
    kind: str  # "query" | "retrieve" | "info"
    run: Callable[[], int]
    expected: int
    ceiling: str | None = None  # the label of the row it is compared with
    goal: float | None = None
    prepare: Callable[[], None] | None = None  # untimed, before every run
    samples: list[float] = field(default_factory=list)
    error: str | None = None
    wrong: int = 0  # runs that saw or brought the wrong number of instances: not timed

    def once(self) -> float:
        if self.prepare is not None:
            self.prepare()
        started = time.perf_counter()
        got = self.run()
        elapsed = time.perf_counter() - started
        if got != self.expected:
            raise WrongAnswer(f"{self.label}: {got} instead of {self.expected}")
        return elapsed * 1000


class WrongAnswer(Exception):
    pass


@contextmanager
def nagle_on() -> Iterator[None]:
    """Our SCU without its TCP_NODELAY handler: ``DimseClient`` reads ``dicom_bridge.dimse.ASSOCIATION_HANDLERS``
    at each association."""
    module = dicom_bridge.dimse
    saved = getattr(module, "ASSOCIATION_HANDLERS")  # noqa: B009 (a module global, not re-exported)
    setattr(module, "ASSOCIATION_HANDLERS", [h for h in saved if h[1] is not nodelay])  # noqa: B010
    try:
        yield
    finally:
        setattr(module, "ASSOCIATION_HANDLERS", saved)  # noqa: B010


def dcmtk(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stderr  # DCMTK logs (and findscu prints its answers) on stderr


def values(output: str, tag: str) -> list[str]:
    """The values of ``tag`` (e.g. "(0020,000d)") in findscu's printed answers."""
    return [line.split("[", 1)[1].split("]", 1)[0].rstrip("\0 ") for line in output.splitlines() if tag in line]


class BenchOrthanc(Orthanc):
    def config(self) -> dict[str, object]:
        # Orthanc keeps its C-STORE association to a move destination open 5 s after a C-MOVE by default;
        # a linking job moves a study once, so every C-MOVE here opens (and pays for) its own.
        return {**super().config(), "DicomAssociationCloseDelay": 0}


@contextmanager
def storescp(port: int, into: Path) -> Iterator[None]:
    """DCMTK's Storage SCP as STORESCP on ``port``, writing into ``into``: movescu's destination."""
    into.mkdir(parents=True, exist_ok=True)
    command = ["storescp", "-aet", STORESCP_AE, "-od", str(into), str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"storescp did not start (exit status {process.poll()})") from None
                time.sleep(0.05)
        yield
    finally:
        process.terminate()
        process.wait(10)


class Bench:
    def __init__(self, orthanc: Orthanc, folder: Path, movescu_port: int) -> None:
        self.orthanc, self.folder, self.movescu_port = orthanc, folder, movescu_port
        self.peer = Peer(orthanc.aet, orthanc.host, orthanc.dicom_port)
        self.web = DicomWebClient(orthanc.qido_url, timeout=30)

    def findscu(self, level: str, return_keys: tuple[str, ...], matching: dict[str, str]) -> str:
        command = ["findscu", "-S", "-aet", "FINDSCU", "-aec", self.orthanc.aet]
        command += ["-k", f"QueryRetrieveLevel={level}"]
        for keyword in return_keys:
            if keyword not in matching and keyword != "SpecificCharacterSet":
                command += ["-k", keyword]
        for keyword, value in matching.items():
            command += ["-k", f"{keyword}={value}"]
        return dcmtk([*command, self.orthanc.host, str(self.orthanc.dicom_port)])

    def findscu_study(self, accession: str) -> list[str]:
        return values(self.findscu("STUDY", keys.STUDY, {"AccessionNumber": accession}), "(0020,000d)")

    def findscu_tree(self, accession: str) -> int:
        """Study, then series, then instances, each level from the previous level's answers."""
        instances = 0
        for study in self.findscu_study(accession):
            answer = self.findscu("SERIES", keys.SERIES, {"StudyInstanceUID": study})
            for series in values(answer, "(0020,000e)"):
                matching = {"StudyInstanceUID": study, "SeriesInstanceUID": series}
                instances += len(values(self.findscu("IMAGE", keys.INSTANCE, matching), "(0008,0018)"))
        return instances

    def movescu(self, study_uid: str, into: Path, own_port: bool) -> int:
        """C-MOVE with movescu: to storescp (``into`` is its folder), or to movescu's own ``--port``."""
        command = ["movescu", "-S", "-aet", MOVESCU_AE, "-aec", self.orthanc.aet]
        if own_port:
            command += ["-aem", MOVESCU_AE, "--port", str(self.movescu_port), "-od", str(into)]
        else:
            command += ["-aem", STORESCP_AE]
        command += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}"]
        dcmtk([*command, self.orthanc.host, str(self.orthanc.dicom_port)])
        return sum(1 for _ in into.iterdir())

    def operations(self, fixture: Fixture, store: ImageStore, nagle_store: ImageStore) -> list[Operation]:
        n, acc, uid = fixture.instances, fixture.accession, fixture.study_uid
        query = StudyQuery(accession=acc)
        client = DimseClient(self.peer, OUR_AE)
        incoming, storescp_in = self.folder / "movescu", self.folder / "storescp"

        def built(studies: list[Study]) -> int:
            for study in studies:
                imaging_study(study, subject="Patient/bench", based_on=["ServiceRequest/bench"])
            return sum(len(s.instances) for study in studies for s in study.series)

        def dimse_find() -> int:
            return built(client.find(query))

        def dimse_find_nagle() -> int:
            with nagle_on():
                return built(client.find(query))

        found = client.find(query)
        sop_classes = {str(i.SOPClassUID) for study in found for s in study.series for i in s.instances}

        def build_only() -> int:
            return built(found)

        def emptied(folder: Path) -> Callable[[], None]:
            def prepare() -> None:  # empty, not removed: storescp writes into its folder
                folder.mkdir(parents=True, exist_ok=True)
                for child in folder.iterdir():
                    shutil.rmtree(child) if child.is_dir() else child.unlink()

            return prepare

        def move(destination: str, into: ImageStore) -> int:
            client.move(uid, destination)
            return into.count(uid)

        def move_nagle() -> int:
            with nagle_on():
                return move(NAGLE_AE, nagle_store)

        def get() -> int:
            client.get(uid, store, sop_classes)
            return store.count(uid)

        def wado() -> int:
            self.web.retrieve(uid, store)
            return store.count(uid)

        fs_study, fs_tree, mv = "findscu: study level", "findscu: study + series + image", "movescu → storescp"
        q, r = QUERY_GOAL, RETRIEVE_GOAL
        return [
            Operation(fs_study, "query", lambda: len(self.findscu_study(acc)), 1),
            Operation(fs_tree, "query", lambda: self.findscu_tree(acc), n),
            Operation("DimseClient.find + imaging_study", "query", dimse_find, n, fs_tree, q),
            Operation("DicomWebClient.find (QIDO-RS) + imaging_study", "query", lambda: built(self.web.find(query)), n,
                      fs_tree, q),
            Operation("DimseClient.find + imaging_study, Nagle on", "query", dimse_find_nagle, n, fs_tree),
            Operation("imaging_study() alone", "info", build_only, n),
            Operation(mv, "retrieve", lambda: self.movescu(uid, storescp_in, False), n, prepare=emptied(storescp_in)),
            Operation("DimseClient.move to our StorageScp", "retrieve", lambda: move(OUR_AE, store), n, mv, r,
                      emptied(store.root)),
            Operation("DimseClient.get (C-GET)", "retrieve", get, n, mv, r, emptied(store.root)),
            Operation("DicomWebClient.retrieve (WADO-RS)", "retrieve", wado, n, mv, r, emptied(store.root)),
            Operation("DimseClient.move, Nagle on (SCU and SCP)", "retrieve", move_nagle, n, mv,
                      prepare=emptied(nagle_store.root)),
            Operation("movescu → its own --port (polls each second)", "info",
                      lambda: self.movescu(uid, incoming, True), n, mv, prepare=emptied(incoming)),
        ]  # fmt: skip


def measure(operations: list[Operation], rounds: int) -> None:
    """A warm-up round, then ``rounds`` rounds of every operation once, in order."""
    for index in range(rounds + 1):
        for op in operations:
            if op.error is not None:
                continue
            try:
                elapsed = op.once()
            except WrongAnswer:
                op.wrong += 1
                continue
            except Exception as e:  # a failed operation is an ERROR row, never a speed
                op.error = f"{type(e).__name__}: {e}"[:300]
                continue
            if index:
                op.samples.append(elapsed)


# ---------------------------------------------------------------- the report


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def rows(study: str, operations: list[Operation]) -> list[dict[str, Any]]:
    by_label = {op.label: op for op in operations}
    ceilings = {op.ceiling for op in operations}
    found = []
    for op in operations:
        row: dict[str, Any] = {"study": study, "operation": op.label, "kind": op.kind, "instances": op.expected,
                               "is_ceiling": op.label in ceilings, "error": op.error, "wrong": op.wrong,
                               "samples_ms": [round(s, 3) for s in op.samples]}  # fmt: skip
        if op.samples and op.error is None:
            row |= {"median_ms": median(op.samples), "p95_ms": p95(op.samples)}
            ceiling = by_label.get(op.ceiling or "")
            if ceiling is not None and ceiling.samples and ceiling.error is None:
                row |= {"ceiling": ceiling.label, "ratio": row["median_ms"] / median(ceiling.samples)}
                if op.goal is not None:
                    row |= {"goal": op.goal, "met": row["ratio"] <= op.goal}
        found.append(row)
    return found


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| study | operation | median ms | p95 ms | DCMTK ceiling | ratio | goal | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        if row["error"] or "median_ms" not in row:
            lines.append(f"| {row['study']} | {row['operation']} | ERROR: {row['error']} | | | | | |")
            continue
        ceiling = "(ceiling)" if row["is_ceiling"] else row.get("ceiling", "—")
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "—"
        goal = f"≤ {row['goal']:g}x" if "goal" in row else "—"
        met = ("**yes**" if row["met"] else "**no**") if "met" in row else "—"
        wrong = f" ({row['wrong']} wrong answers, not timed)" if row["wrong"] else ""
        lines.append(
            f"| {row['study']} | {row['operation']}{wrong} | {row['median_ms']:.1f} | {row['p95_ms']:.1f} | {ceiling} "
            f"| {ratio} | {goal} | {met} |"
        )
    return "\n".join(lines)


def machine(orthanc: Orthanc) -> dict[str, Any]:
    def first_line(command: list[str]) -> str:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""

    dirty = first_line(["git", "status", "--porcelain", "--", "dicom_bridge", "mappings"])
    return {
        "commit": first_line(["git", "rev-parse", "--short", "HEAD"]) + (" (+ local changes)" if dirty else ""),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "orthanc": httpx.get(f"{orthanc.rest}/system", timeout=5).json().get("Version"),
        "dcmtk": first_line(["findscu", "--version"]),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
    }


# ---------------------------------------------------------------- the run


def inside(args: argparse.Namespace) -> int:
    if not in_private_netns():
        print("bench.dicom --inside: not in a private network namespace with only lo", file=sys.stderr)
        return 2
    tuning.apply()  # as overread serve runs
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-dicom-") as tmp:
        folder = Path(tmp)
        (folder / "data").mkdir()
        files, fixtures = make_studies(folder / "data")
        store, nagle_store = ImageStore(folder / "store"), ImageStore(folder / "nagle-store")
        movescu_port, storescp_port = free_port(), free_port()
        # DCMTK 3.6.7 (Debian), and so Orthanc 1.10 and findscu/movescu, leave Nagle's algorithm on unless
        # the environment says TCP_NODELAY=1: set for Orthanc and the DCMTK tools, as the issue measured.
        os.environ["TCP_NODELAY"] = "1"
        with StorageScp(OUR_AE, "127.0.0.1", 0, store) as scp:
            nagle_scp = StorageScp(NAGLE_AE, "127.0.0.1", 0, nagle_store)
            nagle_scp.nodelay = False
            nagle_scp.start()
            modalities: dict[str, list[str | int]] = {
                OUR_AE: [OUR_AE, "127.0.0.1", scp.port],
                NAGLE_AE: [NAGLE_AE, "127.0.0.1", nagle_scp.port],
                MOVESCU_AE: [MOVESCU_AE, "127.0.0.1", movescu_port],
                STORESCP_AE: [STORESCP_AE, "127.0.0.1", storescp_port],
            }
            orthanc = BenchOrthanc(folder / "orthanc", modalities)
            orthanc.start()
            bench = Bench(orthanc, folder, movescu_port)
            try:
                with storescp(storescp_port, folder / "storescp"):
                    orthanc.load(files)
                    results: list[dict[str, Any]] = []
                    for accession, fixture in fixtures.items():
                        ops = bench.operations(fixture, store, nagle_store)
                        retrieves = [op for op in ops if op.kind == "retrieve" or op.label.startswith("movescu")]
                        measure([op for op in ops if op not in retrieves], args.repeat)
                        measure(retrieves, args.retrieve_repeat)
                        results += rows(f"{accession} ({fixture.instances} inst.)", ops)
                    about = machine(orthanc)
            except BaseException:
                print(orthanc.log()[-3000:], file=sys.stderr)
                raise
            finally:
                bench.web.close()
                orthanc.kill()  # a graceful stop takes Orthanc 1.10 ~3.5 s, and its folder goes anyway
                nagle_scp.stop()
    seconds = time.perf_counter() - started
    studies = len(MEASURED) + OTHERS
    print(
        f"Image linking beside DCMTK, Orthanc {about['orthanc']} in a private network namespace, "
        f"{studies} studies / {len(files)} instances loaded; queries {args.repeat} rounds, retrieves "
        f"{args.retrieve_repeat} rounds, after one warm-up round; code {about['commit']}, {about['cpus']} CPUs, "
        f"{seconds:.0f} s\n"
    )
    print(table(results))
    missed = [r for r in results if r.get("met") is False]
    errors = [r for r in results if r["error"]]
    print(f"\ngoals (query ≤ {QUERY_GOAL:g}x findscu, retrieve ≤ {RETRIEVE_GOAL:g}x movescu): "
          f"{'all met' if not missed else f'{len(missed)} missed'}; {len(errors)} errors; "
          f"{sum(r['wrong'] for r in results)} wrong answers")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"dicom-{datetime.now():%Y%m%d-%H%M%S}.json"
    payload = {"machine": about, "repeat": args.repeat, "retrieve_repeat": args.retrieve_repeat,
               "seconds": seconds, "rows": results}  # fmt: skip
    out.write_text(json.dumps(payload, indent=2))
    print(f"results: {out.relative_to(ROOT)}")
    return 1 if errors or (args.check and missed) else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dicom", description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="rounds of the queries (default 20)")
    parser.add_argument("--retrieve-repeat", type=int, default=10, help="rounds of the retrieves (default 10)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inside or in_private_netns():
        return inside(args)
    # Orthanc listens on every interface: run in a network namespace of our own, with only lo.
    unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    script = 'ip link set lo up && OVERREAD_NETNS=1 exec "$0" -m bench.dicom --inside "$@"'
    argv = [*unshare, "bash", "-c", script, sys.executable, *sys.argv[1:]]
    return subprocess.run(argv, cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
