"""Golden files: each order .hl7 maps to exactly its .json (a Bundle, or the MappingError).

Regenerate after an intended mapping change with ``OVERREAD_UPDATE_GOLDEN=1 pytest tests/test_hl7_order_golden.py``
and review the diff.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fhir.resources.R4B.bundle import Bundle

from fhir_server.validation import validate
from tests.hl7_golden import DCM4CHE, GOLDEN, cases, dump, outcome

UPDATE = os.environ.get("OVERREAD_UPDATE_GOLDEN") == "1"
CASES = cases()
IDS = [message.stem for message, _ in CASES]
#: The cases that map to a Bundle (the others are golden errors).
BUNDLES = [expected for _, expected in CASES if "error" not in json.loads(expected.read_text(encoding="utf-8"))]


@pytest.mark.parametrize(("message", "expected"), CASES, ids=IDS)
def test_message_maps_to_its_golden_file(message: Path, expected: Path):
    result = outcome(message)
    if UPDATE:
        expected.write_text(dump(result), encoding="utf-8")
    assert result == json.loads(expected.read_text(encoding="utf-8"))


@pytest.mark.parametrize("expected", BUNDLES, ids=[e.stem for e in BUNDLES])
def test_every_mapped_resource_is_valid_r4(expected: Path):
    bundle = json.loads(expected.read_text(encoding="utf-8"))
    Bundle.model_validate(bundle)  # the server validates entries, not the Bundle: check its shape here
    for entry in bundle["entry"]:
        validate(entry["resource"])


def test_mapping_is_deterministic():
    message = GOLDEN / "orm_crlf_bom.hl7"
    assert outcome(message) == outcome(message)


def _golden(name: str) -> dict:
    return json.loads((GOLDEN / name).read_text(encoding="utf-8"))


def _resources(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def test_the_file_named_orm_is_mapped_as_the_omi_it_holds():
    bundle = _golden("dcm4che-ORM_O01-GeneralOrder.json")
    provenance = _resources(bundle, "Provenance")[0]
    assert provenance["entity"][0]["what"]["display"] == "OMI^O23"
    identifiers = _resources(bundle, "ServiceRequest")[0]["identifier"]
    assert {"system": "urn:dicom:uid", "value": "urn:oid:1.2.392.200036.9125.0.198811291108.7"} in identifiers
    assert any(i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN" for i in identifiers)


def test_omi_takes_accession_and_study_uid_from_ipc():
    sr = _resources(_golden("dcm4che-OMI_O23-ImagingOrder.json"), "ServiceRequest")[0]
    acsn = [i["value"] for i in sr["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
    assert acsn == ["AccessionNumber"]
    assert sr["reasonCode"][0]["coding"][0]["display"].endswith("12 \u201335.,comorbidity in tier 3")


def test_the_imaging_procedure_control_names_the_worklist_item():
    (sr,) = _resources(_golden("dcm4che-OMI_O23-ImagingOrder.json"), "ServiceRequest")
    typed = {i["type"]["text"]: i["value"] for i in sr["identifier"] if "text" in i.get("type", {})}
    assert typed == {"Requested Procedure ID": "RequestedProcID", "Scheduled Procedure Step ID": "ScheduledProcStepID"}
    modality = sr["orderDetail"][0]["coding"][0]
    assert (modality["system"], modality["code"]) == ("http://dicom.nema.org/resources/ontology/DCM", "CT")
    places = [c.get("text") or c["coding"][0]["code"] for c in sr["locationCode"]]
    assert places == ["ScheduledProcStepLocation", "ScheduledStationName"] + [f"ScheduledStationAET{n}" for n in (1, 2)]


def test_edge_cases_read_as_sent():
    esc = _golden("orm_escapes_cr.json")
    patient = _resources(esc, "Patient")[0]
    assert patient["name"][0] == {"family": "Smith&Jones", "given": ["Ann^Marie"]}
    note = _resources(esc, "ServiceRequest")[0]["note"][0]["text"]
    assert note == "Line one\nLine two has | pipe, ~ tilde, \u00e9 e-acute and bold text"
    assert _resources(_golden("orm_latin1.json"), "Patient")[0]["name"][0]["family"] == "M\u00fcller"
    repeated = _resources(_golden("orm_lf_zds_repeated_pid3.json"), "Patient")[0]["identifier"]
    assert [i["value"] for i in repeated] == ["MRN-1", "123-45-6789"]
    bom = _golden("orm_crlf_bom.json")
    assert _resources(bom, "Patient")[0]["identifier"][0]["system"] == "urn:oid:2.16.840.1.113883.19.5"
    assert _resources(bom, "Coverage")[0]["identifier"][0]["value"] == "POL-123"
    assert _golden("orm_missing_pid3.json")["error"]["code"] == 101
    assert _golden("dcm4che-OMG_O19-GeneralClinicalOrder-Eyecare.json")["error"]["code"] == 200


def _map_cli(message: Path, *options: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``overread hl7 map`` in a process of its own; ``config`` is its OVERREAD_CONFIG (none by default)."""
    command = [sys.executable, "-m", "overread.cli", "hl7", "map", str(message), *options]
    env = {k: v for k, v in os.environ.items() if k != "OVERREAD_CONFIG"}
    if config is not None:
        env["OVERREAD_CONFIG"] = str(config)
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=env)


