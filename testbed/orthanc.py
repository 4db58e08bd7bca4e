"""A real Orthanc PACS: the source PACS the integration tests query and ``bench.dicom`` measures against.

Orthanc 1.10 listens on every interface and cannot be told otherwise, so it only ever
runs inside a private network namespace whose one interface is ``lo`` (``tests/run``
starts the ``-m orthanc`` tests under ``unshare -n``; ``bench.dicom`` re-executes itself in one).
Anywhere else the tests' fixtures (``tests/orthanc.py``) skip.

Each :class:`Orthanc` has its own free DICOM and HTTP ports, AE title ``ORTHANC``, storage
and index in a temporary folder (so :meth:`Orthanc.stop` then :meth:`Orthanc.start`
keeps the data), the DICOMweb plugin, and the ``DicomModalities`` its caller gives (name
→ [AET, host, port]); an AE not listed there is unknown to it (a C-MOVE to it: 0xA801).
Instances are loaded with DCMTK's ``storescu``, an independent peer.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import httpx

from testbed.ports import free_port

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7"
AET = "ORTHANC"
Modalities = dict[str, list[str | int]]


def in_private_netns() -> bool:
    """True when ``tests/run`` says so and this network namespace has only ``lo``.

    /proc/net/dev belongs to the caller's namespace (/sys/class/net would still show
    the host's interfaces unless sysfs were mounted again).
    """
    if os.environ.get("OVERREAD_NETNS") != "1":
        return False
    lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    return {line.split(":", 1)[0].strip() for line in lines} == {"lo"}


class Orthanc:
    """One Orthanc process on a folder of its own; :meth:`start` it, :meth:`stop` it."""

    def __init__(self, folder: Path, modalities: Modalities | None = None) -> None:
        self.folder = folder
        self.modalities = dict(modalities or {})
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.aet = AET
        self.host = "127.0.0.1"
        self.rest = f"http://127.0.0.1:{self.http_port}"
        self.qido_url = f"{self.rest}/dicom-web"
        self.process: subprocess.Popen[bytes] | None = None

    def config(self) -> dict[str, object]:
        storage = str(self.folder / "storage")
        return {
            "Name": "overread-test",
            "StorageDirectory": storage,
            "IndexDirectory": storage,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
            "DicomModalities": self.modalities,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "DicomCheckCalledAet": False,
            "DicomScuTimeout": 10,
            # The HTTP server's Nagle switch. For DICOM, DCMTK (inside Orthanc) sets TCP_NODELAY
            # only when the environment says TCP_NODELAY=1: start() does (see bench/dicom.py).
            "TcpNoDelay": True,
            "KeepAlive": True,
            "SaveJobs": False,
            "StableAge": 1,
            "HttpThreadsCount": 8,
            "DicomThreadsCount": 4,
        }

    def start(self, timeout: float = 20) -> None:
        """Start Orthanc (again: on the same ports and storage) and wait until REST answers."""
        if self.process is not None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(self.config(), indent=2))
        with (self.folder / "orthanc.log").open("ab") as log:
            env = {**os.environ, "TCP_NODELAY": "1"}
            self.process = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Orthanc did not start; log:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.rest}/system", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop Orthanc (terminate, wait, kill); the storage stays."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """Kill Orthanc at once (a crash; a graceful :meth:`stop` takes Orthanc 1.10 ~3.5 s)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait()

    def log(self) -> str:
        path = self.folder / "orthanc.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def load(self, files: Iterable[Path | str]) -> None:
        """Store ``files`` with DCMTK ``storescu`` (C-STORE from an independent peer)."""
        command = ["storescu", "-aet", "LOADER", "-aec", self.aet, self.host, str(self.dicom_port)]
        subprocess.run([*command, *map(str, files)], check=True, capture_output=True, timeout=60)

    def studies(self) -> list[str]:
        """Orthanc's own ids of its studies."""
        answer = httpx.get(f"{self.rest}/studies", timeout=10)
        answer.raise_for_status()
        return list(answer.json())

    def clear(self) -> None:
        """Delete every study (REST DELETE /studies/{id})."""
        for study in self.studies():
            httpx.delete(f"{self.rest}/studies/{study}", timeout=10).raise_for_status()

    def set_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Add or change a DICOM modality while Orthanc runs (REST PUT /modalities/{name})."""
        body = {"AET": aet, "Host": host, "Port": port}
        httpx.put(f"{self.rest}/modalities/{name}", json=body, timeout=10).raise_for_status()
        self.modalities[name] = [aet, host, port]
