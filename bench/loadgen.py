"""Load generators, each in a process of its own: ``wrk`` (preferred) or an async httpx loop.

A load is either ``paths`` (GET a random line of a file of paths: read by id, search, bare
GET) or ``create`` (POST distinct Patient bodies to a path). Both generators report the
same figures: requests, duration, p50/p90/p99/mean latency and error counts.

The httpx generator is the fallback when ``wrk`` is not installed:
``python -m bench.loadgen --base URL --paths FILE | --create TAG [--path P] --connections N --duration S``.
It is itself Python and slower than wrk, so its bare-endpoint ceiling is lower.
"""

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LUA = Path(__file__).parent / "lua"
MARK = "BENCH_JSON "


@dataclass(frozen=True)
class Load:
    """What to send: GET a random line of ``paths_file``, or POST distinct bodies to ``post_path``."""

    paths_file: Path | None = None
    post_path: str | None = None
    tag: str = "run"


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    errors: int
    detail: str = ""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


def run(tool: str, base: str, load: Load, connections: int, seconds: float, threads: int = 1) -> Result:
    """Drive ``base`` (http://127.0.0.1:PORT) for ``seconds`` from another process."""
    if tool == "wrk":
        cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s"]
        if load.paths_file is not None:
            cmd += ["-s", str(LUA / "paths.lua"), base, "--", str(load.paths_file)]
        else:
            cmd += ["-s", str(LUA / "create.lua"), base, "--", load.tag, load.post_path or "/fhir/Patient"]
    else:
        cmd = [sys.executable, "-m", "bench.loadgen", "--base", base, "--connections", str(connections),
               "--duration", str(seconds)]  # fmt: skip
        if load.paths_file is not None:
            cmd += ["--paths", str(load.paths_file)]
        else:
            cmd += ["--create", load.tag, "--path", load.post_path or "/fhir/Patient"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return _result(json.loads(line[len(MARK) :]), proc.stdout)
    raise RuntimeError(f"{cmd[0]} failed (exit {proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")


def _result(data: dict[str, Any], output: str) -> Result:
    errors = sum(int(v) for k, v in data.items() if k.startswith("errors_"))
    detail = ", ".join(f"{k[7:]}={v}" for k, v in data.items() if k.startswith("errors_") and v)
    return Result(
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p90_ms=data["p90_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        mean_ms=data["mean_us"] / 1000,
        errors=errors,
        detail=detail,
    )


# -- the httpx fallback --------------------------------------------------------------

FAMILIES = ("Müller", "Dubois", "Rossi", "García", "Novak", "Jensen", "Kowalski", "Smith")
GIVENS = ("Anna", "Ben", "Chloé", "David", "Emma", "Farid", "Greta", "Hugo", "Inès", "Jonas")


def patient_body(tag: str, n: int) -> dict[str, Any]:
    """The same Patient bodies create.lua sends."""
    return {
        "resourceType": "Patient",
        "identifier": [{
            "use": "usual",
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "MR"}]},
            "system": "urn:oid:1.2.36.146.595.217.0.1",
            "value": f"{tag}-{n}",
        }],
        "active": True,
        "name": [{"family": FAMILIES[n % len(FAMILIES)], "given": [GIVENS[n % len(GIVENS)]]}],
        "gender": "female",
        "birthDate": f"{1930 + n % 85}-{n % 12 + 1:02d}-{n % 28 + 1:02d}",
        "telecom": [{"system": "phone", "value": f"+41 44 {1000000 + n % 8999999:07d}", "use": "home"}],
        "address": [{"line": [f"{n % 200 + 1} Main Street"], "city": "Zürich", "postalCode": "8001"}],
    }  # fmt: skip


async def _drive(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    paths = [p for p in Path(args.paths).read_text().splitlines() if p] if args.paths else []
    latencies: list[float] = []
    errors = {"errors_connect": 0, "errors_read": 0, "errors_write": 0, "errors_status": 0, "errors_timeout": 0}
    counter = 0
    limits = httpx.Limits(max_connections=args.connections, max_keepalive_connections=args.connections)
    async with httpx.AsyncClient(base_url=args.base, limits=limits, timeout=10.0) as client:
        start = time.perf_counter()
        deadline = start + args.duration

        async def worker(wid: int) -> None:
            nonlocal counter
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    if paths:
                        response = await client.get(random.choice(paths))
                    else:
                        counter += 1
                        response = await client.post(
                            args.path,
                            json=patient_body(f"{args.create}-{wid}", counter),
                            headers={"Content-Type": "application/fhir+json"},
                        )
                except httpx.TimeoutException:
                    errors["errors_timeout"] += 1
                    continue
                except httpx.HTTPError:
                    errors["errors_connect"] += 1
                    continue
                latencies.append(time.perf_counter() - t0)
                if response.status_code >= 400:
                    errors["errors_status"] += 1

        await asyncio.gather(*(worker(i) for i in range(args.connections)))
        elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e6 if latencies else 0.0

    mean = sum(latencies) / len(latencies) * 1e6 if latencies else 0.0
    return {
        "requests": len(latencies), "duration_us": int(elapsed * 1e6), **errors,
        "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "mean_us": mean,
        "max_us": latencies[-1] * 1e6 if latencies else 0.0,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--base", required=True)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--paths", help="file of paths to GET at random")
    what.add_argument("--create", metavar="TAG", help="POST distinct Patients tagged TAG")
    parser.add_argument("--path", default="/fhir/Patient")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    print(MARK + json.dumps(asyncio.run(_drive(args))), flush=True)


if __name__ == "__main__":
    main()
