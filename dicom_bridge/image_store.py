"""The local image store: retrieved and pushed instances as Part 10 files on disk.

Layout ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``: the same
instance received twice (a retried C-MOVE, a push after a retrieve) is one file.
Files are written to a temporary name and renamed, so a crash never leaves half a file.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydicom import Dataset
from pydicom.dataset import FileMetaDataset


class ImageStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            # A UID is digits and dots; anything else (a peer's "../x") must not become a path.
            if not uid or not all(c.isdigit() or c == "." for c in uid):
                raise ValueError(f"not a DICOM UID: {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def put(self, ds: Dataset, file_meta: FileMetaDataset | None = None) -> Path:
        """Write ``ds`` (with ``file_meta`` when given, e.g. from a C-STORE request)."""
        target = self.path(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        target.parent.mkdir(parents=True, exist_ok=True)
        if file_meta is not None:
            ds.file_meta = file_meta
        partial = target.with_suffix(f".{os.getpid()}.part")
        ds.save_as(partial, enforce_file_format=True)
        partial.replace(target)
        return target

    def count(self, study_uid: str) -> int:
        """How many instances of the study are on disk."""
        folder = self.root / study_uid
        return sum(1 for _ in folder.glob("*/*.dcm")) if folder.is_dir() else 0
