"""The DIMSE door to a PACS: Study Root Query/Retrieve as an SCU (PS3.4 Annex C).

One association per job serves every query level: study, then series, then instance
(PS3.4 C.4.1.3.1 hierarchical search). Statuses and transport failures become the
exceptions of :mod:`dicom_bridge.errors`, which the linking worker turns into retries.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from pydicom import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_context, build_role
from pynetdicom.association import Association
from pynetdicom.dsutils import encode

from dicom_bridge import command_set, keys, upper_layer
from dicom_bridge.errors import MoveDestinationUnknown, PacsError, PacsUnavailable, RetrieveFailed
from dicom_bridge.image_store import ImageStore
from dicom_bridge.query import StudyQuery, identifier, unique
from dicom_bridge.storage_scp import c_store
from dicom_bridge.tuning import ASSOCIATION_HANDLERS
from dicom_bridge.upper_layer import ProtocolError
from mappings.imaging_study import Series, Study

log = logging.getLogger(__name__)

# Study Root Query/Retrieve Information Model (PS3.4 C.6.2; UIDs from PS3.6 Annex A).
FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")
MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
GET = UID("1.2.840.10008.5.1.4.1.2.2.3")

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
WARNING = 0xB000  # C-MOVE/C-GET: one or more sub-operations failed (PS3.4 C.4.2.1.5)
MOVE_DESTINATION_UNKNOWN = 0xA801
#: The transfer syntaxes of still images (PS3.5 Annex A): uncompressed, deflated, JPEG, JPEG-LS,
#: JPEG 2000 and RLE. Not all 45 pynetdicom knows: every association copies every supported
#: context (170 SOP classes x 45 syntaxes) before it can start; video is not read here.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian first: what we prefer
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.2",
    *(f"1.2.840.10008.1.2.4.{n}" for n in (50, 51, 57, 70, 80, 81, 90, 91, 92, 93)),
    "1.2.840.10008.1.2.5",
]
#: A query/retrieve context's syntaxes: the identifier is encoded in one of them, never deflated.
QUERY_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@dataclass(frozen=True)
class Peer:
    """Where a PACS listens, what it calls itself, and DICOM TLS to it (PS3.15 B.9) when ``tls`` is set."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None


