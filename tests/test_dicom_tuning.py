"""dicom_bridge.tuning changes process-wide settings of pydicom and pynetdicom only when asked
(``tuning.apply()``, where a process starts serving DICOM), never on import (issue 16)."""

import json
import subprocess
import sys

import pytest
from pydicom.config import IGNORE

pytestmark = pytest.mark.slow  # each test looks in a fresh interpreter

SETTINGS = """
import json, pydicom.config
from pynetdicom import _config
s = pydicom.config.settings
print(json.dumps([s.reading_validation_mode, s.writing_validation_mode,
                  _config.LOG_HANDLER_LEVEL, _config.UNRESTRICTED_STORAGE_SERVICE]))
"""


def settings_after(code: str) -> list[object]:
    """The settings in a fresh interpreter after ``code``: this one has imported everything already."""
    run = subprocess.run([sys.executable, "-c", code + SETTINGS], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_importing_the_dicom_modules_leaves_pydicom_and_pynetdicom_as_they_were():
    untouched = settings_after("")
    imports = "import dicom_bridge.dimse, dicom_bridge.linking, dicom_bridge.storage_scp, dicom_bridge.sample_pacs\n"
    assert settings_after(imports + "import dicom_bridge.tuning, overread.app\n") == untouched
    assert untouched[0] != IGNORE and untouched[3] is False  # pydicom validates; storage is restricted


def test_apply_sets_them_for_the_process():
    assert settings_after("import dicom_bridge.tuning\ndicom_bridge.tuning.apply()\n") == [IGNORE, IGNORE, "none", True]
