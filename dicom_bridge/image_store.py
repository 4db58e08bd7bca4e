"""The local image store: retrieved and pushed instances as Part 10 files on disk.

Layout ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: the same
instance received twice (a retried C-MOVE, a push after a retrieve) is one file.
Files are written to a temporary name and renamed, so a crash never leaves half a file.

``<root>/.index/<key>/<hex of the value>/<StudyInstanceUID>`` (empty files; key ``accession`` or
``patient``) says which studies have that accession number or patient id, so that a query by
either reads the few studies it names, not one file of every study on disk. A study's entries
are written before its first file, so no study is on disk without them; an entry whose study
never arrived is skipped. The first query of a store indexes what it already holds (a store
from before the index) and leaves ``.index/built``.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import threading
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import UID as TransferSyntax

from dicom_bridge.part10 import Header, file_meta, header
from dicom_bridge.query import StudyQuery
from mappings.imaging_study import Series, Study

#: A UID (PS3.5 9.1): dot-separated runs of ASCII digits, at most 64 characters. Checked before a UID
#: becomes a path or URL segment: ``..`` or ``²`` pass a digits-and-dots test but are not UIDs.
UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_uid(value: str) -> bool:
    return len(value) <= 64 and UID.fullmatch(value) is not None


class StoreFull(OSError):
    """Writing the file would leave less free space than the store's floor (a C-STORE answers 0xA700)."""


class ImageStore:
    """``min_free``: bytes of the file system to leave free; a file that would go below is refused."""

    def __init__(self, root: Path, min_free: int = 0) -> None:
        self.root, self.min_free = root, min_free

    def path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            # What a peer or an order calls a UID ("..", "../x") must not become a path.
            if not is_uid(uid):
                raise ValueError(f"not a DICOM UID: {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def keep(self, data: bytes, sop_class: str, sop_uid: str, transfer_syntax: str) -> Header:
        """Keep a data set a Storage SCP received, as its Part 10 file; its study, series and accession.

        The bytes are written as received behind their file meta, and only the header is
        decoded: decoding (and re-encoding) every element of every instance cost more than the
        rest of the store (docs/performance.md).
        """
        meta = file_meta(sop_class, sop_uid, transfer_syntax)
        syntax = TransferSyntax(transfer_syntax)
        found = header(data, syntax.is_implicit_VR) if syntax.is_little_endian and not syntax.is_deflated else None
        if found is None:  # what the walk leaves to pydicom (big endian, deflate, sequences first)
            ds = dcmread(io.BytesIO(meta + data), stop_before_pixels=True, specific_tags=HEADER)
            found = Header(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.get("AccessionNumber") or ""))
        self.write(found.study_uid, found.series_uid, sop_uid, meta + data)
        return found

    def write(self, study_uid: str, series_uid: str, sop_uid: str, part10: bytes) -> Path:
        """Write an encoded Part 10 file as it is (what a Storage SCP received: no re-encoding)."""
        target = self.path(study_uid, series_uid, sop_uid)
        self._room(len(part10))
        if not target.parent.parent.is_dir():  # the study's first instance: index it first
            header = dcmread(io.BytesIO(part10), stop_before_pixels=True, specific_tags=INDEXED, force=True)
            self._index(study_uid, header)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Unique per process and thread: the Storage SCP serves associations on threads of
        # its own, and two of them (a push and a C-MOVE) may bring the same instance at once.
        partial = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.part")
        partial.write_bytes(part10)
        partial.replace(target)
        return target

    def _room(self, size: int) -> None:
        """Refuse a file of ``size`` bytes that would take the file system below ``min_free``."""
        if not self.min_free:
            return
        folder = self.root
        while not folder.exists() and folder != folder.parent:  # a store not created yet: its file system
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if free - size < self.min_free:
            raise StoreFull(f"the image store keeps {self.min_free} bytes free and has {free}")

    def count(self, study_uid: str) -> int:
        """How many instances of the study are on disk."""
        folder = self.root / study_uid if is_uid(study_uid) else None
        return sum(1 for _ in folder.glob("*/*.dcm")) if folder is not None and folder.is_dir() else 0

    def find(self, query: StudyQuery) -> list[Study]:
        """Studies on disk that match ``query`` (pushed to us, or retrieved for another case).

        The index names the candidate studies of an accession or patient query; one header of
        each (no pixel data) decides the match, since a study's accession number and patient
        are the same in all its instances, and only a match has all its files listed and read.
        """
        keys = query.matching_keys()
        if "StudyInstanceUID" in keys:  # the order's identifier, not to be trusted as a path
            folders = [self.root / query.study_uid] if is_uid(query.study_uid) else []
        else:
            key, value = ("accession", query.accession) if query.accession else ("patient", query.patient_id)
            folders = [self.root / uid for uid in self._indexed(key, value)]
        found = []
        for folder in folders:
            first = next(folder.glob("*/*.dcm"), None)  # None: an entry whose study never arrived
            if first is not None and _matches(dcmread(first, stop_before_pixels=True), query):
                found.append(_tree([dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*/*.dcm"))]))
        return found

    def _index(self, study_uid: str, ds: Dataset) -> None:
        for key, keyword in INDEX_KEYS.items():
            if value := str(ds.get(keyword) or ""):
                entry = self.root / INDEX / key / value.encode().hex() / study_uid
                entry.parent.mkdir(parents=True, exist_ok=True)
                entry.touch()

    def _indexed(self, key: str, value: str) -> list[str]:
        """The studies the index names for ``key`` = ``value``, after indexing a store that had none."""
        built = self.root / INDEX / "built"
        if not built.exists() and self.root.is_dir():  # once per store; a crash midway starts it again
            for folder in sorted(p for p in self.root.iterdir() if is_uid(p.name)):
                if (first := next(folder.glob("*/*.dcm"), None)) is not None:
                    self._index(folder.name, dcmread(first, stop_before_pixels=True, specific_tags=INDEXED))
            built.parent.mkdir(parents=True, exist_ok=True)
            built.touch()
        entries = self.root / INDEX / key / value.encode().hex()
        return sorted(p.name for p in entries.iterdir() if is_uid(p.name)) if value and entries.is_dir() else []


#: The index's keys and the attributes they come from; the folder of the index (not a UID: never a study).
INDEX_KEYS = {"accession": "AccessionNumber", "patient": "PatientID"}
INDEXED = list(INDEX_KEYS.values())
HEADER = ["AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID"]
INDEX = ".index"


def _matches(ds: Dataset, query: StudyQuery) -> bool:
    """The study-level match of PS3.4 C.2.2.2 for the keys an order gives (modality aside)."""
    if query.accession:
        return str(ds.get("AccessionNumber") or "") == query.accession
    if query.study_uid:
        return True  # the folder is the study
    if str(ds.get("PatientID") or "") != query.patient_id:
        return False
    date = str(ds.get("StudyDate") or "")
    start, dash, end = query.study_date.partition("-")
    if not dash:
        return not start or date == start
    return (not start or date >= start) and (not end or date <= end)


def _tree(instances: list[Dataset]) -> Study:
    """Group full headers the way a study/series/instance query would answer."""
    series: dict[str, Series] = {}
    for ds in instances:
        series.setdefault(str(ds.SeriesInstanceUID), Series(ds)).instances.append(ds)
    return Study(instances[0], list(series.values()))