class DimseClient:
    """A Study Root Q/R SCU calling one PACS as ``calling_ae``."""

    def __init__(self, peer: Peer, calling_ae: str, *, timeout: float = 30.0) -> None:
        self.peer, self.calling_ae, self.timeout = peer, calling_ae, timeout

    def find(self, query: StudyQuery) -> list[Study]:
        """Every study matching ``query``, each with its series and instances."""
        with self._association([FIND]) as assoc:
            studies = unique(self._find(assoc, "STUDY", keys.STUDY, query.matching_keys()), "StudyInstanceUID")
            found = []
            for study in studies:
                uid = {"StudyInstanceUID": str(study.StudyInstanceUID)}
                series = unique(self._find(assoc, "SERIES", keys.SERIES, uid), "SeriesInstanceUID")
                found.append(Study(study, [self._instances(assoc, uid, s) for s in series]))
            return found

    def move(self, study_uid: str, destination: str) -> int:
        """C-MOVE the study to ``destination`` (an AE the PACS knows); the instances moved."""
        with self._association([MOVE]) as assoc:
            request = identifier("STUDY", (), {"StudyInstanceUID": study_uid})
            # Orthanc (and others) answer "Unable to process" (0xCxxx), not 0xA801, for a destination
            # they do not know: the reason says what to check.
            hint = f"does {self.peer.ae_title} know {destination} as a move destination?"
            return _sub_operations(assoc.send_c_move(request, destination, MOVE), f"C-MOVE to {destination}", hint)

    def get(self, study_uid: str, store: ImageStore, sop_classes: set[str]) -> int:
        """C-GET the study into ``store``; the instances received (PS3.4 C.4.3).

        The storage contexts offered are those of ``sop_classes`` (what the query found),
        each with the still-image transfer syntaxes and our SCP role (PS3.4 C.4.3.1, PS3.7
        D.3.3.4). The association runs on :mod:`dicom_bridge.upper_layer`, as our Storage SCP
        does: pynetdicom's two polling threads spent more CPU per instance than the store.
        """
        contexts = [
            build_context(GET, QUERY_SYNTAXES),
            *(build_context(uid, TRANSFER_SYNTAXES) for uid in sorted(sop_classes)),
        ]
        for number, context in enumerate(contexts):
            context.context_id = 2 * number + 1  # odd numbers (PS3.8 9.3.2.2)
        roles = [build_role(uid, scp_role=True) for uid in sorted(sop_classes)]
        peer = self.peer
        try:
            with self._connect() as sock:
                sock.sendall(upper_layer.request(self.calling_ae, peer.ae_title, contexts, roles))
                return self._get(sock, sock.makefile("rb"), study_uid, store, contexts)
        except ProtocolError as exc:
            raise PacsError(f"C-GET: {peer.ae_title} broke the DICOM protocol: {exc}") from exc
        except OSError as exc:  # refused, reset, timed out
            raise PacsUnavailable(f"C-GET: {peer.ae_title} at {peer.host}:{peer.port}: {exc}") from exc

    def _connect(self) -> socket.socket:
        """A connection to the peer (over TLS when it has a context), its handshake done."""
        peer = self.peer
        sock = socket.create_connection((peer.host, peer.port), timeout=min(self.timeout, 10.0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if peer.tls is not None:
            try:
                sock = peer.tls.wrap_socket(sock, server_hostname=peer.host)
            except OSError:
                sock.close()
                raise
        sock.settimeout(self.timeout)
        return sock

    def _get(
        self, sock: socket.socket, stream: BinaryIO, study_uid: str, store: ImageStore, contexts: list[Any]
    ) -> int:
        answer = upper_layer.read_pdu(stream)
        if answer is None or answer[0] == upper_layer.ASSOCIATE_RJ:
            why = "did not answer" if answer is None else "rejected the association"
            raise PacsUnavailable(f"{self.peer.ae_title} at {self.peer.host}:{self.peer.port} {why}")
        if answer[0] != upper_layer.ASSOCIATE_AC:
            raise ProtocolError(f"PDU type 0x{answer[0]:02X} in answer to an A-ASSOCIATE-RQ")
        association, max_pdu = upper_layer.accepted(answer[1], contexts)
        get_id = next((id_ for id_, (abstract, _) in association.contexts.items() if abstract == GET), None)
        if get_id is None:
            raise PacsError(f"C-GET: {self.peer.ae_title} does not accept Study Root C-GET")
        syntax = association.contexts[get_id][1]
        request = encode(identifier("STUDY", (), {"StudyInstanceUID": study_uid}), syntax.is_implicit_VR, True)
        sock.sendall(upper_layer.command_pdu(get_id, command_set.request(command_set.C_GET_RQ, 1, GET)))
        sock.sendall(b"".join(upper_layer.data_pdus(get_id, cast(bytes, request), max_pdu)))
        messages, final = upper_layer.Messages(association.contexts), None
        while final is None:
            received = upper_layer.read_pdu(stream)
            if received is None or received[0] == upper_layer.ABORT:
                raise PacsUnavailable("C-GET: the association was aborted")
            if received[0] != upper_layer.P_DATA_TF:
                raise ProtocolError(f"PDU type 0x{received[0]:02X} during a C-GET")
            for message in messages.feed(received[1]):
                command = message.command
                if command.field == command_set.C_STORE_RQ:
                    _, instance_syntax = association.contexts[message.context_id]
                    status, _ = c_store(store, message, instance_syntax, self.peer.ae_title)
                    sock.sendall(upper_layer.response_pdu(message, status))
                elif command.field == command_set.C_GET_RQ | command_set.RESPONSE:
                    if command.status is None:
                        raise ProtocolError("a C-GET response without a status")
                    final = None if command.status in PENDING else command
        with suppress(OSError, ProtocolError):  # the study is in; a release the peer fumbles changes nothing
            sock.sendall(upper_layer.RELEASE_REQUEST)
            while (pdu := upper_layer.read_pdu(stream)) is not None and pdu[0] != upper_layer.RELEASE_RP:
                pass
        return _outcome(cast(int, final.status), final.completed, final.failed, "C-GET")

    def _instances(self, assoc: Association, study: dict[str, str], series: Dataset) -> Series:
        matching = {**study, "SeriesInstanceUID": str(series.SeriesInstanceUID)}
        return Series(series, unique(self._find(assoc, "IMAGE", keys.INSTANCE, matching), "SOPInstanceUID"))

    def _find(
        self, assoc: Association, level: str, return_keys: tuple[str, ...], matching: dict[str, str]
    ) -> list[Dataset]:
        answers = []
        for status, found in assoc.send_c_find(identifier(level, return_keys, matching), FIND):
            code = _status(status, "C-FIND")
            if code in PENDING and found is not None:
                answers.append(found)
            elif code != SUCCESS:
                raise PacsError(f"C-FIND at {level} level failed: status 0x{code:04X}")
        return answers

    @contextmanager
    def _association(self, contexts: list[Any]) -> Iterator[Association]:
        ae = AE(self.calling_ae)
        ae.maximum_pdu_size = 0  # no limit on the PDUs the PACS sends
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        for context in contexts:
            ae.add_requested_context(context)
        assoc = ae.associate(
            self.peer.host,
            self.peer.port,
            ae_title=self.peer.ae_title,
            evt_handlers=ASSOCIATION_HANDLERS,
            tls_args=(self.peer.tls, self.peer.host) if self.peer.tls is not None else None,
        )
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "did not answer"
            raise PacsUnavailable(f"{self.peer.ae_title} at {self.peer.host}:{self.peer.port} {why}")
        try:
            yield assoc
        finally:
            if assoc.is_established:
                assoc.release()


def _status(status: Dataset, operation: str) -> int:
    # An empty status Dataset is what pynetdicom yields when the association died.
    if "Status" not in status:
        raise PacsUnavailable(f"{operation}: the association was aborted or timed out")
    return int(status.Status)


def _sub_operations(responses: Iterator[tuple[Dataset, Dataset | None]], operation: str, unable_hint: str = "") -> int:
    """The final response's completed sub-operations, from pynetdicom's responses (a C-MOVE)."""
    for status, _ in responses:
        code = _status(status, operation)
        if code not in PENDING:
            completed = int(status.get("NumberOfCompletedSuboperations", 0) or 0)
            failed = int(status.get("NumberOfFailedSuboperations", 0) or 0)
            return _outcome(code, completed, failed, operation, unable_hint)
    raise PacsUnavailable(f"{operation}: the association ended without a final response")


def _outcome(code: int, completed: int, failed: int, operation: str, unable_hint: str = "") -> int:
    """The completed sub-operations of a final C-MOVE/C-GET response; failures raised (PS3.4 C.4.2.1.5, C.4.3.1.4).

    Warning 0xB000 with failed sub-operations is a failure here: the case needs the whole study;
    sub-operations that only warned (e.g. coerced attributes) delivered their instance.
    """
    if code == MOVE_DESTINATION_UNKNOWN:
        raise MoveDestinationUnknown(f"{operation}: the PACS does not know the move destination (0xA801)")
    if code not in (SUCCESS, WARNING):
        hint = f"; {unable_hint}" if unable_hint and code & 0xF000 == 0xC000 else ""
        raise RetrieveFailed(f"{operation} failed: status 0x{code:04X}{hint}")
    if failed:
        raise RetrieveFailed(f"{operation}: {failed} sub-operations failed, {completed} completed")
    return completed
