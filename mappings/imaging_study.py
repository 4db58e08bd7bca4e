"""DICOM query results → FHIR R4 ImagingStudy (a pure mapping: datasets in, JSON out).

The input is what a Study Root query answers (PS3.4 C.6.2: study, series and
composite-instance levels), already de-duplicated and grouped by the caller
(``dicom_bridge``): one :class:`Study` with its :class:`Series` and their instances.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydicom import Dataset

Json = dict[str, Any]


@dataclass
class Series:
    """A series-level C-FIND / QIDO-RS answer and the instance-level answers under it."""

    dataset: Dataset
    instances: list[Dataset] = field(default_factory=list)


@dataclass
class Study:
    """A study-level answer and its series."""

    dataset: Dataset
    series: list[Series] = field(default_factory=list)

    @property
    def uid(self) -> str:
        return str(self.dataset.StudyInstanceUID)


def imaging_study(
    study: Study,
    *,
    subject: str,
    based_on: list[str],
    endpoints: list[str] = (),  # type: ignore[assignment]
) -> Json:
    """The ImagingStudy of ``study`` (TODO: being written)."""
    raise NotImplementedError
