"""The patient match rule (cases.patient_match): identifiers with their issuer, else name + birth
date + sex, under each mode; pure functions over FHIR Patients and DICOM datasets."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom import Dataset

from cases.patient_match import MatchRule, matches, name_key, of_dicom, of_patient
from overread.config import Linking, OverreadConfig, PacsPeer
from tests.builders import MRN_SYSTEM, patient

ISSUERS = {"STOLAV": MRN_SYSTEM, "OTHER-SITE": "urn:oid:1.2.3.4"}


def dicom(**attributes: Any) -> Dataset:
    ds = Dataset()
    defaults = {
        "PatientID": "MRN-100234",
        "IssuerOfPatientID": "STOLAV",
        "PatientName": "Haugen^Ingrid",
        "PatientBirthDate": "19610417",
        "PatientSex": "F",
    }
    for keyword, value in {**defaults, **attributes}.items():
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def other_ids(*pairs: tuple[str, str | None]) -> list[Dataset]:
    items = []
    for value, issuer in pairs:
        item = Dataset()
        item.PatientID = value
        if issuer:
            item.IssuerOfPatientID = issuer
        items.append(item)
    return items


ORDER = of_patient(patient("MRN-100234"))


def study_matches(mode: str = "strict", issuers: dict[str, str] = ISSUERS, **attributes: Any) -> bool:
    return matches(ORDER, of_dicom(dicom(**attributes), issuers), mode)  # type: ignore[arg-type]


def test_the_patient_id_with_a_mapped_issuer_matches_whatever_the_demographics():
    assert study_matches(PatientName="Somebody^Else", PatientBirthDate="", PatientSex="")


def test_the_same_identifier_system_with_another_value_never_matches():
    assert not study_matches(PatientID="MRN-888")  # same name, birth date and sex: still not linked


def test_an_unmapped_or_absent_issuer_falls_back_to_demographics():
    assert study_matches(PatientID="X-1", IssuerOfPatientID="UNKNOWN")
    assert study_matches(PatientID="X-1", IssuerOfPatientID=None)
    assert not study_matches(PatientID="X-1", IssuerOfPatientID=None, PatientBirthDate="19610418")


def test_an_issuer_of_another_system_falls_back_to_demographics():
    assert study_matches(PatientID="4711", IssuerOfPatientID="OTHER-SITE")
    assert not study_matches(PatientID="4711", IssuerOfPatientID="OTHER-SITE", PatientSex="M")


def test_other_patient_ids_count_with_their_own_issuer():
    ids = other_ids(("A-1", "OTHER-SITE"), ("MRN-100234", "STOLAV"))
    assert study_matches(PatientID="4711", IssuerOfPatientID=None, PatientName="Else^Some", OtherPatientIDsSequence=ids)
    wrong = other_ids(("MRN-100234", "UNKNOWN"))
    assert not study_matches(
        PatientID="4711", IssuerOfPatientID=None, PatientName="Else^Some", OtherPatientIDsSequence=wrong
    )


@pytest.mark.parametrize(
    "name",
    [
        "HAUGEN^INGRID",
        "haugen^ingrid^",
        "  Haugen ^ Ingrid ^^^",
        "Haugen^Ingrid^^Mrs",
        "Haugen^Ingrid=ハウゲン^イングリッド",
    ],
)
def test_names_compare_without_case_whitespace_trailing_components_and_titles(name: str):
    assert study_matches(PatientID="X-1", IssuerOfPatientID=None, PatientName=name)


@pytest.mark.parametrize("name", ["Haugen", "Ingrid^Haugen", "Haugen^Ingrid^Marie", "Hauge^Ingrid"])
def test_another_name_is_no_match(name: str):
    assert not study_matches(PatientID="X-1", IssuerOfPatientID=None, PatientName=name)


def test_middle_names_are_the_fhir_given_names_after_the_first():
    order = of_patient(patient("X", given="Ingrid", name=[{"family": "Haugen", "given": ["Ingrid", "Marie"]}]))
    study = of_dicom(dicom(PatientID="Y", IssuerOfPatientID=None, PatientName="HAUGEN^INGRID^MARIE"), ISSUERS)
    assert matches(order, study)
    assert name_key(["Haugen ", "Ingrid", "Marie", "", ""]) == ("haugen", "ingrid", "marie")


@pytest.mark.parametrize(
    "missing",
    [{"PatientName": None}, {"PatientBirthDate": None}, {"PatientSex": None}, {"PatientSex": "U"}],
)
def test_missing_demographics_are_no_match_under_strict(missing: dict[str, Any]):
    assert not study_matches(PatientID="X-1", IssuerOfPatientID=None, **missing)


def test_a_patient_without_birth_date_or_gender_matches_by_identifier_only():
    order = of_patient({k: v for k, v in patient("MRN-100234").items() if k not in ("birthDate", "gender")})
    assert not matches(order, of_dicom(dicom(PatientID="X-1", IssuerOfPatientID=None), ISSUERS))
    assert matches(order, of_dicom(dicom(), ISSUERS))


def test_identifier_mode_never_uses_demographics():
    assert study_matches("identifier")
    assert not study_matches("identifier", PatientID="X-1", IssuerOfPatientID=None)


def test_patient_id_mode_takes_the_patient_id_whatever_its_issuer():
    assert study_matches("patient-id", issuers={}, PatientName="Else^Some", IssuerOfPatientID=None)
    assert study_matches("patient-id", issuers={}, PatientName="Else^Some", IssuerOfPatientID="UNKNOWN")
    assert not study_matches("patient-id", issuers={}, PatientID="MRN-9", PatientName="Else^Some")
    assert not study_matches("strict", issuers={}, PatientName="Else^Some")  # the same study under strict


def test_a_mapped_issuer_conflict_is_no_match_even_in_patient_id_mode():
    assert not study_matches("patient-id", PatientID="MRN-888")


def test_fhir_patients_match_by_identifier_or_demographics():
    same_mrn = of_patient(patient("MRN-100234", family="Other"))
    other_mrn = of_patient(patient("MRN-888"))
    no_mrn = of_patient({**patient("x"), "identifier": []})
    assert matches(ORDER, same_mrn) and not matches(ORDER, other_mrn) and matches(ORDER, no_mrn)


def test_identities_show_what_the_reason_prints():
    shown = dict(of_dicom(dicom(OtherPatientIDsSequence=other_ids(("A-1", "OTHER-SITE"))), ISSUERS).shown)
    assert shown == {
        "PatientID": "MRN-100234",
        "IssuerOfPatientID": "STOLAV",
        "OtherPatientID": "A-1 (OTHER-SITE)",
        "PatientName": "Haugen^Ingrid",
        "PatientBirthDate": "19610417",
        "PatientSex": "F",
    }
    assert of_patient(patient(), "Patient/1").shown == (
        ("Patient", "Patient/1"),
        ("identifier", f"{MRN_SYSTEM}|MRN-100234"),
        ("name", "Haugen^Ingrid"),
        ("birthDate", "1961-04-17"),
        ("gender", "female"),
    )


def test_the_rule_of_a_peer_is_its_own_else_the_linking_default():
    linking = Linking(patient_match="identifier", issuers={"A": "urn:a"})
    own = PacsPeer(name="p", ae_title="P", host="h", port=1, patient_match="patient-id", issuers={"B": "urn:b"})
    plain = PacsPeer(name="q", ae_title="Q", host="h", port=1)
    assert linking.rule(own) == MatchRule("patient-id", {"B": "urn:b"})
    assert linking.rule(plain) == linking.rule() == MatchRule("identifier", {"A": "urn:a"})
    assert OverreadConfig().linking.rule() == MatchRule("strict", {})
    with pytest.raises(ValueError, match="patient_match"):
        OverreadConfig.model_validate({"linking": {"patient_match": "lenient"}})
