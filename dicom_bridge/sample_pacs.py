"""A small bundled source PACS: a Query/Retrieve SCP serving pydicom's own test files.

``make demo`` runs a whole second-opinion case against it with nothing to install, and tests use
it as a fast second PACS (the real-peer tests use Orthanc). It implements the Study Root
Query/Retrieve Information Model (PS3.4 C.6.2) over the Query/Retrieve Service Class (PS3.4 C.4):

* C-ECHO (PS3.4 A.4);
* C-FIND at STUDY, SERIES and IMAGE level (C.4.1), with the matching of :mod:`dicom_bridge.matching`
  (C.2.2.2), each entity answered once, only the requested keys returned (C.4.1.2.3), the computed
  study and series attributes (C.6.2.1.1), and the matched entity's Specific Character Set;
* C-MOVE (C.4.2) to an AE title from ``destinations``, unknown ones refused with 0xA801;
* C-GET (C.4.3), the instances sent over the same association (the SCU takes the Storage SCP role);
* C-STORE (PS3.4 B.2): an instance stored here is added, like :meth:`SamplePacs.add`.

Retrieve identifiers need the unique key of their level (C.4.2.1.4); upper-level unique keys are
optional. Queries are relational-tolerant: a SERIES or IMAGE query without the upper unique keys
searches everything. Anything refused gets a failure status (0xA900 identifier does not match the
SOP Class, 0xC000 unable to process) and the association stays up.

Run it by hand::

    python -m dicom_bridge.sample_pacs --port 11113 --ae SAMPLEPACS --destination OVERREAD=127.0.0.1:11112
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import ssl
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

import pydicom
from pydicom import Dataset
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicom_bridge import tuning
from dicom_bridge.dimse import TRANSFER_SYNTAXES
from dicom_bridge.matching import matches
from dicom_bridge.tuning import ASSOCIATION_HANDLERS

LOG = logging.getLogger(__name__)

DEMO_ACCESSION = "ACC-2026-55731"
"""The accession number of the demo study (pydicom's CT_small.dcm); the demo order carries it."""
DEMO_PATIENT = "MRN-004211"
"""The demo order's patient (overread/samples/second-opinion-order.json)."""

Source = str | PathLike[str] | Dataset
"""A file path or an in-memory Dataset."""

SAMPLE_ISSUER = "OVERREAD-SAMPLES"
"""The IssuerOfPatientID (0010,0021) of every sample study: which identifier system it stands for is
the linking configuration's (``issuers``), as for any PACS; the demo maps it to its MRN system."""
_ISSUED = {"IssuerOfPatientID": SAMPLE_ISSUER}

_MR_STUDY = {  # reportsi.dcm joins the MR_small study as a second (SR) series
    "StudyInstanceUID": "1.3.6.1.4.1.5962.1.2.4.20040826185059.5457",
    "StudyID": "4MR1",
    "StudyDate": "20040826",
    "StudyTime": "185059",
    "AccessionNumber": "ACC-SAMPLE-MR",
    "PatientID": "4MR1",
    "PatientName": "CompressedSamples^MR1",
    "PatientBirthDate": "",
    "PatientSex": "F",
    **_ISSUED,
    "ReferringPhysicianName": "",
    "StudyDescription": "MR with a report",
}
SAMPLE_FILES: tuple[tuple[str, Mapping[str, Any]], ...] = (
    ("CT_small.dcm", {"AccessionNumber": DEMO_ACCESSION, "PatientID": DEMO_PATIENT, **_ISSUED}),  # CT, 1 instance
    ("MR_small.dcm", _MR_STUDY),  # MR + SR, 2 series
    ("reportsi.dcm", _MR_STUDY),
    ("rtdose_1frame.dcm", {"AccessionNumber": "ACC-SAMPLE-RT", **_ISSUED}),  # RTDOSE, implicit VR; id11111
    ("chrJapMulti.dcm", _ISSUED),  # CR, Japanese patient name (ISO 2022 IR 87), accession 2008050417172310; 2008-4
)
"""The curated default content: (bundled file name, attribute overrides)."""

VERIFICATION = UID("1.2.840.10008.1.1")
STUDY_FIND = UID("1.2.840.10008.5.1.4.1.2.2.1")  # Study Root Query/Retrieve Information Model - FIND
STUDY_MOVE = UID("1.2.840.10008.5.1.4.1.2.2.2")
STUDY_GET = UID("1.2.840.10008.5.1.4.1.2.2.3")
LEVEL_KEYS = {"STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID", "IMAGE": "SOPInstanceUID"}
"""The unique key of each Study Root level (PS3.4 C.6.2.1)."""
_LEVELS = tuple(LEVEL_KEYS)
_NOT_KEYS = {Tag("QueryRetrieveLevel"), Tag("SpecificCharacterSet")}
PENDING = 0xFF00


def sample_path(name: str) -> Path:
    """The path of a file bundled in the pydicom wheel (test_files or charset_files), never downloaded."""
    found = get_testdata_file(name, download=False) or next(iter(get_charset_files(name)), None)
    if not isinstance(found, str):
        raise FileNotFoundError(f"{name} is not bundled with pydicom")
    return Path(found)


def sample_files() -> list[tuple[Source, Mapping[str, Any]]]:
    """:data:`SAMPLE_FILES` as (path, overrides), ready for :class:`SamplePacs`."""
    return [(sample_path(name), overrides) for name, overrides in SAMPLE_FILES]


class Refused(Exception):
    """A request this SCP will not carry out, with the failure status to answer it with."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status
        self.comment = comment

    def dataset(self) -> Dataset:
        """The status as a Dataset, so the response carries an Error Comment (PS3.7 C.4)."""
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]
        return ds


@dataclass
class Instance:
    """One SOP instance: where it comes from, the overrides applied to it, and its header."""

    source: Path | Dataset
    overrides: dict[str, Any]
    header: Dataset = field(repr=False)

    @classmethod
    def load(cls, source: Source, overrides: Mapping[str, Any]) -> Instance:
        src: Path | Dataset = source if isinstance(source, Dataset) else Path(source)
        instance = cls(src, dict(overrides), Dataset())
        if isinstance(src, Dataset):
            instance.header = instance.dataset()
        else:
            instance.header = _apply(pydicom.dcmread(src, stop_before_pixels=True), instance.overrides)
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            if not instance.header.get(keyword):
                raise ValueError(f"{source!r} has no {keyword}")
        return instance

    def dataset(self) -> Dataset:
        """The whole instance with the overrides, as sent by C-MOVE and C-GET."""
        ds = copy.deepcopy(self.source) if isinstance(self.source, Dataset) else pydicom.dcmread(self.source)
        ds = _apply(ds, self.overrides)
        if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
            ds.file_meta = FileMetaDataset(getattr(ds, "file_meta", Dataset()))
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds

    @property
    def transfer_syntax(self) -> str:
        """The stored transfer syntax (a Dataset made in code is sent as Explicit VR Little Endian)."""
        return str(self.header.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))

    def uid(self, level: str) -> str:
        return str(self.header.get(LEVEL_KEYS[level], ""))


def _apply(ds: Dataset, overrides: Mapping[str, Any]) -> Dataset:
    for keyword, value in overrides.items():
        setattr(ds, keyword, value)
    return ds


class SamplePacs:
    """A Study Root Query/Retrieve SCP over an in-memory index of a few DICOM files.

    ``files`` holds paths or Datasets, or (path or Dataset, overrides) pairs; ``None`` means the
    curated :data:`SAMPLE_FILES`. ``destinations`` maps a C-MOVE destination AE title to (host, port)
    and may be changed while running; with ``tls`` it speaks DICOM TLS (PS3.15 B.9). Use as a context
    manager, or :meth:`start` and :meth:`stop`.
    """

    def __init__(
        self,
        ae_title: str = "SAMPLEPACS",
        host: str = "127.0.0.1",
        port: int = 0,
        files: Iterable[Source | tuple[Source, Mapping[str, Any]]] | None = None,
        destinations: Mapping[str, tuple[str, int]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.ae_title, self.tls = ae_title, tls
        self.host = host
        self._requested_port = port
        self.destinations: dict[str, tuple[str, int]] = dict(destinations or {})
        self._instances: list[Instance] = []
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        for item in sample_files() if files is None else files:
            source, overrides = item if isinstance(item, tuple) else (item, {})
            self.add(source, **overrides)
        self.ae = self._build_ae()

    # -- content ---------------------------------------------------------------------------------

    def add(self, source: Source, **overrides: Any) -> Dataset:
        """Add an instance (a "study arriving late"), replacing one with the same SOP Instance UID.

        ``overrides`` set attributes by keyword, e.g. ``AccessionNumber="ACC-1"``; they apply to the
        index and to what is sent on retrieve. Returns the indexed header.
        """
        instance = Instance.load(source, overrides)
        with self._lock:
            uid = instance.uid("IMAGE")
            self._instances = [known for known in self._instances if known.uid("IMAGE") != uid]
            self._instances.append(instance)
        return instance.header

    @property
    def instances(self) -> list[Instance]:
        """A snapshot of the index, in the order added."""
        with self._lock:
            return list(self._instances)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Self:
        if self._server is None:
            tuning.apply()  # pynetdicom's storage SCP role takes every storage SOP class only with it
            handlers: list[EventHandlerType] = [
                *ASSOCIATION_HANDLERS,
                (evt.EVT_C_ECHO, lambda event: 0x0000),
                (evt.EVT_C_FIND, self._on_find),
                (evt.EVT_C_MOVE, self._on_move),
                (evt.EVT_C_GET, self._on_get),
                (evt.EVT_C_STORE, self._on_store),
            ]
            self._server = self.ae.start_server(
                (self.host, self._requested_port), block=False, evt_handlers=handlers, ssl_context=self.tls
            )
        return self

    def stop(self) -> None:
        """Stop listening and abort any open association."""
        server, self._server = self._server, None
        if server is not None:
            # socketserver looks at its shutdown flag every 0.5 s; a listening socket shut down wakes it now
            with contextlib.suppress(OSError, AttributeError):
                cast(socket.socket, server.socket).shutdown(socket.SHUT_RDWR)
            server.shutdown()

    def _loopback(self) -> str:
        return "127.0.0.1" if self.host in ("", "0.0.0.0") else "::1" if self.host == "::" else self.host

    @property
    def port(self) -> int:
        """The listening port (the one picked by the system when constructed with ``port=0``)."""
        if self._server is None:
            raise RuntimeError("the sample PACS is not running")
        return int(self._server.server_address[1])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _build_ae(self) -> AE:
        ae = AE(self.ae_title)
        ae.maximum_pdu_size = 0  # no limit: fewer, larger P-DATA PDUs
        for uid in (VERIFICATION, STUDY_FIND, STUDY_MOVE, STUDY_GET):
            ae.add_supported_context(uid)
        for cx in AllStoragePresentationContexts:  # C-GET: accept the SCU's Storage SCP role (PS3.4 C.4.3)
            ae.add_supported_context(cast(UID, cx.abstract_syntax), TRANSFER_SYNTAXES, scu_role=False, scp_role=True)
        return ae

    # -- C-FIND (PS3.4 C.4.1) -------------------------------------------------------------------

    def find(self, identifier: Dataset) -> list[Dataset]:
        """The C-FIND responses' identifiers for a request identifier; raises :class:`Refused`."""
        level = _level(identifier)
        instances = self.instances
        studies = _group(instances, "STUDY")
        series = _group(instances, "SERIES")
        found = []
        for uid, members in _group(instances, level).items():
            first = members[0]
            computed = _computed(level, studies[first.uid("STUDY")], series[first.uid("SERIES")])
            if all(
                matches(key, computed[key.keyword] if key.keyword in computed else first.header.get(key.tag))
                for key in identifier
                if key.tag not in _NOT_KEYS
            ):
                found.append(self._answer(identifier, level, first.header, computed))
            LOG.debug("C-FIND %s %s: %d instance(s)", level, uid, len(members))
        return found

    def _answer(self, identifier: Dataset, level: str, header: Dataset, computed: dict[str, DataElement]) -> Dataset:
        """Only the requested keys (C.4.1.2.3), in the matched entity's character set."""
        answer = Dataset()
        if "SpecificCharacterSet" in header:
            answer.SpecificCharacterSet = header.SpecificCharacterSet
        answer.QueryRetrieveLevel = level
        for key in identifier:
            if key.tag in _NOT_KEYS:
                continue
            if key.keyword in computed:
                answer.add(computed[key.keyword])
            elif key.keyword == "RetrieveAETitle":
                answer.RetrieveAETitle = self.ae_title
            elif key.tag in header:
                answer.add(copy.deepcopy(header[key.tag]))
            else:
                answer.add(DataElement(key.tag, key.VR, [] if key.VR == "SQ" else None))
        return answer

    def _on_find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        try:
            answers = self.find(event.identifier)
        except Refused as refused:
            LOG.info("C-FIND refused: %s", refused.comment)
            yield refused.dataset(), None
            return
        except Exception as exc:
            LOG.warning("C-FIND failed: %r", exc)
            yield Refused(0xC000, f"Unable to process: {exc!r}").dataset(), None
            return
        for answer in answers:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield PENDING, answer

    # -- C-MOVE and C-GET (PS3.4 C.4.2, C.4.3) ------------------------------------------------------

    def retrieve(self, identifier: Dataset) -> list[Instance]:
        """The instances a C-MOVE or C-GET identifier asks for (C.4.2.1.4); raises :class:`Refused`."""
        level = _level(identifier)
        keys = [LEVEL_KEYS[upper] for upper in _LEVELS[: _LEVELS.index(level) + 1]]
        if not identifier.get(LEVEL_KEYS[level]):
            raise Refused(0xA900, f"{LEVEL_KEYS[level]} is required at {level} level")
        wanted = [identifier[keyword] for keyword in keys if keyword in identifier]
        return [i for i in self.instances if all(matches(key, i.header.get(key.tag)) for key in wanted)]

    def _on_move(self, event: Event) -> Iterator[Any]:
        destination = self.destinations.get((event.move_destination or "").strip())
        if destination is None:
            LOG.info("C-MOVE to unknown destination %r", event.move_destination)
            yield None, None  # pynetdicom answers 0xA801, Move Destination unknown
            return
        try:
            instances = self.retrieve(event.identifier)
        except Exception as exc:
            # pynetdicom takes a failure status only once the sub-association is open, so a refusal
            # opens one to ourselves (Verification) rather than bother the destination
            yield self._loopback(), self.port, {"contexts": _contexts([]), "evt_handlers": ASSOCIATION_HANDLERS}
            yield 1
            yield self._refusal("C-MOVE", exc), None
            return
        yield (*destination, {"contexts": _contexts(instances), "evt_handlers": ASSOCIATION_HANDLERS})
        yield from self._sub_operations(event, instances)

    def _on_get(self, event: Event) -> Iterator[Any]:
        try:
            instances = self.retrieve(event.identifier)
        except Exception as exc:
            yield 1
            yield self._refusal("C-GET", exc), None
            return
        yield from self._sub_operations(event, instances)

    def _sub_operations(self, event: Event, instances: list[Instance]) -> Iterator[Any]:
        yield len(instances)
        for instance in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield PENDING, instance.dataset()

    @staticmethod
    def _refusal(service: str, exc: Exception) -> Dataset:
        refused = exc if isinstance(exc, Refused) else Refused(0xC000, f"Unable to process: {exc!r}")
        (LOG.info if isinstance(exc, Refused) else LOG.warning)("%s refused: %s", service, refused.comment)
        return refused.dataset()

    # -- C-STORE (PS3.4 B.2) ------------------------------------------------------------------------

    def _on_store(self, event: Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.add(ds)
        return 0x0000


def _level(identifier: Dataset) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVEL_KEYS:
        raise Refused(0xA900, f"Unsupported Query/Retrieve Level {level!r}")
    return level


def _group(instances: Iterable[Instance], level: str) -> dict[str, list[Instance]]:
    groups: dict[str, list[Instance]] = {}
    for instance in instances:
        groups.setdefault(instance.uid(level), []).append(instance)
    return groups


def _computed(level: str, study: list[Instance], series: list[Instance]) -> dict[str, DataElement]:
    """The attributes a PACS computes rather than stores (PS3.4 C.6.2.1.1 and C.6.2.1.2)."""

    def distinct(keyword: str) -> list[str]:
        return list(dict.fromkeys(str(i.header.get(keyword, "")) for i in study if i.header.get(keyword)))

    computed = {
        "ModalitiesInStudy": DataElement("ModalitiesInStudy", "CS", distinct("Modality")),
        "SOPClassesInStudy": DataElement("SOPClassesInStudy", "UI", distinct("SOPClassUID")),
        "NumberOfStudyRelatedSeries": DataElement(
            "NumberOfStudyRelatedSeries", "IS", len(distinct("SeriesInstanceUID"))
        ),
        "NumberOfStudyRelatedInstances": DataElement("NumberOfStudyRelatedInstances", "IS", len(study)),
    }
    if level != "STUDY":
        computed["NumberOfSeriesRelatedInstances"] = DataElement("NumberOfSeriesRelatedInstances", "IS", len(series))
    return computed


def _contexts(instances: Iterable[Instance]) -> list[PresentationContext]:
    """C-MOVE sub-association contexts: each SOP Class in its stored transfer syntax or uncompressed."""
    syntaxes: dict[str, list[str]] = {}
    for instance in instances:
        found = syntaxes.setdefault(str(instance.header.SOPClassUID), [])
        for uid in (instance.transfer_syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if uid not in found:
                found.append(uid)
    if not syntaxes:
        syntaxes[VERIFICATION] = [ImplicitVRLittleEndian]
    return [build_context(sop_class, found) for sop_class, found in list(syntaxes.items())[:128]]


def main(argv: list[str] | None = None) -> None:
    """``python -m dicom_bridge.sample_pacs``: serve the sample files until interrupted."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m dicom_bridge.sample_pacs", description="A small bundled source PACS (Study Root Q/R SCP)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11113)
    parser.add_argument("--ae", default="SAMPLEPACS", help="our AE title")
    parser.add_argument(
        "--destination", action="append", default=[], metavar="AE=HOST:PORT", help="a C-MOVE destination (repeatable)"
    )
    args = parser.parse_args(argv)
    destinations = {}
    for item in args.destination:
        title, _, address = item.partition("=")
        host, _, port = address.rpartition(":")
        if not (title and host and port.isdigit()):
            parser.error(f"--destination {item!r} is not AE=HOST:PORT")
        destinations[title] = (host, int(port))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    with SamplePacs(args.ae, args.host, args.port, destinations=destinations) as pacs:
        studies = len(_group(pacs.instances, "STUDY"))
        print(
            f"{pacs.ae_title} on {pacs.host}:{pacs.port}: {studies} studies; demo accession {DEMO_ACCESSION}",
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()


if __name__ == "__main__":
    main()
