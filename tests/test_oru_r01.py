"""ORU^R01 out: golden files, round trips through two parsers, and the ``overread hl7 oru`` preview.

Each ``tests/golden/oru/<case>.json`` (report, order, patient, interpreter, findings, envelope) maps to
exactly ``<case>.hl7`` (segments one per line in the file; CR on the wire). Regenerate after an
intended change with ``OVERREAD_UPDATE_GOLDEN=1 pytest tests/test_oru_r01.py`` and review the diff.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest

from fhir_server.db import Database
from fhir_server.repository import Repository
from hl7_bridge.oru_context import context_from_json, load_context
from mappings.errors import MappingError
from mappings.original_report import map_oru_r01
from mappings.oru_r01 import DISCREPANCY_SYSTEM, RADPEER_SYSTEM, Envelope, OruContext, oru_r01
from mappings.sender import SenderConfig
from mappings.v2 import parse

GOLDEN = Path(__file__).parent / "golden" / "oru"
UPDATE = os.environ.get("OVERREAD_UPDATE_GOLDEN") == "1"
CASES = sorted(GOLDEN.glob("*.json"))
IDS = [c.stem for c in CASES]
OVERREAD = [sys.executable, "-m", "overread.cli"]
Json = dict[str, Any]


def _load(case: Path) -> tuple[OruContext, Envelope]:
    context, envelope = context_from_json(json.loads(case.read_text(encoding="utf-8")))
    assert envelope is not None
    return context, envelope


def _message(case: Path) -> str:
    return oru_r01(*_load(case))


def _coding(concepts: list[Json], system: str) -> Json | None:
    return next((c for cc in concepts for c in cc["coding"] if c["system"] == system), None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_report_maps_to_its_golden_file(case: Path) -> None:
    message = _message(case)
    expected = case.with_suffix(".hl7")
    as_file = message.replace("\r", "\n") + "\n"
    if UPDATE:
        expected.write_text(as_file, encoding="utf-8")
    assert "\n" not in message and not message.endswith("\r")
    assert as_file == expected.read_text(encoding="utf-8")


def test_every_golden_case_is_there() -> None:
    assert set(IDS) >= {
        "final_major_radpeer_findings",
        "final_major_radpeer_findings_v231",
        "preliminary_agree",
        "corrected_minor",
        "corrected_minor_v231",
        "escapes_multiline",
        "escapes_multiline_v231",
        "pdf_ed",
        "pdf_url_rp",
    }
    assert all(c.with_suffix(".hl7").exists() for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_discrepancy_comes_back_through_our_parser_and_python_hl7(case: Path) -> None:
    context, envelope = _load(case)
    message = oru_r01(context, envelope)
    disc = _coding(context.report["conclusionCode"], DISCREPANCY_SYSTEM)
    radpeer = _coding(context.report["conclusionCode"], RADPEER_SYSTEM)
    assert disc is not None
    expected = {"DISC": (disc["code"], disc["display"], "99OVRD")}
    if radpeer:
        expected["RADPEER"] = (radpeer["code"], radpeer["display"], "99OVRRP")

    ours = parse(message.encode("utf-8"))
    assert ours.charset == "utf-8" and ours.message_type == "ORU^R01"
    assert ours.msh.field(12).value == envelope.version
    coded = {s.field(3).component(1): s for s in ours.segments("OBX") if s.field(3).component(3) == "99OVR"}
    for code, value in expected.items():
        obx = coded[code]
        assert (obx.field(5).component(1), obx.field(5).component(2), obx.field(5).component(3)) == value
        assert obx.field(2).value == ("CWE" if envelope.version == "2.5.1" else "CE")

    theirs = hl7.parse(message)
    assert str(theirs.segment("MSH")[12]) == envelope.version
    obx_segments = theirs.segments("OBX")
    for code, value in expected.items():
        n = next(i for i, s in enumerate(obx_segments, 1) if theirs.unescape(str(s[3][0][0])) == code)
        got = tuple(theirs.extract_field("OBX", n, 5, 1, c) for c in (1, 2, 3))
        assert got == value


@pytest.mark.parametrize("case", [c for c in CASES if "escapes" in c.stem], ids=lambda c: c.stem)
def test_delimiters_and_line_breaks_come_back_unescaped(case: Path) -> None:
    context, envelope = _load(case)
    message = oru_r01(context, envelope)
    conclusion = context.report["conclusion"]
    assert all(ch in conclusion for ch in "|^&~\\\n")
    ours = parse(message)
    impression = [s for s in ours.segments("OBX") if s.field(3).component(1) == "19005-8"]
    # v2.5.1: one FT with \.br\ (our parser gives newlines); v2.3.1: one TX per line.
    assert len(impression) == (1 if envelope.version == "2.5.1" else 2)
    assert "\n".join(s.field(5).value for s in impression) == conclusion

    theirs = hl7.parse(message)
    indexes = [i for i, s in enumerate(theirs.segments("OBX"), 1) if str(s[3][0][0]) == "19005-8"]
    lines = [theirs.extract_field("OBX", i, 5, 1, 1) for i in indexes]
    assert "\n".join(lines).replace("\r", "\n") == conclusion  # python-hl7 reads \.br\ as CR

    interpreter = ours.segment("OBR")
    assert interpreter is not None
    assert interpreter.field(32).subcomponent(1, 2) == "O'Brien & Sons^"
    assert interpreter.field(32).subcomponent(1, 3) == "Jo|e"
    nte = ours.segment("NTE")
    assert nte is not None and nte.field(3).value == "Note with | and ^\nand a second line"


@pytest.mark.parametrize(
    ("status", "obr25", "obx11"),
    [
        ("preliminary", "P", "P"),
        ("final", "F", "F"),
        ("amended", "C", "C"),
        ("corrected", "C", "C"),
        ("appended", "C", "C"),
        ("cancelled", "X", "X"),
        ("entered-in-error", "X", "W"),
        ("registered", "I", "I"),
        ("partial", "A", "P"),
    ],
)
def test_result_status_follows_the_report_status(status: str, obr25: str, obx11: str) -> None:
    context, envelope = _load(GOLDEN / "preliminary_agree.json")
    context = dataclasses.replace(context, report={**context.report, "status": status})
    msg = parse(oru_r01(context, envelope))
    obr = msg.segment("OBR")
    assert obr is not None and obr.field(25).value == obr25
    assert {s.field(11).value for s in msg.segments("OBX")} == {obx11}


def test_a_report_without_a_known_status_or_discrepancy_is_refused() -> None:
    context, envelope = _load(GOLDEN / "preliminary_agree.json")
    with pytest.raises(MappingError) as unknown:
        oru_r01(dataclasses.replace(context, report={**context.report, "status": "unknown"}), envelope)
    assert unknown.value.location == "OBR-25"
    with pytest.raises(MappingError) as no_code:
        oru_r01(dataclasses.replace(context, report={**context.report, "conclusionCode": []}), envelope)
    assert no_code.value.location == "OBX-5"
    with pytest.raises(ValueError, match="aware"):
        oru_r01(context, dataclasses.replace(envelope, timestamp=datetime(2025, 1, 1)))
    with pytest.raises(ValueError, match=r"2\.4"):
        oru_r01(context, dataclasses.replace(envelope, version="2.4"))


def test_our_inbound_mapping_reads_back_the_identifiers_the_order_came_with() -> None:
    context, envelope = _load(GOLDEN / "final_major_radpeer_findings.json")
    message = parse(oru_r01(context, envelope))
    config = SenderConfig(identifier_systems={v: k for k, v in envelope.identifier_systems.items()})
    bundle = map_oru_r01(message, config)
    resources = {e["resource"]["resourceType"]: e["resource"] for e in bundle["entry"]}
    patient, report = resources["Patient"], resources["DiagnosticReport"]
    sent = {(i["system"], i["value"]) for i in context.patient["identifier"][:2]}
    assert sent <= {(i["system"], i["value"]) for i in patient["identifier"]}
    order_ids = {(i["type"]["coding"][0]["code"], i["system"], i["value"]) for i in context.order["identifier"][:2]}
    got = {(i["type"]["coding"][0]["code"], i["system"], i["value"]) for i in report["identifier"] if "type" in i}
    assert order_ids <= got
    assert ("ACSN", "ACC-77") in {(i["type"]["coding"][0]["code"], i["value"]) for i in report["identifier"][1:]}
    assert report["status"] == "final"
    assert report["effectiveDateTime"] == context.report["effectiveDateTime"]
    assert report["issued"] == "2025-03-02T14:05:10.123+00:00"
    assert patient["birthDate"] == "1970-01-01" and patient["gender"] == "female"


# -- the store and the preview command -----------------------------------------------------------------


def _store(url: str) -> None:
    """The golden ``final_major_radpeer_findings`` resources in the database, with their ids."""
    data = json.loads((GOLDEN / "final_major_radpeer_findings.json").read_text(encoding="utf-8"))
    db = Database(url)
    try:
        with db.begin() as conn:
            repo = Repository(conn)
            for resource in [data["patient"], data["interpreter"], data["encounter"], data["order"]]:
                repo.create({k: v for k, v in resource.items() if k != "id"}, resource["id"])
            for finding in data["findings"]:
                repo.create({k: v for k, v in finding.items() if k != "id"}, finding["id"])
            report = {k: v for k, v in data["report"].items() if k not in ("id", "meta")}
            report["result"] = [{"reference": f"Observation/{f['id']}"} for f in data["findings"]]
            report["encounter"] = {"reference": "Encounter/enc-1"}
            repo.create(report, "dr-1")
    finally:
        db.dispose()


def test_load_context_resolves_order_patient_interpreter_findings_and_encounter(database_url: str) -> None:
    _store(database_url)
    db = Database(database_url)
    try:
        with db.begin(write=False) as conn:
            context = load_context(Repository(conn), "dr-1")
    finally:
        db.dispose()
    assert context.order["id"] == "sr-1" and context.patient["id"] == "pat-1"
    assert context.interpreter is not None and context.interpreter["id"] == "pr-1"
    assert [f["id"] for f in context.findings] == ["obs-1", "obs-2"]
    assert context.encounter is not None and context.encounter["id"] == "enc-1"
    golden, envelope = _load(GOLDEN / "final_major_radpeer_findings.json")
    stored = oru_r01(context, envelope).split("\r")
    assert stored[1:] == oru_r01(golden, envelope).split("\r")[1:]


def test_load_context_finds_an_encounter_contained_in_the_report(db: Database) -> None:
    data = json.loads((GOLDEN / "final_major_radpeer_findings.json").read_text(encoding="utf-8"))
    with db.begin() as conn:
        repo = Repository(conn)
        for resource in [data["patient"], data["order"]]:
            repo.create({k: v for k, v in resource.items() if k != "id"}, resource["id"])
        report = {k: v for k, v in data["report"].items() if k not in ("id", "meta")}
        report["contained"] = [{**data["encounter"], "id": "visit"}]
        report["encounter"] = {"reference": "#visit"}
        repo.create(report, "dr-1")
    with db.begin(write=False) as conn:
        context = load_context(Repository(conn), "dr-1")
    assert context.encounter is not None and context.encounter["id"] == "visit"


def test_load_context_finds_the_requester_through_the_practitioner_role_of_the_ordering_facility(db: Database) -> None:
    data = json.loads((GOLDEN / "final_major_radpeer_findings.json").read_text(encoding="utf-8"))
    doctor = {"resourceType": "Practitioner", "identifier": [{"system": "urn:x", "value": "REF-1"}]}
    with db.begin() as conn:
        repo = Repository(conn)
        repo.create(doctor, "doc-1")
        repo.create({"resourceType": "PractitionerRole", "practitioner": {"reference": "Practitioner/doc-1"}}, "role-1")
        repo.create({k: v for k, v in data["patient"].items() if k != "id"}, data["patient"]["id"])
        order = {k: v for k, v in data["order"].items() if k != "id"}
        repo.create({**order, "requester": {"reference": "PractitionerRole/role-1"}}, data["order"]["id"])
        repo.create({k: v for k, v in data["report"].items() if k not in ("id", "meta")}, "dr-1")
    with db.begin(write=False) as conn:
        context = load_context(Repository(conn), "dr-1")
    assert context.requester is not None and context.requester["id"] == "doc-1"


def test_load_context_of_an_earlier_version_resolves_that_versions_findings(database_url: str) -> None:
    _store(database_url)
    db = Database(database_url)
    try:
        with db.begin() as conn:
            repo = Repository(conn)
            report = repo.read("DiagnosticReport", "dr-1").resource
            repo.update("DiagnosticReport", "dr-1", {**report, "status": "corrected", "result": report["result"][:1]})
        with db.begin(write=False) as conn:
            first = load_context(Repository(conn), "dr-1", 1)
            current = load_context(Repository(conn), "dr-1")
    finally:
        db.dispose()
    assert first.report["meta"]["versionId"] == "1" and first.report["status"] == "final"
    assert [f["id"] for f in first.findings] == ["obs-1", "obs-2"]
    assert [f["id"] for f in current.findings] == ["obs-1"]


def _run(args: list[str], url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OVERREAD_DATABASE_URL": url}
    return subprocess.run([*OVERREAD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_preview_prints_the_oru_of_a_stored_report(database_url: str, tmp_path: Path) -> None:
    _store(database_url)
    result = _run(["hl7", "oru", "DiagnosticReport/dr-1", "--control-id", "PREVIEW-1"], database_url, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("MSH|^~\\&|OVERREAD|OVERREAD|||") and "|ORU^R01^ORU_R01|PREVIEW-1|P|2.5.1|" in lines[0]
    assert "OBX|1|CWE|DISC^Second opinion discrepancy^99OVR||major^Major discrepancy^99OVRD||||||F" in lines
    assert any(line.startswith("OBR|1|PL-1001|") and "|F|" in line for line in lines)  # no reverse map: no EHR
    v231 = _run(["hl7", "oru", "DiagnosticReport/dr-1", "--version", "2.3.1"], database_url, tmp_path)
    assert v231.returncode == 0, v231.stderr
    assert "|ORU^R01|" in v231.stdout and "OBX|1|CE|DISC^" in v231.stdout
    missing = _run(["hl7", "oru", "DiagnosticReport/none"], database_url, tmp_path)
    assert missing.returncode == 1 and "404" in missing.stderr


@pytest.mark.slow
def test_preview_prints_a_json_file_as_its_golden_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'unused.db'}"
    case = GOLDEN / "escapes_multiline.json"
    result = _run(["hl7", "oru", str(case)], url, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == case.with_suffix(".hl7").read_text(encoding="utf-8")
    v231 = _run(["hl7", "oru", str(case), "--version", "2.3.1"], url, tmp_path)
    assert v231.stdout == (GOLDEN / "escapes_multiline_v231.hl7").read_text(encoding="utf-8").replace(
        "OVR-escapes_multiline_v231", "OVR-escapes_multiline"
    )
    bad = _run(["hl7", "oru", str(case), "--version", "2.4"], url, tmp_path)
    assert bad.returncode == 2


def test_envelope_timestamp_is_msh7_with_its_offset() -> None:
    context, envelope = _load(GOLDEN / "pdf_ed.json")
    msh = oru_r01(context, dataclasses.replace(envelope, timestamp=datetime(2025, 6, 1, 8, 0, tzinfo=UTC)))
    assert msh.split("\r")[0].split("|")[6] == "20250601080000+0000"


@pytest.mark.parametrize("version", ["2.5.1", "2.3.1"])
def test_an_interpreter_known_only_by_name_is_obr32_family_name_not_its_id(version: str) -> None:
    context, envelope = _load(GOLDEN / "preliminary_agree.json")
    report = {**context.report, "resultsInterpreter": [{"display": "Dr Second Reader"}]}
    context = dataclasses.replace(context, report=report, interpreter=None)
    obr = parse(oru_r01(context, dataclasses.replace(envelope, version=version))).segment("OBR")
    assert obr is not None
    assert obr.field(32).subcomponent(1, 1) == ""  # CNN-1 / CN-1: the id number
    assert obr.field(32).subcomponent(1, 2) == "Dr Second Reader"  # the family name