@pytest.mark.slow
def test_cli_prints_the_same_bundle():
    message = GOLDEN / "orm_crlf_bom.hl7"
    result = _map_cli(message)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == outcome(message)


@pytest.mark.slow
def test_cli_reports_a_mapping_error_on_stderr():
    result = _map_cli(GOLDEN / "orm_missing_pid3.hl7")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "101 at PID-3" in result.stderr


RIS3 = GOLDEN / "omi_sender_ris3_fields.hl7"
RIS3_CONFIG = GOLDEN / "omi_sender_ris3_fields.config.yaml"


def _code(bundle: dict[str, Any]) -> dict[str, Any]:
    (order,) = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "ServiceRequest"]
    return dict(order["code"])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["--config", "OVERREAD_CONFIG"])
def test_cli_maps_with_the_matching_sender_of_the_configuration(how: str):
    result = _map_cli(RIS3, "--config", str(RIS3_CONFIG)) if how == "--config" else _map_cli(RIS3, config=RIS3_CONFIG)
    assert result.returncode == 0, result.stderr
    bundle = json.loads(result.stdout)  # stdout is the Bundle alone
    assert bundle == outcome(RIS3)  # the golden case's mapping, sender settings applied
    assert _code(bundle)["coding"][0]["code"] == "10637-7"  # OBR-44, where RIS3 puts its code
    assert "sender: hl7.senders[0] (matches MSH-3 'RIS3', MSH-4 'SOUTHCLINIC')" in result.stderr

    without = _map_cli(RIS3)
    assert _code(json.loads(without.stdout)) == {"text": "See OBR-44"}  # the standard place: a placeholder
    assert "no hl7.senders entry matches MSH-3 'RIS3', MSH-4 'SOUTHCLINIC': default settings" in without.stderr


@pytest.mark.slow
def test_cli_sender_option_forces_a_named_entry(tmp_path: Path):
    config = tmp_path / "overread.yaml"
    config.write_text(
        "hl7:\n  senders:\n"
        "    - {name: plain, sending_application: RIS3}\n"
        "    - {name: ris3-v23, sending_application: NOT_RIS3, identified_by: msh3,\n"
        "       fields: {procedure_code: OBR-44, priority: OBR-27.6}}\n",
        encoding="utf-8",
    )
    result = _map_cli(RIS3, "--config", str(config), "--sender", "ris3-v23")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == outcome(RIS3)
    assert "sender: ris3-v23 (--sender); identified by MSH-3 'RIS3'\n" in result.stderr

    unknown = _map_cli(RIS3, "--config", str(config), "--sender", "nobody")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert "no hl7.senders entry is named 'nobody' (named: plain, ris3-v23)" in unknown.stderr


@pytest.mark.slow
def test_cli_answers_an_unsupported_message_as_intake_does():
    result = _map_cli(DCM4CHE / "ADT_A40-PatientMerge.hl7")
    assert result.returncode == 1 and result.stdout == ""
    assert "error 200 at MSH-9: Message type ADT^A40 is not an order Overread maps" in result.stderr


@pytest.mark.slow
def test_cli_refuses_a_broken_configuration(tmp_path: Path):
    config = tmp_path / "overread.yaml"
    config.write_text("hl7: {senders: [{sending_application: RIS3, identified_by: msh4}]}", encoding="utf-8")
    result = _map_cli(RIS3, "--config", str(config))
    assert result.returncode == 2 and result.stdout == ""
    assert str(config) in result.stderr and "identified_by" in result.stderr
