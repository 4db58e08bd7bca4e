"""Our Storage SCP (PS3.4 Annex B) on OVERREAD_DICOM_PORT as OVERREAD_DICOM_AE_TITLE.

It is the destination of our own C-MOVEs and accepts unsolicited pushes (a modality or a
PACS sending a study by itself). Every instance lands in the image store; when an
association ends, ``on_received`` hears which studies (Study Instance UID, accession
number) it brought, so a case waiting for one of them can be linked at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_bridge.dimse import OUT_OF_RESOURCES, SUCCESS, received
from dicom_bridge.image_store import ImageStore
from dicom_bridge.tuning import LOW_LATENCY_HANDLERS

log = logging.getLogger(__name__)
VERIFICATION = "1.2.840.10008.1.1"  # C-ECHO (PS3.4 Annex A)

#: (Study Instance UID, Accession Number) of each study an association brought.
Received = Callable[[set[tuple[str, str]]], None]


class StorageScp:
    def __init__(
        self, ae_title: str, host: str, port: int, store: ImageStore, on_received: Received | None = None
    ) -> None:
        self.ae_title, self.address, self.store, self.on_received = ae_title, (host, port), store, on_received
        self._studies: dict[int, set[tuple[str, str]]] = {}
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> StorageScp:
        ae = AE(self.ae_title)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs for large images
        # Storage contexts need not be listed: every SOP class and transfer syntax is accepted
        # (dicom_bridge.tuning sets pynetdicom's UNRESTRICTED_STORAGE_SERVICE).
        ae.add_supported_context(VERIFICATION)
        handlers: list[Any] = [
            *LOW_LATENCY_HANDLERS,
            (evt.EVT_C_STORE, self._stored),
            (evt.EVT_RELEASED, self._ended),
            (evt.EVT_ABORTED, self._ended),
            # pynetdicom ends an association whose DUL thread died without either event above;
            # the connection's close always fires, so the studies are never left behind.
            (evt.EVT_CONN_CLOSE, self._ended),
        ]
        self._server = ae.start_server(self.address, block=False, evt_handlers=handlers)
        log.info("DICOM Storage SCP %s on %s:%s", self.ae_title, self.address[0], self.port)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> StorageScp:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _stored(self, event: evt.Event) -> int:
        header = received(event, self.store)
        if header is None:
            return OUT_OF_RESOURCES
        key = (header.study_uid, header.accession)
        with self._lock:
            self._studies.setdefault(id(event.assoc), set()).add(key)
        return SUCCESS

    def _ended(self, event: evt.Event) -> None:
        with self._lock:
            studies = self._studies.pop(id(event.assoc), set())
        if studies and self.on_received is not None:
            try:
                self.on_received(studies)
            except Exception:  # a failed wake-up must not take the SCP down; the job retries anyway
                log.exception("could not wake the cases waiting for %s", sorted(studies))
