"""What to look for on a PACS, and how an answer becomes one :class:`Study` tree.

The order gives the keys (ARCHITECTURE.md, "Images linked"): accession number, else the
Study Instance UID, else patient id + study date + modality. Every door (C-FIND,
QIDO-RS) asks level by level (PS3.4 C.6.2: study, then series, then instance) and
de-duplicates by UID, because some PACS (pynetdicom's own qrscp) answer a study-level
query once per instance.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import Dataset

from dicom_bridge import keys


@dataclass(frozen=True)
class StudyQuery:
    accession: str = ""
    study_uid: str = ""
    patient_id: str = ""
    study_date: str = ""  # DA or a DA range (PS3.4 C.2.2.2.5), e.g. "20260101-20260131"
    modality: str = ""

    def __bool__(self) -> bool:
        return bool(self.accession or self.study_uid or self.patient_id)

    def matching_keys(self) -> dict[str, str]:
        """The study-level matching keys: the most specific key the order has, and only it."""
        if self.accession:
            return {"AccessionNumber": self.accession}
        if self.study_uid:
            return {"StudyInstanceUID": self.study_uid}
        found = {"PatientID": self.patient_id}
        if self.study_date:
            found["StudyDate"] = self.study_date
        if self.modality:
            found["ModalitiesInStudy"] = self.modality
        return found


def identifier(level: str, return_keys: Iterable[str], matching: dict[str, str]) -> Dataset:
    """A C-FIND identifier: every return key empty (PS3.4 C.2.2.1.3), then the matching keys."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in return_keys:
        if keyword != "SpecificCharacterSet":
            setattr(ds, keyword, [] if keyword.endswith("Sequence") else "")
    for keyword, value in matching.items():
        setattr(ds, keyword, value)
    return ds


def unique(answers: Iterable[Dataset], uid: str) -> list[Dataset]:
    """The first answer of each ``uid`` (a keyword such as "SeriesInstanceUID"), in order."""
    seen: dict[str, Dataset] = {}
    for ds in answers:
        value = str(ds.get(uid, ""))
        if value and value not in seen:
            seen[value] = ds
    return list(seen.values())


__all__ = ["StudyQuery", "identifier", "keys", "unique"]
