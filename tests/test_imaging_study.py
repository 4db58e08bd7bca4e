"""DICOM query answers → R4 ImagingStudy: golden files, validity, and the rules of the mapping.

Regenerate the goldens after an intended mapping change with
``OVERREAD_UPDATE_GOLDEN=1 pytest tests/test_imaging_study.py`` and review the diff.
"""

import json
import os
from typing import Any

import pytest
from fhir.resources.R4B.imagingstudy import ImagingStudy
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from fhir_server.validation import validate
from mappings.imaging_study import Series, Study, imaging_study
from tests.dicom_golden import CASES, CHARSETS, GOLDEN, dump, mapped

UPDATE = os.environ.get("OVERREAD_UPDATE_GOLDEN") == "1"
UID = "1.2.826.0.1.3680043.8.498.1"
CT_STUDY_UID = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """Valid as fhir.resources R4B and as the server validates a write."""
    ImagingStudy.model_validate(resource)
    return validate(resource, "ImagingStudy")


def study_ds(**values: Any) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = UID
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def series_ds(number: Any = None, uid: str = f"{UID}.1", modality: str = "CT", **values: Any) -> Dataset:
    ds = Dataset()
    ds.SeriesInstanceUID, ds.Modality = uid, modality
    if number is not None:
        ds.SeriesNumber = number
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def instance_ds(uid: str, number: Any = None) -> Dataset:
    ds = Dataset()
    ds.SOPInstanceUID, ds.SOPClassUID = uid, "1.2.840.10008.5.1.4.1.1.2"
    if number is not None:
        ds.InstanceNumber = number
    return ds


def raw(keyword: str, value: bytes) -> RawDataElement:
    """A value as it comes off the wire, for malformed input pydicom would refuse to set."""
    vr = {"SeriesNumber": "IS", "NumberOfStudyRelatedSeries": "IS", "StudyDate": "DA"}[keyword]
    return RawDataElement(Tag(keyword), vr, len(value), value, 0, True, True)


def mapping(study: Study, **options: Any) -> dict[str, Any]:
    return valid(imaging_study(study, subject="Patient/p", based_on=["ServiceRequest/s"], **options))


@pytest.mark.parametrize("case", list(CASES))
def test_case_maps_to_its_golden_file(case: str):
    result = mapped(case)
    expected = GOLDEN / f"{case}.json"
    if UPDATE:
        expected.write_text(dump(result), encoding="utf-8")
    assert result == json.loads(expected.read_text(encoding="utf-8"))
    valid(result)


def test_every_golden_file_has_a_case():
    assert {path.stem for path in GOLDEN.glob("*.json")} == set(CASES)


@pytest.mark.parametrize("name", list(CHARSETS))
def test_names_are_decoded_by_their_character_set(name: str):
    result = mapped(f"charset-{name}")
    assert result["description"] == CHARSETS[name]
    family, _, given = CHARSETS[name].split("=")[0].partition("^")
    assert result["referrer"] == {"display": f"{given} {family}".strip()}


def test_ct_small_golden_content():
    result = mapped("ct_small")
    assert result["identifier"] == [{"system": "urn:dicom:uid", "value": "urn:oid:" + CT_STUDY_UID}]
    assert result["started"] == "2004-01-19T07:27:30-05:00"
    assert result["series"][0]["started"] == "1997-04-30T11:27:49-05:00"
    assert result["endpoint"] == [{"reference": "Endpoint/pacs"}]
    assert "referrer" not in result  # the file's ReferringPhysicianName is empty


def test_two_series_are_sorted_and_fully_mapped():
    result = mapped("mr_two_series")
    assert [s["number"] for s in result["series"]] == [1, 2]
    second = result["series"][1]
    assert [i["number"] for i in second["instance"]] == [1, 2]
    assert second["instance"][1]["title"] == "LOCALIZER"
    assert second["bodySite"] == {"system": "http://snomed.info/sct", "code": "72696002", "display": "Knee"}
    assert second["laterality"]["code"] == "7771000"
    assert second["started"] == "2004-08-26T19:01:02.25-04:00"  # EDT from the tz keyword
    assert result["referrer"] == {"display": "Dr. Jane Q Doe MD"}
    assert {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
            "value": "A-20040826-1"} in result["identifier"]  # fmt: skip
    systems = [p["coding"][0]["system"] for p in result["procedureCode"]]
    assert systems == ["http://snomed.info/sct", "urn:dicom:coding-scheme:99OVR"]
    assert (result["numberOfSeries"], result["numberOfInstances"]) == (2, 3)


def test_modalities_and_counts_come_from_the_series():
    result = mapped("modalities_derived")
    assert [m["code"] for m in result["modality"]] == ["SR", "CT"]  # in series order: SR sorts first by uid
    assert (result["numberOfSeries"], result["numberOfInstances"]) == (3, 5)
    assert result["series"][-1]["bodySite"] == {"display": "LEFTLEG"}
    assert "number" not in result["series"][-1]
    assert result["basedOn"] == [{"reference": "ServiceRequest/sr-1"}, {"reference": "ServiceRequest/sr-2"}]
    assert result["started"] == "2004-01-19T07:27:30-05:00"  # the offset the answer carries (TimezoneOffsetFromUTC)


