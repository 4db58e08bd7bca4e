"""``overread serve`` as a user runs it, for tests: free ports, its environment, start and wait."""

import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import httpx

from testbed.ports import free_port

OVERREAD = [sys.executable, "-m", "overread.cli"]


def serve_env(database_url: str, tmp_path: Path, config: Path | None = None, **settings: str) -> dict[str, str]:
    """The environment of a server of its own: free HTTP, MLLP and DICOM ports, an image store in
    ``tmp_path``; ``settings`` are more OVERREAD_* variables without their prefix, e.g. dicom_port="4242"."""
    env = {
        **os.environ,
        "OVERREAD_DATABASE_URL": database_url,
        "OVERREAD_HTTP_PORT": str(free_port()),
        "OVERREAD_MLLP_PORT": str(free_port()),
        "OVERREAD_DICOM_PORT": str(free_port()),
        "OVERREAD_IMAGE_STORE": str(tmp_path / "images"),
    }
    if config is not None:
        env["OVERREAD_CONFIG"] = str(config)
    env.update({f"OVERREAD_{name.upper()}": value for name, value in settings.items()})
    return env


def fhir_base(env: dict[str, str]) -> str:
    return f"http://127.0.0.1:{env['OVERREAD_HTTP_PORT']}/fhir"


def start_serve(
    env: dict[str, str], timeout: float = 30, *, fd_limit: int | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``overread serve`` in a process of its own, once its FHIR API answers (its MLLP listener and
    workers start before it). ``fd_limit``: its RLIMIT_NOFILE soft limit (``ulimit -n``); ``log``:
    where its stderr goes."""

    def limit_descriptors(limit: int) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))

    with log.open("wb") if log is not None else contextlib.nullcontext(subprocess.DEVNULL) as stderr:
        server = subprocess.Popen(  # the child keeps its own copy of the log's descriptor
            [*OVERREAD, "serve"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=None if fd_limit is None else (lambda: limit_descriptors(fd_limit)),
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{fhir_base(env)}/metadata", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            server.wait(10)
            raise AssertionError(f"the server did not come up (exit status {server.returncode})")
        time.sleep(0.1)
