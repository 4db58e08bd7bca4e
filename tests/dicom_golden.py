"""The golden-file cases of the ImagingStudy mapping: Study trees built from pydicom's bundled test files.

Each level's dataset carries only the attributes ``dicom_bridge.keys`` asks for at that level, copied as the
file's undecoded (raw) elements, so pydicom decodes them from the answer's SpecificCharacterSet exactly as it
does a C-FIND identifier that pynetdicom received. Values a file lacks but a PACS would compute or hold
(counts, ModalitiesInStudy, accession numbers) are added per case and say so.
"""

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from dicom_bridge import keys
from mappings.imaging_study import Series, Study, imaging_study

GOLDEN = Path(__file__).parent / "golden" / "dicom"
SUBJECT = "Patient/p-1"
BASED_ON = ["ServiceRequest/sr-1"]
ENDPOINTS = ("Endpoint/pacs",)
#: The charset test files (pydicom's charset_files, all in the wheel) and the name each holds, decoded.
CHARSETS = {
    "chrX1": "Wang^XiaoDong=王^小東=",  # the trailing "=" is in the file
    "chrGerm": "Äneas^Rüdiger",
    "chrFren": "Buc^Jérôme",
    "chrJapMulti": "やまだ^たろう",
    "chrKoreanMulti": "김희중",
    "chrRuss": "Люкceмбypг",  # noqa: RUF001 (the file mixes Latin c, e, y, p into the Cyrillic)
    "chrGreek": "Διονυσιος",
    "chrArab": "قباني^لنزار",
    "chrHbrw": "שרון^דבורה",
}


def source(name: str) -> Dataset:
    """A bundled pydicom test file's header (never one pydicom would download)."""
    path = get_testdata_file(name, download=False) or get_charset_files(name)[0]
    return dcmread(path, stop_before_pixels=True)


def answer(src: Dataset, level: Iterable[str], **values: Any) -> Dataset:
    """A query answer at one level: the level's keys the file has, raw as read, then ``values`` set on top."""
    ds = Dataset()
    for keyword in level:
        if keyword in src:
            ds[Tag(keyword)] = src.get_item(keyword)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def raw_as(src: Dataset, keyword: str, target: str) -> RawDataElement:
    """The undecoded bytes of ``keyword`` under the tag and VR of ``target`` (to route a name into a field)."""
    raw = src.get_item(keyword)
    assert isinstance(raw, RawDataElement), f"{keyword} was already decoded"
    return raw._replace(tag=Tag(target), VR=dictionary_VR(target))


def code(value: str, designator: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, designator, meaning
    return item


def ct_small() -> tuple[Study, dict[str, Any]]:
    """One series, one instance; the file's TimezoneOffsetFromUTC rides along as a PACS may return it."""
    ct = source("CT_small.dcm")
    study = answer(ct, (*keys.STUDY, "TimezoneOffsetFromUTC"), ModalitiesInStudy="CT")
    study.NumberOfStudyRelatedSeries, study.NumberOfStudyRelatedInstances = 1, 1
    series = Series(answer(ct, keys.SERIES), [answer(ct, keys.INSTANCE)])
    return Study(study, [series]), {"endpoints": ENDPOINTS}


def mr_two_series() -> tuple[Study, dict[str, Any]]:
    """MR_small plus a made-up second series, given in reverse order; no offset in the answers, ``tz`` given."""
    mr = source("MR_small.dcm")
    study = answer(
        mr,
        keys.STUDY,
        AccessionNumber="A-20040826-1",
        ModalitiesInStudy="MR",
        ReferringPhysicianName="Doe^Jane^Q^Dr.^MD",
        ProcedureCodeSequence=[code("241615005", "SRT", "MRI of brain"), code("MRBRAIN", "99OVR", "MR brain")],
    )
    first = Series(answer(mr, keys.SERIES, BodyPartExamined="BRAIN"), [answer(mr, keys.INSTANCE)])
    uid = f"{mr.SeriesInstanceUID}.2"
    second = answer(
        mr,
        keys.SERIES,
        SeriesInstanceUID=uid,
        SeriesNumber=2,
        SeriesDescription="Knee, copy of series 1",
        BodyPartExamined="KNEE",
        Laterality="L",
        SeriesDate="20040826",
        SeriesTime="190102.25",
    )
    instances = [
        answer(mr, keys.INSTANCE, SeriesInstanceUID=uid, SOPInstanceUID=f"{uid}.{n}", InstanceNumber=n) for n in (2, 1)
    ]
    instances[0].ContentLabel = "LOCALIZER"
    return Study(study, [Series(second, instances), first]), {"tz": "America/New_York"}


def modalities_derived() -> tuple[Study, dict[str, Any]]:
    """No ModalitiesInStudy nor study counts: both come from the series (an SR series re-filed under CT)."""
    ct, sr = source("CT_small.dcm"), source("test-SR.dcm")
    study = answer(ct, keys.STUDY)
    ct_series = Series(answer(ct, keys.SERIES), [answer(ct, keys.INSTANCE)])
    sr_series = Series(
        answer(sr, keys.SERIES, StudyInstanceUID=ct.StudyInstanceUID),
        [answer(sr, keys.INSTANCE, StudyInstanceUID=ct.StudyInstanceUID)],
    )
    # Not listed at instance level, only counted by the PACS; the body part is not a defined term.
    counted = answer(ct, keys.SERIES, SeriesInstanceUID=f"{ct.SeriesInstanceUID}.9", BodyPartExamined="LEFTLEG")
    del counted.SeriesNumber
    counted.NumberOfSeriesRelatedInstances = 3
    based_on = [*BASED_ON, "ServiceRequest/sr-2", *BASED_ON]
    return Study(study, [ct_series, Series(counted), sr_series]), {"based_on": based_on}


def charset(name: str) -> Callable[[], tuple[Study, dict[str, Any]]]:
    """The file's PatientName routed, undecoded, into ReferringPhysicianName and StudyDescription."""

    def build() -> tuple[Study, dict[str, Any]]:
        src = source(f"{name}.dcm")
        study = answer(src, keys.STUDY)
        study[Tag("ReferringPhysicianName")] = raw_as(src, "PatientName", "ReferringPhysicianName")
        study[Tag("StudyDescription")] = raw_as(src, "PatientName", "StudyDescription")
        return Study(study, [Series(answer(src, keys.SERIES), [answer(src, keys.INSTANCE)])]), {}

    return build


CASES: dict[str, Callable[[], tuple[Study, dict[str, Any]]]] = {
    "ct_small": ct_small,
    "mr_two_series": mr_two_series,
    "modalities_derived": modalities_derived,
    **{f"charset-{name}": charset(name) for name in CHARSETS},
}


def mapped(case: str) -> dict[str, Any]:
    study, options = CASES[case]()
    options = {"subject": SUBJECT, "based_on": BASED_ON, **options}
    return imaging_study(study, **options)


def dump(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
