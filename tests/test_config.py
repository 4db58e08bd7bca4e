"""OVERREAD_CONFIG: the documented shape loads, mistakes are refused, sender settings reach the mapping."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hl7_bridge.intake import receive
from overread.config import ConfigError, load
from tests.test_hl7_intake import OMI

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


def test_serve_refuses_a_broken_config_file(tmp_path):
    env = {**os.environ, "OVERREAD_CONFIG": str(_write(tmp_path, "hl7: {senders: [{bogus: 1}]}"))}
    result = subprocess.run([sys.executable, "-m", "overread.cli", "serve"], env=env, capture_output=True,
                            text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "OVERREAD_CONFIG" in result.stderr and "bogus" in result.stderr
