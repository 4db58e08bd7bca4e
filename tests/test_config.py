"""OVERREAD_CONFIG: the documented shape loads, mistakes are refused, sender settings reach the mapping."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from overread.config import ConfigError, load
from tests.hl7_golden import OMI
from tests.intake import receive

ARCHITECTURE_EXAMPLE = """
pacs:
  - name: main
    ae_title: ORTHANC
    host: 127.0.0.1
    port: 4242
    qido_url: http://127.0.0.1:8042/dicom-web
    retrieve: c-move
hl7:
  destinations:
    - name: ehr
      host: 127.0.0.1
      port: 2576
      sending_facility: ""
  senders:
    - sending_application: MESA_OF
      identifier_systems:
        ADT1: urn:oid:1.2.826.0.1.3680043.2.1125
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "overread.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_the_documented_shape_loads(tmp_path):
    config = load(_write(tmp_path, ARCHITECTURE_EXAMPLE))
    assert (config.pacs[0].ae_title, config.pacs[0].retrieve, config.hl7.destinations[0].port) == (
        "ORTHANC",
        "c-move",
        2576,
    )
    assert config.sender("MESA_OF", "XYZ_RADIOLOGY").identifier_systems == {
        "ADT1": "urn:oid:1.2.826.0.1.3680043.2.1125"
    }
    assert config.sender("OTHER_APP", "XYZ_RADIOLOGY") is None
    assert load(None).pacs == []


@pytest.mark.parametrize(
    "text",
    [
        "pacs:\n  - name: x\n    ae_titel: A\n    host: h\n    port: 1\n",
        "hl7: [unclosed",
        "pacs:\n  - retrieve: teleport\n",
        "hl7: {senders: [{name: ris, sending_application: A}, {name: ris, sending_application: B}]}",
        "hl7: {senders: [{sending_application: A, identified_by: msh4}]}",
    ],
)
def test_mistakes_are_refused_with_the_file_named(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=str(path)):
        load(path)


def test_sender_settings_decide_the_patient_identifier_system(client, db, tmp_path):
    config = load(_write(tmp_path, ARCHITECTURE_EXAMPLE))
    receive(db, OMI, config.sender)
    (patient,) = [e["resource"] for e in client.get("/fhir/Patient").json()["entry"]]
    assert patient["identifier"][0] == {"system": "urn:oid:1.2.826.0.1.3680043.2.1125", "value": "PID_1"}


@pytest.mark.slow
def test_serve_refuses_a_broken_config_file(tmp_path):
    env = {**os.environ, "OVERREAD_CONFIG": str(_write(tmp_path, "hl7: {senders: [{bogus: 1}]}"))}
    result = subprocess.run([sys.executable, "-m", "overread.cli", "serve"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "OVERREAD_CONFIG" in result.stderr and "bogus" in result.stderr


RIS = """
hl7:
  senders:
    - sending_application: MESA_OF
      concept_maps: [maps/procedures.json]
      fields:
        accession: IPC-2
      defaults:
        priority: urgent
"""
PROCEDURES = {
    "resourceType": "ConceptMap",
    "status": "active",
    "group": [
        {
            "source": "http://loinc.org",
            "target": "http://radlex.org",
            "element": [{"code": "10637-7", "target": [{"code": "RPID16", "equivalence": "equivalent"}]}],
        }
    ],
}


def _with_map(tmp_path: Path, concept_map: object) -> Path:
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "procedures.json").write_text(json.dumps(concept_map), encoding="utf-8")
    return _write(tmp_path, RIS)


def test_concept_maps_are_read_relative_to_the_config_file(tmp_path, monkeypatch):
    path = _with_map(tmp_path, PROCEDURES)
    monkeypatch.chdir(tmp_path.parent)  # not the folder of the file
    settings = load(path).sender("MESA_OF", "XYZ_RADIOLOGY")
    assert settings is not None and len(settings.concept_maps) == 1
    assert (str(settings.fields.accession), settings.fields.study_uid, settings.default_priority) == (
        "IPC-2",
        None,
        "urgent",
    )


@pytest.mark.parametrize(
    ("concept_map", "reason"),
    [
        ("{not json", "JSONDecodeError"),
        ({**PROCEDURES, "group": [{"source": "http://loinc.org"}]}, "group\\[0\\].target"),
        ({"resourceType": "ValueSet"}, "not a ConceptMap"),
    ],
)
def test_a_broken_concept_map_file_is_refused_naming_it(tmp_path, concept_map, reason):
    (tmp_path / "maps").mkdir()
    text = concept_map if isinstance(concept_map, str) else json.dumps(concept_map)
    (tmp_path / "maps" / "procedures.json").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=f"ConceptMap file {tmp_path / 'maps' / 'procedures.json'}: .*{reason}"):
        load(_write(tmp_path, RIS))


def test_a_missing_concept_map_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match=f"ConceptMap file {tmp_path / 'maps' / 'procedures.json'}: .*No such file"):
        load(_write(tmp_path, RIS))


@pytest.mark.parametrize(
    ("sender", "message"),
    [
        ("fields: {accesion: OBR-18}", "accesion"),  # a misspelt field name
        ("fields: {accession: OBR18}", "'OBR18' is not a field path"),
        ("fields: {procedure_code: OBR-4.1}", "a whole coded field"),
        ("defaults: {priority: whenever}", "whenever"),
        ("defaults: {accession: A1}", "accession"),  # defaults only for what has one
        ("timezone: Europe/Stockolm", "not an IANA time zone"),  # else every local time fails at mapping
    ],
)
def test_unknown_or_wrong_field_settings_are_refused(tmp_path, sender, message):
    path = _write(tmp_path, f"hl7:\n  senders:\n    - sending_application: X\n      {sender}\n")
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_a_translated_code_is_stored_in_the_service_request(client, db, tmp_path):
    config = load(_with_map(tmp_path, PROCEDURES))
    receive(db, OMI.replace(b"IPC|AccessionNumber|RequestedProcID|", b"IPC||ACC-7|"), config.sender)
    (order,) = [e["resource"] for e in client.get("/fhir/ServiceRequest").json()["entry"]]
    assert order["code"]["coding"] == [
        {"system": "http://loinc.org", "code": "10637-7", "display": "Microscopic Observation"},
        {"system": "http://radlex.org", "code": "RPID16"},
    ]
    acsn = [i["value"] for i in order["identifier"] if i.get("type", {}).get("coding", [{}])[0].get("code") == "ACSN"]
    assert (acsn, order["priority"]) == (["ACC-7"], "urgent")
    found = client.get("/fhir/ServiceRequest", params={"code": "http://radlex.org|RPID16"}).json()
    assert [e["resource"]["id"] for e in found["entry"]] == [order["id"]]  # searchable by the translated code


def test_sender_entries_are_found_by_message_and_by_name(tmp_path):
    config = load(
        _write(
            tmp_path,
            "hl7: {senders: [{name: north, sending_application: RIS, sending_facility: NORTH, identified_by: msh3},"
            " {sending_application: RIS}]}",
        )
    )
    north = config.sender("RIS", "NORTH")
    assert north is not None and (north.name, north.identified_by) == ("north", "msh3")
    unnamed = config.sender("RIS", "")  # no MSH-4: the entry that names no facility
    assert unnamed is not None and (unnamed.name, unnamed.identified_by) == ("hl7.senders[1]", None)
    assert config.sender_named("north") == north and config.sender_named("south") is None
