"""What to look for on a PACS, and how an answer becomes one :class:`Study` tree.

The order gives the keys (docs/image-linking.md): accession number, else the
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
from mappings.imaging_study import Study


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


def missing(study: Study) -> str | None:
    """What the answer lacks by its own counts (PS3.4 C.3.4 Number of ... Related ...), if anything.

    A PACS can answer a series- or instance-level query with success and fewer matches than
    the level above counted (Orthanc 1.10 does, now and then): such a tree is not the study.
    """
    series = _count(study.dataset, "NumberOfStudyRelatedSeries")
    if series is not None and len(study.series) < series:
        return f"{study.uid}: {len(study.series)} of {series} series answered"
    for s in study.series:
        instances = _count(s.dataset, "NumberOfSeriesRelatedInstances")
        if instances is not None and len(s.instances) < instances:
            series_uid = s.dataset.get("SeriesInstanceUID")
            return f"{study.uid}: {len(s.instances)} of {instances} instances of series {series_uid}"
    return None


def _count(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


__all__ = ["StudyQuery", "identifier", "keys", "missing", "unique"]
