"""Server processes for the benchmark: uvicorn, one worker, 127.0.0.1, a free port."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class Running:
    """A server process of the benchmark: its base URL and its process id."""

    base: str
    pid: int

    def cpu_seconds(self) -> float | None:
        """CPU time (user and system, all threads) the process has used, or None off Linux."""
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (proc(5))


@contextmanager
def server(app: str, database_url: str = "", log: Path | None = None) -> Iterator[Running]:
    """Run ``python -m bench.serve APP`` until the block ends."""
    port = free_port()
    cmd = [sys.executable, "-m", "bench.serve", app, "--port", str(port)]
    if database_url:
        cmd += ["--database-url", database_url]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, base + ("/bare" if app == "bare" else "/fhir/metadata"))
        yield Running(base, proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer {url} within {timeout:.0f} s")
