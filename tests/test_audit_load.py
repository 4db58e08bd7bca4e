"""The audit log under load, on SQLite and PostgreSQL: N authenticated requests from several threads
against a real server leave N AuditEvents once the queue is written out, even with a queue far
smaller than the burst (the requests wait for room); a queue that stays full drops, counts and warns."""

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import func, select

from fhir_server import balp, dates
from fhir_server.audit_log import AuditLog, Event
from fhir_server.db import Database
from fhir_server.executor import for_database
from fhir_server.schema import ResourceRow
from overread.app import create_app
from overread.config import OverreadConfig
from overread.server import running
from overread.settings import Settings
from testbed.smart_client import TOKEN_PATH, assertion, client_entry, es384, form
from tests.builders import patient

KEY = es384()
REQUESTS, THREADS = 500, 5


def audit_events(db: Database) -> int:
    with db.begin(write=False) as conn:
        return int(conn.scalar(select(func.count()).where(ResourceRow.type == "AuditEvent")) or 0)


def test_every_request_of_a_burst_is_audited(db):
    audit = AuditLog(for_database(db), capacity=16)  # far below the burst: the writer falls behind and requests wait
    cfg = OverreadConfig.model_validate({"auth": {"clients": [client_entry("load", KEY, "system/*.cruds")]}})
    app = create_app(Settings(database_url=db.url, auth="smart"), db, cfg, audit)
    with running(app) as root:
        data = form(assertion(KEY, "load", root + TOKEN_PATH), "system/*.cruds")
        granted = httpx.post(root + TOKEN_PATH, data=data).json()
        headers = {"Authorization": f"Bearer {granted['access_token']}", "content-type": "application/fhir+json"}
        with httpx.Client(base_url=root + "/fhir", headers=headers, timeout=60) as client:
            pid = client.post("/Patient", json=patient()).json()["id"]
        audit.flush()
        before = audit_events(db)

        def burst(n: int) -> list[int]:
            paths = [f"Patient/{pid}", "Patient?family=Haugen", "Patient/missing", "Observation?_count=1"]
            with httpx.Client(base_url=root + "/fhir", headers=headers, timeout=60) as client:
                statuses = []
                for i in range(n):
                    if i % 5 == 4:
                        statuses.append(client.post("/Patient", json=patient(mrn=f"LOAD-{i}")).status_code)
                    else:
                        statuses.append(client.get(paths[i % 5]).status_code)
                return statuses

        with ThreadPoolExecutor(THREADS) as pool:
            statuses = [s for part in pool.map(burst, [REQUESTS // THREADS] * THREADS) for s in part]
    audit.close()
    assert len(statuses) == REQUESTS and set(statuses) == {200, 201, 404}
    assert audit_events(db) - before == REQUESTS and audit.dropped == 0


def test_a_queue_that_stays_full_drops_counts_and_warns(db, caplog):
    audit = AuditLog(for_database(db), capacity=1, backpressure=0.01)
    holding, release = threading.Event(), threading.Event()

    def event() -> Event:
        return balp.token(200, "load", None, dates.now(), "127.0.0.1")

    def held() -> Event:
        holding.set()
        release.wait()
        return event()

    audit.record(held)
    holding.wait()  # the writer holds it: nothing leaves the queue
    audit.record(event)  # the queue's one place
    audit.record(event)  # no room within the backpressure time
    assert audit.dropped == 1 and "1 AuditEvents dropped" in caplog.text
    release.set()
    audit.close()
    assert audit_events(db) == 2