def test_minimal_study_has_no_empty_elements():
    result = mapping(Study(study_ds(AccessionNumber="", StudyDescription="", ReferringPhysicianName="^^^^")))
    assert result == {
        "resourceType": "ImagingStudy",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{UID}"}],
        "status": "available",
        "subject": {"reference": "Patient/p"},
        "basedOn": [{"reference": "ServiceRequest/s"}],
    }


@pytest.mark.parametrize("values", [{}, {"StudyInstanceUID": ""}])
def test_a_study_without_uid_is_refused(values: dict[str, Any]):
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        imaging_study(Study(ds), subject="Patient/p", based_on=[])


def test_a_series_without_modality_is_refused():
    series = Dataset()
    series.SeriesInstanceUID = f"{UID}.1"
    with pytest.raises(ValueError, match="Modality"):
        imaging_study(Study(study_ds(), [Series(series)]), subject="Patient/p", based_on=[])


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_malformed_numbers_are_dropped():
    study = study_ds()
    study[Tag("NumberOfStudyRelatedSeries")] = raw("NumberOfStudyRelatedSeries", b"many")
    series = series_ds()
    series[Tag("SeriesNumber")] = raw("SeriesNumber", b"x1 ")
    result = mapping(Study(study, [Series(series, [instance_ds(f"{UID}.1.1", "-3")])]))
    assert "number" not in result["series"][0]
    assert "number" not in result["series"][0]["instance"][0]
    assert result["numberOfSeries"] == 1  # counted instead


@pytest.mark.filterwarnings("ignore:Invalid value for VR")
@pytest.mark.parametrize(
    ("date", "time", "values", "tz", "expected"),
    [
        ("20240131", "", {}, None, "2024-01-31"),
        ("20240131", "0930", {}, None, "2024-01-31"),
        ("20240131", "0930", {}, "Europe/Berlin", "2024-01-31T09:30:00+01:00"),
        ("20240731", "09", {}, "Europe/Berlin", "2024-07-31T09:00:00+02:00"),
        ("20240731", "093005.123456", {"TimezoneOffsetFromUTC": "-0330"}, "Europe/Berlin",
         "2024-07-31T09:30:05.123456-03:30"),
        ("2024.07.31", "09:30:05", {"TimezoneOffsetFromUTC": "+0000"}, None, "2024-07-31T09:30:05+00:00"),
        ("20240131", "0930", {"TimezoneOffsetFromUTC": "+1500"}, None, "2024-01-31"),
        ("20240731", "2561", {"TimezoneOffsetFromUTC": "+0100"}, None, "2024-07-31"),
        ("20240732", "0930", {}, "UTC", None),
        ("", "0930", {}, "UTC", None),
    ],
)  # fmt: skip
def test_started(date: str, time: str, values: dict[str, str], tz: str | None, expected: str | None):
    study = study_ds(StudyTime=time, **values)
    study[Tag("StudyDate")] = raw("StudyDate", date.encode())
    assert mapping(Study(study), tz=tz).get("started") == expected


def test_series_offset_falls_back_to_the_study():
    series = series_ds(SeriesDate="20240131", SeriesTime="101010")
    result = mapping(Study(study_ds(TimezoneOffsetFromUTC="+0900"), [Series(series)]))
    assert result["series"][0]["started"] == "2024-01-31T10:10:10+09:00"


def test_sorting_is_by_number_then_uid_with_unnumbered_last():
    series = [series_ds(None, f"{UID}.5"), series_ds("2", f"{UID}.4"), series_ds("2", f"{UID}.3"), series_ds(1)]
    result = mapping(Study(study_ds(), [Series(s) for s in series]))
    assert [s["uid"] for s in result["series"]] == [f"{UID}.1", f"{UID}.3", f"{UID}.4", f"{UID}.5"]


def test_procedure_codes_and_endpoints():
    items = []
    for value, designator in [("1", "DCM"), ("2", "LN"), ("3", "RADLEX"), ("4", ""), ("", "LN")]:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator = value, designator
        items.append(item)
    study = study_ds(ProcedureCodeSequence=items)
    result = mapping(Study(study), endpoints=["Endpoint/a", "Endpoint/b", "Endpoint/a"])
    assert [c["coding"][0] for c in result["procedureCode"]] == [
        {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "1"},
        {"system": "http://loinc.org", "code": "2"},
        {"system": "http://www.radlex.org", "code": "3"},
        {"code": "4"},
    ]
    assert result["endpoint"] == [{"reference": "Endpoint/a"}, {"reference": "Endpoint/b"}]
