"""The console script and the schema migrations, as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from fhir_server.db import Database
from overread.migrate import METADATA

OVERREAD = [sys.executable, "-m", "overread.cli"]


def _run(args: list[str], cwd: Path, url: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OVERREAD_DATABASE_URL": url}
    return subprocess.run([*OVERREAD, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_migrations_match_the_models(db: Database):
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), METADATA)
    assert diff == []


def test_db_upgrade_creates_the_schema_on_an_empty_database(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = _run(["db", "upgrade"], tmp_path, url)
    assert result.returncode == 0, result.stderr
    tables = set(inspect(Database(url).engine).get_table_names())
    assert {"resource", "resource_version", "idx_token", "outbox", "alembic_version"} <= tables


def test_demo_runs_a_case_and_a_rerun_adds_nothing(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    first = _run(["demo"], tmp_path, url)
    assert first.returncode == 0, first.stderr
    assert first.stdout.count("201 Created") == 5
    assert "Task/" in first.stdout and "status requested" in first.stdout
    assert "MSA|AA|MSG-000812" in first.stdout  # the HL7 order over MLLP
    assert first.stdout.split("4. Images")[0].count("   Task/") == 3  # step 2: the FHIR case; step 3: both cases
    linking, rest = first.stdout.split("4. Images")[1].split("5. The modality")
    pushed, report = rest.split("6. The second reader's report")
    assert "ACC-2026-55731: Task/" in linking and "images-available" in linking  # found on the sample PACS
    # the HL7 order's study is on no PACS yet
    nowhere = 'No study on PACS "sample" or in the image store matches AccessionNumber=ACC-2026-55732.'
    assert f"images-pending ({nowhere})" in linking
    assert "C-STORE ACC-2026-55732: status 0x0000" in pushed and pushed.count("businessStatus images-available") == 2
    assert first.stdout.count("ImagingStudy/") == 2
    assert "status completed, output {'reference': 'DiagnosticReport/" in report  # the final report closed the case
    assert "OBX|1|CWE|DISC^Second opinion discrepancy^99OVR||major^Major discrepancy^99OVRD" in report
    assert "|F|" in next(line for line in report.splitlines() if line.strip().startswith("OBR|"))
    second = _run(["demo"], tmp_path, url)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("200 OK") == 5 and "201 Created" not in second.stdout
    assert first.stdout.split("MSA|")[1][:20] == second.stdout.split("MSA|")[1][:20]  # a resend: the same ACK
    tasks = {line.split("Task/")[1][:36] for line in second.stdout.splitlines() if "Task/" in line}
    assert len(tasks) == 2  # still the two cases: the resent HL7 order made none
    studies = {line.split("ImagingStudy/")[1][:36] for line in second.stdout.splitlines() if "ImagingStudy/" in line}
    assert len(studies) == 2  # the study pushed again is the same study
    assert "sent to the EHR by an earlier run" in second.stdout and "ORU^R01^ORU_R01" not in second.stdout
