"""The case rules are wired into the FHIR store where a process is set up to write (``make_hooks``, where
every door and worker, ``create_app`` included, gets its hooks), never on import: a process that only
imported ``overread.app`` would store a second-opinion report without discrepancy coding."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test looks in a fresh interpreter

ROOT = Path(__file__).resolve().parent.parent
RULES = """
import json
from fhir_server import compartment, operations, profiles
from fhir_server.access import Access

base = "https://overread.org/fhir/CodeSystem/"
report = {
    "resourceType": "DiagnosticReport", "status": "final", "code": {"text": "CT chest"},
    "meta": {"tag": [{"system": base + "report-role", "code": "second-opinion"}]},
    "basedOn": [{"reference": "ServiceRequest/o"}], "subject": {"reference": "Patient/p"},
    "resultsInterpreter": [{"display": "Dr Second Reader"}], "conclusion": "Missed nodule.",
}
levels = [("second-opinion-discrepancy", "agree"), ("radpeer", "2b")]
contradicting = {**report, "conclusionCode": [{"coding": [{"system": base + s, "code": c}]} for s, c in levels]}
print(json.dumps({
    "operations": [list(key) for key in operations.INSTANCE],
    "uncoded report": sorted({issue.code for issue in profiles.check(report)}),
    "contradicting report": [issue.code for issue in profiles.check(contradicting)],
    "ordering compartment": compartment.of(Access("ehr-a", (), "ordering", "urn:org|A")) is not None,
}))
"""
UNWIRED = {"operations": [], "uncoded report": [], "contradicting report": [], "ordering compartment": False}
WIRED = {
    "operations": [["ServiceRequest", "link-imaging"]],
    "uncoded report": ["invariant", "required"],
    "contradicting report": ["business-rule"],
    "ordering compartment": True,
}


def rules_after(code: str) -> dict[str, object]:
    """What the store holds resources to in a fresh interpreter after ``code``: this one is wired
    (tests/conftest.py)."""
    run = subprocess.run([sys.executable, "-c", code + RULES], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_importing_the_app_wires_nothing():
    assert rules_after("import overread.app, overread.cli, overread.demo\n") == UNWIRED


def test_the_hooks_of_every_door_come_with_the_case_rules():
    hooks = "from overread.app import make_hooks\nfrom overread.config import OverreadConfig\n"
    assert rules_after(hooks + "make_hooks(OverreadConfig())\n") == WIRED


def test_the_app_is_wired(tmp_path: Path):
    app = "from overread.app import create_app\nfrom overread.settings import Settings\n"
    assert rules_after(app + f"create_app(Settings(database_url='sqlite:///{tmp_path / 'o.db'}'))\n") == WIRED


def test_wiring_again_changes_nothing():
    assert rules_after("from overread.app import wire_cases\nwire_cases()\nwire_cases()\n") == WIRED
