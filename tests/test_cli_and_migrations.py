"""The console script and the schema migrations, as a user runs them."""

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

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


@pytest.mark.slow
def test_db_upgrade_creates_the_schema_on_an_empty_database(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = _run(["db", "upgrade"], tmp_path, url)
    assert result.returncode == 0, result.stderr
    tables = set(inspect(Database(url).engine).get_table_names())
    assert {"resource", "resource_version", "idx_token", "outbox", "alembic_version"} <= tables


@pytest.mark.slow
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


def _migrate(db: Database, revision: str) -> None:
    """Upgrade or downgrade ``db`` to ``revision`` (upgrade() only goes up)."""
    from alembic import command

    from overread.migrate import alembic_config

    with db.engine.begin() as conn:
        config = alembic_config()
        config.attributes["connection"] = conn
        current = MigrationContext.configure(conn).get_current_revision() or ""
        (command.downgrade if revision != "head" and revision < current else command.upgrade)(config, revision)


def test_inbound_sender_key_migration_keeps_every_message_and_its_key(db: Database):
    from sqlalchemy import select

    from hl7_bridge.store import InboundMessage
    from tests.hl7_golden import NO_MSH4, OMI
    from tests.intake import receive

    receive(db, OMI)
    receive(db, OMI.replace(b"PID_1^", b"PID_2^"))  # refused: shares the first one's old key
    _migrate(db, "0003")
    with db.engine.begin() as conn:
        rows = conn.execute(text("SELECT status, control_id FROM hl7_inbound ORDER BY pk")).all()
        assert [tuple(r) for r in rows] == [("processed", "1001125"), ("refused", None)]
        conn.execute(
            text(
                "INSERT INTO hl7_inbound (received_at, sending_application, sending_facility, control_id, status, raw,"
                " ack) VALUES (:at, 'SMALLRIS', '', 'S-0001', 'processed', :raw, :ack)"
            ),
            {"at": datetime(2026, 1, 1), "raw": NO_MSH4, "ack": b"STORED-ACK"},
        )
    _migrate(db, "head")
    with db.begin(write=False) as conn:
        keys = conn.execute(select(InboundMessage.sender_key).order_by(InboundMessage.pk)).scalars().all()
    assert keys == ['["MESA_OF","XYZ_RADIOLOGY"]', None, '["SMALLRIS"]']
    assert receive(db, NO_MSH4) == b"STORED-ACK"  # intake finds the stored key: a resend


def test_index_values_whole_migration_reindexes_values_cut_before(db: Database):
    from fastapi.testclient import TestClient

    from overread.app import create_app
    from overread.settings import Settings
    from tests.builders import patient
    from tests.conftest import FHIR_JSON

    body = {**patient(family="Ab" * 150), "identifier": [{"system": "urn:x", "value": "V" * 300}]}
    with TestClient(create_app(Settings(database_url=db.url), db), base_url="http://testserver") as client:
        client.headers.update(FHIR_JSON)
        pid = client.post("/fhir/Patient", json=body).json()["id"]
        client.post("/fhir/Patient", json=patient())  # short values: left as they are
        _migrate(db, "0006")  # the values as the old index held them: cut at 255
        with db.engine.connect() as conn:
            assert conn.scalar(text("SELECT max(length(code)) FROM idx_token WHERE param = 'identifier'")) == 255
        _migrate(db, "head")
        for query in (f"identifier=urn:x|{'V' * 300}", f"family:exact={'Ab' * 150}", f"family={'ab' * 149}a"):
            found = client.get(f"/fhir/Patient?{query}").json()
            assert [e["resource"]["id"] for e in found.get("entry", [])] == [pid], query
        assert client.get("/fhir/Patient?identifier=MRN-100234").json()["total"] == 1


def test_the_insurance_index_migration_indexes_the_orders_stored_before_it(db: Database):
    """0009: ServiceRequest.insurance became a search parameter; orders stored before have its index rows after."""
    from sqlalchemy import func, select

    from fhir_server.repository import Repository
    from fhir_server.schema import ReferenceIndex
    from tests.builders import service_request

    with db.begin() as conn:
        Repository(conn).create(service_request("Patient/p", insurance=[{"reference": "Coverage/c"}]))
    indexed = select(func.count()).where(ReferenceIndex.param == "insurance", ReferenceIndex.target_id == "c")
    _migrate(db, "0008")
    with db.engine.connect() as conn:
        assert conn.scalar(indexed) == 0  # as it was before the parameter
    _migrate(db, "head")
    with db.engine.connect() as conn:
        assert conn.scalar(indexed) == 1
